"""Config code shared by the Qwen-VL families: config.json parsing and writing helpers, the
`VisionLanguageConfig` base of every family `Config`, and the derived vision sizes the shared
layers (mrm_jax/models/layers.py) read."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

from mrm_jax.errors import UserError

# config.json's top-level fields every family reads
TOP_KEYS = (
  "image_token_id",
  "video_token_id",
  "vision_start_token_id",
  "vision_end_token_id",
  "tie_word_embeddings",
)
# The tiny presets' vocabulary is small, so their special tokens live at its end (Qwen's real ids,
# 151643+, would index past the embedding table).
TINY_TOKEN_IDS = dict(
  vision_start_token_id=504, vision_end_token_id=505, image_token_id=506, video_token_id=507
)
# The language model every family's tiny preset shares (each adds what its TextConfig needs).
TINY_TEXT = dict(
  vocab_size=512,
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  rope_theta=10000.0,
  mrope_section=(2, 3, 3),
  max_position_embeddings=4096,
)


def rope_fields(d: dict) -> dict:
  """rope_theta / mrope_section from any of the layouts the hub has used."""
  out = {}
  rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
  theta = rope.get("rope_theta", d.get("rope_theta"))
  if theta is not None:
    out["rope_theta"] = float(theta)
  if rope.get("mrope_section") is not None:
    out["mrope_section"] = tuple(int(x) for x in rope["mrope_section"])
  return out


def vision_fields(d: dict, keys: Sequence[str]) -> dict:
  """The `keys` set in config.json's `vision_config` (`in_chans` read as `in_channels`), and its
  rotary theta from any rope layout."""
  vis_d = dict(d.get("vision_config") or {})
  if "in_chans" in vis_d and "in_channels" not in vis_d:
    vis_d["in_channels"] = vis_d["in_chans"]
  out = {k: vis_d[k] for k in keys if vis_d.get(k) is not None}
  if (theta := rope_fields(vis_d).get("rope_theta")) is not None:
    out["rope_theta"] = theta
  return out


def hf_rope_parameters(
  rope_type: str, theta: float, mrope_section: Sequence[int] | None = None, **extra
) -> dict:
  """config.json's `rope_parameters` (transformers-5 layout)."""
  out = {"rope_type": rope_type, "rope_theta": theta}
  if mrope_section is not None:
    out["mrope_section"] = list(mrope_section)
  return dict(out, **extra)


@contextlib.contextmanager
def hf_config_errors(model_type: str):
  """Inside, a field config.json gets wrong (an unknown dataclass field, a section that is not an
  object) is a UserError naming the family."""
  try:
    yield
  except TypeError as e:
    raise UserError(f"config.json: invalid {model_type} config (TypeError: {e})") from None


class VisionDims:
  """Sizes derived from a vision config's `embed_dim` (tower width), heads and patch fields."""

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size**2


class HiddenSizeVisionDims(VisionDims):
  """For the vision configs naming the tower width `hidden_size`, its MLP `intermediate_size` and
  the merger output `out_hidden_size` (Qwen2.5-VL, Qwen3-VL)."""

  @property
  def embed_dim(self) -> int:
    return self.hidden_size

  @property
  def mlp_dim(self) -> int:
    return self.intermediate_size

  @property
  def out_dim(self) -> int:
    return self.out_hidden_size


@dataclasses.dataclass(frozen=True)
class VisionLanguageConfig:
  """What every Qwen-VL family config shares; a family's `Config` adds its own `text` and
  `vision`."""

  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  tie_word_embeddings: bool = False

  @staticmethod
  def top_fields(d: dict) -> dict:
    """The `TOP_KEYS` config.json sets."""
    return {k: d[k] for k in TOP_KEYS if d.get(k) is not None}

  def top_to_hf(self) -> dict:
    return {k: getattr(self, k) for k in TOP_KEYS}

  @property
  def hidden_size(self) -> int:
    return self.text.hidden_size

  @property
  def merge_size(self) -> int:
    return self.vision.spatial_merge_size

  def validate_text(self, derived_head_dim: bool = False) -> None:
    """Checks every family's language model needs: whole KV-head groups, M-RoPE covering the head,
    and with `derived_head_dim` (head_dim = hidden_size / heads) whole heads."""
    t = self.text
    if derived_head_dim and t.hidden_size % t.num_attention_heads:
      raise UserError(
        f"config: hidden_size {t.hidden_size} is not a multiple of heads {t.num_attention_heads}"
      )
    if t.num_attention_heads % t.num_key_value_heads:
      raise UserError(
        f"config: heads {t.num_attention_heads} not a multiple of kv heads {t.num_key_value_heads}"
      )
    if sum(t.mrope_section) != t.head_dim // 2:
      raise UserError(
        f"config: mrope_section {list(t.mrope_section)} must sum to head_dim/2 = {t.head_dim // 2}"
      )

  def validate_vision(self, width_name: str, out_name: str) -> None:
    """Whole vision heads, and a merger output as wide as the LM (`*_name`: config.json's names
    of the tower width and of the merger output)."""
    t, v = self.text, self.vision
    if v.embed_dim % v.num_heads or v.out_dim != t.hidden_size:
      raise UserError(
        f"config: vision {width_name} {v.embed_dim} / heads {v.num_heads} / {out_name} "
        f"{v.out_dim} (must equal text hidden_size {t.hidden_size})"
      )
