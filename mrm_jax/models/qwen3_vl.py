"""Qwen3-VL in Flax NNX, matching transformers' `modeling_qwen3_vl.py`.

What differs from Qwen2-VL / Qwen2.5-VL (the shared layers are in mrm_jax/models/layers.py):
- Vision tower: patch size 16 and a Conv3d patch embedding *with* bias; a learned position table of
  `num_position_embeddings` (a square grid) resampled to each image's patch grid by bilinear
  interpolation with `align_corners=True` (4 taps per patch, indices and weights computed on the
  host, in the processor's merge-block patch order, like transformers'
  `get_vision_interpolation_indices_and_weights`) and added after the patch embedding, on top of the
  same 2-D rotary as Qwen2-VL. Blocks are pre-LayerNorm with a `linear_fc1 → hidden_act
  (gelu_pytorch_tanh) → linear_fc2` MLP; attention is per image / frame (no windows). The merger is
  `norm → linear_fc1 → GELU → linear_fc2` (LayerNorm over the vision width).
- DeepStack: after the vision blocks listed in `deepstack_visual_indexes`, the hidden states go
  through their own mergers (LayerNorm over the concatenated merge_size² patches, "post-shuffle"),
  and the k-th of these features is added to the LM hidden states at the image / video placeholder
  positions right after LM decoder layer k.
- LM: the Qwen3 decoder: q/k RMSNorm per head before the rotary, explicit `head_dim`,
  `attention_bias` (False on the hub) on all four projections, and *interleaved* M-RoPE (frequency i
  follows the height positions when i % 3 == 1, width when i % 3 == 2, each up to 3 * mrope_section;
  transformers applies this layout whatever `mrope_interleaved` says).
- Video: the chat template puts a `<t seconds>` timestamp before every temporal patch, each frame
  group wrapped in its own vision start / end tokens, so the rope index treats every temporal patch
  as an image of grid (1, h, w) (no temporal spacing).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mrm_jax.errors import UserError
from mrm_jax.models import common, configs, layers
from mrm_jax.models.common import LayerNorm, Linear
from mrm_jax.models.qwen3_vl_params import hf_param_map  # noqa: F401  (family interface)

MODEL_TYPE = "qwen3_vl"

HALF = (0.5, 0.5, 0.5)
# the hub's preprocessor_config.json (shortest_edge / longest_edge) and transformers'
# Qwen3VLVideoProcessor
IMAGE_DEFAULTS = dict(
  patch_size=16,
  temporal_patch_size=2,
  merge_size=2,
  image_mean=HALF,
  image_std=HALF,
  min_pixels=65536,
  max_pixels=16777216,
)
VIDEO_DEFAULTS = dict(IMAGE_DEFAULTS, min_pixels=128 * 32 * 32, max_pixels=32 * 32 * 768)
# frame lists carry no fps; transformers' processor then assumes 24 for the timestamps
DEFAULT_VIDEO_FPS = 24.0


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class VisionConfig(configs.HiddenSizeVisionDims):
  """`Qwen3VLVisionConfig` (defaults: transformers' class defaults)."""

  depth: int = 27
  hidden_size: int = 1152
  hidden_act: str = "gelu_pytorch_tanh"
  intermediate_size: int = 4304
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 16
  spatial_merge_size: int = 2
  temporal_patch_size: int = 2
  out_hidden_size: int = 3584
  num_position_embeddings: int = 2304
  deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
  rope_theta: float = 10000.0

  norm = "layernorm"  # layout constants read by mrm_jax.models.layers (not config.json fields)
  mlp = "mlp"

  @property
  def num_grid_per_side(self) -> int:
    return int(self.num_position_embeddings**0.5)


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """`Qwen3VLTextConfig` (defaults: transformers' class defaults)."""

  vocab_size: int = 151936
  hidden_size: int = 4096
  intermediate_size: int = 22016
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: int = 128
  hidden_act: str = "silu"
  max_position_embeddings: int = 128000
  rms_norm_eps: float = 1e-6
  rope_theta: float = 500000.0
  mrope_section: tuple[int, ...] = (24, 20, 20)
  attention_bias: bool = False

  # the Qwen3 decoder's layout, read by mrm_jax.models.layers (not config.json fields)
  qk_norm, mrope_interleaved = True, True

  @property
  def qkv_bias(self) -> bool:
    return self.attention_bias

  @property
  def o_bias(self) -> bool:
    return self.attention_bias


_TEXT_KEYS = [f.name for f in dataclasses.fields(TextConfig)]
_VISION_KEYS = [f.name for f in dataclasses.fields(VisionConfig)]


@dataclasses.dataclass(frozen=True)
class Config(configs.VisionLanguageConfig):
  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()

  @classmethod
  def from_hf(cls, d: dict) -> Config:
    text_d = dict(d.get("text_config") or {})
    for k in _TEXT_KEYS:  # a flat layout (nothing under text_config) also parses
      if k not in text_d and d.get(k) is not None:
        text_d[k] = d[k]
    text = {k: text_d[k] for k in _TEXT_KEYS if text_d.get(k) is not None}
    text.update(configs.rope_fields(d))
    text.update(configs.rope_fields(text_d))
    rope = text_d.get("rope_parameters") or text_d.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
      raise UserError(
        f"config.json: rope_type '{rope.get('rope_type', rope.get('type'))}' is not supported "
        f"(Qwen3-VL uses the default M-RoPE)"
      )
    vision = configs.vision_fields(d, _VISION_KEYS)
    if "deepstack_visual_indexes" in vision:
      vision["deepstack_visual_indexes"] = tuple(int(i) for i in vision["deepstack_visual_indexes"])
    top = cls.top_fields(d)
    tie = d.get("tie_word_embeddings", text_d.get("tie_word_embeddings"))
    if tie is not None:
      top["tie_word_embeddings"] = bool(tie)
    with configs.hf_config_errors(MODEL_TYPE):
      cfg = cls(text=TextConfig(**text), vision=VisionConfig(**vision), **top)
    cfg.validate()
    return cfg

  def validate(self) -> None:
    t, v = self.text, self.vision
    self.validate_text()
    self.validate_vision("hidden_size", "out_hidden_size")
    if v.num_grid_per_side**2 != v.num_position_embeddings:
      raise UserError(
        f"config: num_position_embeddings {v.num_position_embeddings} is not a square"
      )
    if any(not 0 <= i < v.depth for i in v.deepstack_visual_indexes):
      raise UserError(
        f"config: deepstack_visual_indexes {list(v.deepstack_visual_indexes)} outside the "
        f"{v.depth} vision blocks"
      )
    if len(v.deepstack_visual_indexes) > t.num_hidden_layers:
      raise UserError(
        f"config: {len(v.deepstack_visual_indexes)} deepstack levels but only "
        f"{t.num_hidden_layers} LM layers"
      )

  def to_hf(self) -> dict:
    t, v = self.text, self.vision
    text = {k: getattr(t, k) for k in _TEXT_KEYS if k not in ("rope_theta", "mrope_section")}
    text.update(
      model_type="qwen3_vl_text",
      rope_parameters=configs.hf_rope_parameters(
        "default", t.rope_theta, t.mrope_section, mrope_interleaved=True
      ),
    )
    vision = {k: getattr(v, k) for k in _VISION_KEYS if k != "rope_theta"}
    vision["deepstack_visual_indexes"] = list(v.deepstack_visual_indexes)
    vision.update(
      model_type="qwen3_vl_vision",
      rope_parameters=configs.hf_rope_parameters("axial", v.rope_theta),
    )
    return {
      "architectures": ["Qwen3VLForConditionalGeneration"],
      "model_type": MODEL_TYPE,
      "text_config": text,
      "vision_config": vision,
      **self.top_to_hf(),
    }


def _hub_text(**kw) -> TextConfig:
  return TextConfig(
    **dict(
      dict(
        vocab_size=151936,
        num_key_value_heads=8,
        head_dim=128,
        rope_theta=5000000.0,
        max_position_embeddings=262144,
        mrope_section=(24, 20, 20),
      ),
      **kw,
    )
  )


_SMALL_VISION = dict(
  depth=24,
  hidden_size=1024,
  intermediate_size=4096,
  num_heads=16,
  deepstack_visual_indexes=(5, 11, 17),
)

PRESETS: dict[str, Config] = {
  "tiny": Config(
    text=TextConfig(**configs.TINY_TEXT, head_dim=16),
    # an 8x8 learned position grid, resampled up and down to the test images' grids
    vision=VisionConfig(
      depth=3,
      hidden_size=32,
      intermediate_size=64,
      num_heads=2,
      out_hidden_size=64,
      num_position_embeddings=64,
      deepstack_visual_indexes=(0, 1),
    ),
    **configs.TINY_TOKEN_IDS,
  ),
  "qwen3-vl-2b": Config(
    text=_hub_text(
      hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16
    ),
    vision=VisionConfig(out_hidden_size=2048, **_SMALL_VISION),
    tie_word_embeddings=True,
  ),
  "qwen3-vl-4b": Config(
    text=_hub_text(
      hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32
    ),
    vision=VisionConfig(out_hidden_size=2560, **_SMALL_VISION),
    tie_word_embeddings=True,
  ),
  "qwen3-vl-8b": Config(
    text=_hub_text(
      hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32
    ),
    vision=VisionConfig(
      depth=27,
      hidden_size=1152,
      intermediate_size=4304,
      num_heads=16,
      out_hidden_size=4096,
      deepstack_visual_indexes=(8, 16, 24),
    ),
  ),
}


# ----------------------------------------------------------------------------------------------
# Vision tower


class PatchMerger(nnx.Module):
  """`linear_fc2(GELU(linear_fc1(norm(...))))` over merge_size² concatenated patches. The main
  merger
  normalises each patch (width `hidden_size`); the deepstack mergers normalise the concatenation."""

  def __init__(self, cfg: VisionConfig, *, postshuffle: bool, dtype, param_dtype, rngs):
    self.hidden = cfg.hidden_size * cfg.spatial_merge_size**2
    self.postshuffle = postshuffle
    self.norm = LayerNorm(
      self.hidden if postshuffle else cfg.hidden_size,
      1e-6,
      axes=(None,) if postshuffle else ("vision_embed",),
      dtype=dtype,
      param_dtype=param_dtype,
    )
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_fc1 = Linear(self.hidden, self.hidden, axes=(None, "vision_mlp"), **kw)
    self.linear_fc2 = Linear(self.hidden, cfg.out_hidden_size, axes=("vision_mlp", "embed"), **kw)

  def __call__(self, x):
    x = (
      self.norm(x.reshape(-1, self.hidden))
      if self.postshuffle
      else self.norm(x).reshape(-1, self.hidden)
    )
    return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))


class VisionTower(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs, attention=None, remat="none"):
    self.cfg, self.remat = cfg, remat
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.patch_embed = Linear(
      cfg.patch_dim, cfg.hidden_size, use_bias=True, axes=(None, "vision_embed"), **kw
    )
    self.pos_embed = common.Embed(
      cfg.num_position_embeddings, cfg.hidden_size, axes=(None, "vision_embed"), **kw
    )
    self.blocks = nnx.List(
      [layers.VisionBlock(cfg, attention=attention, **kw) for _ in range(cfg.depth)]
    )
    self.merger = PatchMerger(cfg, postshuffle=False, **kw)
    self.deepstack_merger_list = nnx.List(
      [PatchMerger(cfg, postshuffle=True, **kw) for _ in cfg.deepstack_visual_indexes]
    )

  def __call__(
    self, pixel_values, segment_ids, pos_ids, interp_index, interp_weight, *, items=None
  ):
    """`pixel_values [P, patch_dim]` → (merged tokens `[P / merge², out_hidden]`, deepstack features
    `[[P / merge², out_hidden]] * len(deepstack_visual_indexes)`). `items`: per-item attention
    layout (`common.ItemLayout`); without it, a block-diagonal mask."""
    x = self.patch_embed(pixel_values)
    table = self.pos_embed.embedding[...]
    pos = jnp.sum(
      jnp.take(table, interp_index, axis=0).astype(jnp.float32)
      * interp_weight.astype(jnp.float32)[..., None],
      axis=1,
    )
    x = x + pos.astype(x.dtype)
    cos, sin = common.vision_rotary_cos_sin(pos_ids, self.cfg.head_dim, self.cfg.rope_theta)
    deepstack, taps = [], self.cfg.deepstack_visual_indexes

    def tap(i, x):
      if i in taps:
        deepstack.append(self.deepstack_merger_list[taps.index(i)](x))
      return x

    mask = items if items is not None else common.segment_mask(segment_ids)
    x = common.apply_layers(self.blocks, self.remat, x, cos, sin, mask, after=tap)
    return self.merger(x), deepstack


# ----------------------------------------------------------------------------------------------
# Model


class Backbone(layers.Backbone):
  """The Qwen3-VL vision tower (with DeepStack) + the Qwen3 decoder (q/k norms, interleaved
  M-RoPE)."""

  vision_tower = VisionTower
  vision_keys = (
    "vision_segment_ids",
    "vision_pos_ids",
    "vision_pos_embed_index",
    "vision_pos_embed_weight",
  )


# ----------------------------------------------------------------------------------------------
# Processor hooks (numpy)


def _axis_taps(index: np.ndarray, size: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
  """Bilinear, align_corners=True taps `[N, 2]` and weights into a `side`-long axis (float32 like
  torch)."""
  src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
  floor = np.floor(src)
  offsets = np.arange(2)
  taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
  distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
  return taps, np.clip(np.float32(1) - distance, 0, None).astype(np.float32)


def pos_embed_interpolation(
  grid_thw: np.ndarray, num_grid_per_side: int, merge_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Per-patch gather indices `[P, 4]` into the learned `side x side` position table and their
  bilinear weights `[P, 4]` (transformers' `get_vision_interpolation_indices_and_weights`, bilinear,
  `align_corners=True`), in the processor's merge-block patch order, repeated for every frame."""
  side = num_grid_per_side
  grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
  rows, cols, heights, widths = [], [], [], []
  for t, h, w in grid:
    within = np.arange(h * w)
    in_col, in_row = within % merge_size, (within // merge_size) % merge_size
    blocks_w = w // merge_size
    block_col = (within // (merge_size * merge_size)) % blocks_w
    block_row = within // (merge_size * merge_size * blocks_w)
    rows.append(np.tile(block_row * merge_size + in_row, t))
    cols.append(np.tile(block_col * merge_size + in_col, t))
    heights.append(np.full(t * h * w, h))
    widths.append(np.full(t * h * w, w))
  if not rows:
    return np.zeros((0, 4), np.int32), np.zeros((0, 4), np.float32)
  h_taps, h_w = _axis_taps(np.concatenate(rows), np.concatenate(heights), side)
  w_taps, w_w = _axis_taps(np.concatenate(cols), np.concatenate(widths), side)
  index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
  weight = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
  return index.astype(np.int32), weight.astype(np.float32)


def vision_patch_arrays(grid_thw: np.ndarray, cfg: Config) -> dict[str, np.ndarray]:
  index, weight = pos_embed_interpolation(grid_thw, cfg.vision.num_grid_per_side, cfg.merge_size)
  return {
    "vision_pos_ids": layers.vision_position_ids(grid_thw, cfg.merge_size),
    "vision_pos_embed_index": index,
    "vision_pos_embed_weight": weight,
  }


def frame_timestamps(
  num_grid_frames: int,
  temporal_patch_size: int = 2,
  num_frames: int | None = None,
  fps: float | None = None,
  frame_indices: Sequence[int] | None = None,
) -> list[float]:
  """Seconds shown before each temporal patch (transformers'
  `Qwen3VLProcessor._calculate_timestamps`): the mean time of the first and last frame of the patch.
  Frame lists default to indices 0..n-1 at 24 fps;
  a count not divisible by the temporal patch size repeats the last frame."""
  fps = DEFAULT_VIDEO_FPS if fps is None else float(fps)
  if frame_indices is None:
    n = num_grid_frames * temporal_patch_size if num_frames is None else int(num_frames)
    frame_indices = list(range(n))
  idx = list(frame_indices)
  if len(idx) % temporal_patch_size:
    idx += [idx[-1]] * (temporal_patch_size - len(idx) % temporal_patch_size)
  ts = [i / fps for i in idx]
  return [
    (ts[i] + ts[i + temporal_patch_size - 1]) / 2 for i in range(0, len(ts), temporal_patch_size)
  ]


def placeholder_text(kind: str, thw, cfg: Config, merge_size: int, **video_timing) -> str:
  """Images as in Qwen2-VL. A video becomes, per temporal patch, `<t seconds>` followed by its own
  `<|vision_start|><|video_pad|>*n<|vision_end|>` (n = h*w / merge²); `video_timing` goes to
  `frame_timestamps` (num_frames / fps / frame_indices)."""
  if kind == "image":
    return layers.placeholder_text(kind, thw, cfg, merge_size)
  t, h, w = (int(x) for x in thw)
  per_frame = "<|vision_start|>" + "<|video_pad|>" * (h * w // merge_size**2) + "<|vision_end|>"
  times = frame_timestamps(t, cfg.vision.temporal_patch_size, **video_timing)
  return "".join(f"<{s:.1f} seconds>" + per_frame for s in times[:t])


def rope_index(input_ids: np.ndarray, grid_thw: np.ndarray, cfg: Config) -> np.ndarray:
  """M-RoPE position ids `[3, T]` of one unpadded example: videos are split into (1, h, w) frames
  (each
  one its own placeholder run after its timestamp), then positions follow transformers'
  `get_rope_index`."""
  ids = np.asarray(input_ids).reshape(-1)
  ids_list = ids.tolist()
  grids = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
  # vision items in order of appearance: a video item covers t consecutive video placeholder runs
  runs = [
    tok for tok, _ in itertools.groupby(ids_list) if tok in (cfg.image_token_id, cfg.video_token_id)
  ]
  split, r = [], 0
  for t, h, w in grids:
    kind = runs[r] if r < len(runs) else None
    if kind == cfg.video_token_id:
      split += [(1, h, w)] * int(t)
      r += int(t)
    else:
      split.append((t, h, w))
      r += 1
  return layers.mrope_positions(
    ids,
    np.asarray(split, np.int64).reshape(-1, 3),
    cfg.image_token_id,
    cfg.video_token_id,
    cfg.merge_size,
  )
