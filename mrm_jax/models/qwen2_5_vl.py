"""Qwen2.5-VL in Flax NNX, matching transformers' `modeling_qwen2_5_vl.py`.

What differs from Qwen2-VL (the shared layers are in mrm_jax/models/layers.py; the Qwen2 decoder's
config comes from mrm_jax/models/qwen2_vl.py):
- Vision blocks: RMSNorm (no bias) instead of LayerNorm, and a SwiGLU MLP *with* biases
  (`gate_proj`/`up_proj`/`down_proj`, `hidden_act` silu) instead of fc1/QuickGELU/fc2. The vision
  config uses `hidden_size` / `intermediate_size` / `out_hidden_size` (Qwen2-VL: `embed_dim` /
  `mlp_ratio` / `hidden_size`).
- Window attention: every block not listed in `fullatt_block_indexes` attends only inside windows of
  `window_size // merge_size // patch_size` merge units per side (per frame). transformers reorders
  the merge units window by window (`window_index`), runs variable-length attention over
  `cu_window_seqlens`, and undoes the order after the merger. Attention restricted to a set of keys
  does not depend on their order, every other op is per token, and the merger only mixes the patches
  of one merge unit (which the reordering keeps together), so the same result comes from giving each
  patch the id of its window and attending within equal ids, in the processor's patch order: each
  window is one row of the `vision_windows_*` layout (vision_layout.py), so windows cost their own
  size, not the full square. `window_index` is computed on the host exactly as transformers does,
  and the per-patch `vision_window_segment_ids` derive from it.
- Patch merger: RMSNorm `ln_q` instead of LayerNorm.
- The LM is the Qwen2-VL decoder unchanged (same weights layout, chunked M-RoPE by `mrope_section`).
- Video temporal positions in the rope index advance by `tokens_per_second * second_per_grid_ts` per
  temporal patch (truncated to an integer), not by 1.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from mrm_jax.errors import UserError
from mrm_jax.models import configs, layers, qwen2_vl
from mrm_jax.models.layers import mrope_positions, placeholder_text  # noqa: F401  (family hooks)
from mrm_jax.models.qwen2_5_vl_params import hf_param_map  # noqa: F401  (family interface)

MODEL_TYPE = "qwen2_5_vl"

IMAGE_DEFAULTS = dict(qwen2_vl.IMAGE_DEFAULTS)
VIDEO_DEFAULTS = dict(qwen2_vl.VIDEO_DEFAULTS)
# transformers gives frame lists without video metadata an fps of 24 (`VideoMetadata.sampled_fps`),
# so the processor's `second_per_grid_ts` is temporal_patch_size / 24 for them.
DEFAULT_VIDEO_FPS = 24.0

TextConfig = qwen2_vl.TextConfig


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class VisionConfig(configs.HiddenSizeVisionDims):
  """`Qwen2_5_VLVisionConfig`; defaults are transformers' class defaults (the presets hold the
  hub's)."""

  depth: int = 32
  hidden_size: int = 3584
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  spatial_merge_size: int = 2
  temporal_patch_size: int = 2
  hidden_act: str = "silu"
  out_hidden_size: int = 3584
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  tokens_per_second: float = 4
  rope_theta: float = 10000.0

  norm = "rmsnorm"  # layout constants read by mrm_jax.models.layers (not config.json fields)
  mlp = "gated"


_VISION_KEYS = [f.name for f in dataclasses.fields(VisionConfig)]


@dataclasses.dataclass(frozen=True)
class Config(configs.VisionLanguageConfig):
  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()

  @classmethod
  def from_hf(cls, d: dict) -> Config:
    vision = configs.vision_fields(d, _VISION_KEYS)
    if "fullatt_block_indexes" in vision:
      vision["fullatt_block_indexes"] = tuple(int(i) for i in vision["fullatt_block_indexes"])
    with configs.hf_config_errors(MODEL_TYPE):
      text = qwen2_vl.parse_text_config(d)
      vision = VisionConfig(**{"out_hidden_size": text.hidden_size, **vision})
      cfg = cls(text=text, vision=vision, **cls.top_fields(d))
    cfg.validate()
    return cfg

  def validate(self) -> None:
    v = self.vision
    self.validate_text(derived_head_dim=True)
    self.validate_vision("hidden_size", "out_hidden_size")
    if v.window_size // v.spatial_merge_size // v.patch_size < 1:
      raise UserError(
        f"config: window_size {v.window_size} is smaller than one merge unit "
        f"({v.spatial_merge_size * v.patch_size} pixels)"
      )

  def to_hf(self) -> dict:
    v = self.vision
    vision = {k: getattr(v, k) for k in _VISION_KEYS if k != "rope_theta"}
    vision["fullatt_block_indexes"] = list(v.fullatt_block_indexes)
    vision.update(
      model_type="qwen2_5_vl_vision",
      rope_parameters=configs.hf_rope_parameters("axial", v.rope_theta),
    )
    return {
      "architectures": ["Qwen2_5_VLForConditionalGeneration"],
      "model_type": MODEL_TYPE,
      "text_config": qwen2_vl.text_to_hf(self.text, "qwen2_5_vl_text"),
      "vision_config": vision,
      **self.top_to_hf(),
    }


def _hub_vision(out_hidden_size: int) -> VisionConfig:
  """The vision tower shared by every Qwen2.5-VL checkpoint on the hub."""
  return VisionConfig(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=out_hidden_size,
    window_size=112,
    fullatt_block_indexes=(7, 15, 23, 31),
    tokens_per_second=2,
  )


PRESETS: dict[str, Config] = {
  "tiny": Config(
    text=qwen2_vl.PRESETS["tiny"].text,
    # window 56 px = 2x2 merge units per window; blocks 1 and 3 attend globally
    vision=VisionConfig(
      depth=4,
      hidden_size=32,
      intermediate_size=64,
      num_heads=2,
      out_hidden_size=64,
      window_size=56,
      fullatt_block_indexes=(1, 3),
      tokens_per_second=2,
    ),
    **configs.TINY_TOKEN_IDS,
  ),
  "qwen2.5-vl-3b": Config(
    text=TextConfig(
      vocab_size=151936,
      hidden_size=2048,
      intermediate_size=11008,
      num_hidden_layers=36,
      num_attention_heads=16,
      num_key_value_heads=2,
      max_position_embeddings=128000,
    ),
    vision=_hub_vision(2048),
    tie_word_embeddings=True,
  ),
  "qwen2.5-vl-7b": Config(
    text=TextConfig(
      vocab_size=152064,
      hidden_size=3584,
      intermediate_size=18944,
      num_hidden_layers=28,
      num_attention_heads=28,
      num_key_value_heads=4,
      max_position_embeddings=128000,
    ),
    vision=_hub_vision(3584),
  ),
}


# ----------------------------------------------------------------------------------------------
# Model


class Backbone(layers.Backbone):
  """`layers.VisionTower` (RMSNorm, biased SwiGLU, window attention) + the Qwen2 decoder."""

  vision_keys = ("vision_segment_ids", "vision_pos_ids", "vision_window_segment_ids")
  vision_layouts = {"items": "vision_items", "windows": "vision_windows"}


# ----------------------------------------------------------------------------------------------
# Processor hooks (numpy)


def window_index(
  grid_thw: np.ndarray, merge_size: int, window_size: int, patch_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """transformers' `get_vision_window_index` in numpy: `(window_index, cu_window_seqlens)`.

  `window_index [U]` lists the merge units (U = patches / merge²) window by window (frame-major,
  windows row-major, units row-major inside a window); `cu_window_seqlens` are the window boundaries
  in patches
  (repeated boundaries from empty padding windows removed, as `unique_consecutive` does)."""
  ws = window_size // merge_size // patch_size
  unit = merge_size * merge_size
  index_out, cu, offset = [], [0], 0
  for t, h, w in np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3):
    gh, gw = int(h) // merge_size, int(w) // merge_size
    index = np.arange(t * gh * gw).reshape(t, gh, gw)
    pad_h, pad_w = ws - gh % ws, ws - gw % ws
    nh, nw = (gh + pad_h) // ws, (gw + pad_w) // ws
    padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
    padded = padded.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, ws, ws)
    seqlens = (padded != -100).sum(axis=(2, 3)).reshape(-1)
    flat = padded.reshape(-1)
    index_out.append(flat[flat != -100] + offset)
    cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
    offset += int(t * gh * gw)
  cu_arr = np.asarray(cu, dtype=np.int32)
  keep = np.concatenate([[True], cu_arr[1:] != cu_arr[:-1]])
  idx = np.concatenate(index_out) if index_out else np.zeros((0,), np.int64)
  return idx.astype(np.int64), cu_arr[keep]


def window_segment_ids(
  grid_thw: np.ndarray, merge_size: int, window_size: int, patch_size: int
) -> np.ndarray:
  """Per-patch window ids `[P]` (1-based, processor patch order) equivalent to transformers'
  reordered
  `cu_window_seqlens` attention: the unit at reordered position j lies in window k when
  `cu[k] <= j * merge² < cu[k + 1]`."""
  idx, cu = window_index(grid_thw, merge_size, window_size, patch_size)
  unit = merge_size * merge_size
  win_of_position = np.searchsorted(
    cu, np.arange(idx.shape[0]) * unit, side="right"
  )  # 1-based window
  unit_window = np.empty(idx.shape[0], np.int32)
  unit_window[idx] = win_of_position
  return np.repeat(unit_window, unit)


def vision_patch_arrays(grid_thw: np.ndarray, cfg: Config) -> dict[str, np.ndarray]:
  v = cfg.vision
  return {
    "vision_pos_ids": layers.vision_position_ids(grid_thw, cfg.merge_size),
    "vision_window_segment_ids": window_segment_ids(
      grid_thw, v.spatial_merge_size, v.window_size, v.patch_size
    ),
  }


def rope_index(
  input_ids: np.ndarray,
  grid_thw: np.ndarray,
  cfg: Config,
  second_per_grid_ts: Sequence[float] | None = None,
) -> np.ndarray:
  """M-RoPE position ids `[3, T]` of one unpadded example. `second_per_grid_ts` (one per video, in
  order)
  defaults to `temporal_patch_size / DEFAULT_VIDEO_FPS`, what transformers' processor sets for frame
  lists."""
  ids = np.asarray(input_ids).reshape(-1)
  n_videos = sum(1 for k, _ in itertools.groupby(ids.tolist()) if k == cfg.video_token_id)
  if second_per_grid_ts is None:
    second_per_grid_ts = [cfg.vision.temporal_patch_size / DEFAULT_VIDEO_FPS] * n_videos
  intervals = [np.float32(cfg.vision.tokens_per_second) * np.float32(s) for s in second_per_grid_ts]
  return mrope_positions(
    ids, grid_thw, cfg.image_token_id, cfg.video_token_id, cfg.merge_size, intervals
  )
