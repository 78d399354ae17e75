"""Qwen2-VL in Flax NNX, matching transformers' `modeling_qwen2_vl.py`.

Vision tower: patch embedding (a Conv3d with stride = kernel, i.e. a matmul over flattened
`[C*tp*p*p]` patches), 2-D axial rotary, pre-LayerNorm blocks with QuickGELU MLPs, attention
restricted to each image / video frame (transformers' `cu_seqlens`: here each item's patches are
gathered into one row of a static `[items, width]` grid, see vision_layout.py), and a patch merger
(LayerNorm → concatenate merge_size² neighbours → MLP). Language model: the Qwen2 decoder (GQA,
q/k/v bias, SwiGLU, RMSNorm) with multimodal RoPE split by `mrope_section`. Merged vision tokens
replace the `<|image_pad|>` / `<|video_pad|>` embeddings in order of appearance. See
mrm_jax/models/__init__.py for the family-module interface this file implements.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mrm_jax.models import common, configs, layers
from mrm_jax.models.layers import placeholder_text, vision_position_ids  # noqa: F401 - family hooks
from mrm_jax.models.qwen2_vl_params import hf_param_map  # noqa: F401  (family interface)

MODEL_TYPE = "qwen2_vl"

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_DEFAULTS = dict(
  patch_size=14,
  temporal_patch_size=2,
  merge_size=2,
  image_mean=OPENAI_CLIP_MEAN,
  image_std=OPENAI_CLIP_STD,
  min_pixels=56 * 56,
  max_pixels=28 * 28 * 1280,
)
VIDEO_DEFAULTS = dict(IMAGE_DEFAULTS, min_pixels=128 * 28 * 28, max_pixels=28 * 28 * 768)


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class VisionConfig(configs.VisionDims):
  depth: int = 32
  embed_dim: int = 1280
  hidden_size: int = 3584  # output of the merger = LM hidden size
  mlp_ratio: float = 4
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  spatial_merge_size: int = 2
  temporal_patch_size: int = 2
  hidden_act: str = "quick_gelu"
  rope_theta: float = 10000.0

  norm = "layernorm"  # layout constants read by mrm_jax.models.layers (not config.json fields)
  mlp = "mlp"

  @property
  def mlp_dim(self) -> int:
    return int(self.embed_dim * self.mlp_ratio)

  @property
  def out_dim(self) -> int:
    return self.hidden_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_hidden_layers: int = 28
  num_attention_heads: int = 28
  num_key_value_heads: int = 4
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  mrope_section: tuple[int, ...] = (16, 24, 24)
  max_position_embeddings: int = 32768
  bos_token_id: int | None = 151643
  eos_token_id: int | None = 151645
  initializer_range: float = 0.02  # std of random init (transformers reads the text config's)

  # the Qwen2 decoder's layout, read by mrm_jax.models.layers (not config.json fields)
  qkv_bias, o_bias, qk_norm, mrope_interleaved = True, False, False, False

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


_TEXT_KEYS = [f.name for f in dataclasses.fields(TextConfig)]
_VISION_KEYS = [f.name for f in dataclasses.fields(VisionConfig)]


def parse_text_config(d: dict) -> TextConfig:
  """The Qwen2 decoder's config from config.json (flat pre-v5 layout or nested `text_config`)."""
  text_d = dict(d)
  text_d.update(d.get("text_config") or {})
  text = {k: text_d[k] for k in _TEXT_KEYS if text_d.get(k) is not None}
  text.update(configs.rope_fields(d))
  text.update(configs.rope_fields(d.get("text_config") or {}))
  return TextConfig(**text)


def text_to_hf(t: TextConfig, model_type: str) -> dict:
  """config.json's `text_config` of a Qwen2 decoder."""
  text = {k: getattr(t, k) for k in _TEXT_KEYS if k not in ("rope_theta", "mrope_section")}
  text.update(
    model_type=model_type,
    rope_parameters=configs.hf_rope_parameters("default", t.rope_theta, t.mrope_section),
  )
  return text


@dataclasses.dataclass(frozen=True)
class Config(configs.VisionLanguageConfig):
  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()

  @classmethod
  def from_hf(cls, d: dict) -> Config:
    """Parses config.json (flat pre-v5 layout, or nested `text_config` / `vision_config`)."""
    vision = configs.vision_fields(d, _VISION_KEYS)
    with configs.hf_config_errors(MODEL_TYPE):
      text = parse_text_config(d)
      vision = VisionConfig(**{"hidden_size": text.hidden_size, **vision})
      cfg = cls(text=text, vision=vision, **cls.top_fields(d))
    cfg.validate()
    return cfg

  def validate(self) -> None:
    self.validate_text(derived_head_dim=True)
    self.validate_vision("embed_dim", "hidden_size")

  def to_hf(self) -> dict:
    v = self.vision
    vision = {k: getattr(v, k) for k in _VISION_KEYS if k != "rope_theta"}
    vision.update(
      model_type="qwen2_vl_vision",
      rope_parameters=configs.hf_rope_parameters("axial", v.rope_theta),
    )
    return {
      "architectures": ["Qwen2VLForConditionalGeneration"],
      "model_type": MODEL_TYPE,
      "text_config": text_to_hf(self.text, "qwen2_vl_text"),
      "vision_config": vision,
      **self.top_to_hf(),
    }


PRESETS: dict[str, Config] = {
  "tiny": Config(
    text=TextConfig(**configs.TINY_TEXT, bos_token_id=500, eos_token_id=502),
    vision=VisionConfig(depth=2, embed_dim=32, hidden_size=64, num_heads=2),
    **configs.TINY_TOKEN_IDS,
  ),
  "qwen2-vl-2b": Config(
    text=TextConfig(
      vocab_size=151936,
      hidden_size=1536,
      intermediate_size=8960,
      num_hidden_layers=28,
      num_attention_heads=12,
      num_key_value_heads=2,
    ),
    vision=VisionConfig(hidden_size=1536),
    tie_word_embeddings=True,
  ),
  "qwen2-vl-7b": Config(),
}


# ----------------------------------------------------------------------------------------------
# Model


class Backbone(layers.Backbone):
  """`layers.VisionTower` (LayerNorm, QuickGELU MLP) + the Qwen2 decoder; random init honours the
  text config's `initializer_range`."""

  def __init__(self, cfg: Config, **kw):
    with common.init_std(cfg.text.initializer_range):
      super().__init__(cfg, **kw)


# ----------------------------------------------------------------------------------------------
# Processor hooks (numpy)


def vision_patch_arrays(grid_thw: np.ndarray, cfg: Config) -> dict[str, np.ndarray]:
  return {"vision_pos_ids": vision_position_ids(grid_thw, cfg.merge_size)}


def rope_index(input_ids: np.ndarray, grid_thw: np.ndarray, cfg: Config) -> np.ndarray:
  """M-RoPE position ids `[3, T]` of one unpadded example (transformers' `get_rope_index`)."""
  return layers.mrope_positions(
    input_ids, grid_thw, cfg.image_token_id, cfg.video_token_id, cfg.merge_size
  )
