"""Qwen2.5-VL in Flax NNX, matching transformers' `modeling_qwen2_5_vl.py`.

What differs from Qwen2-VL (mrm_jax/models/qwen2_vl.py, whose pieces are reused here):
- Vision blocks: RMSNorm (no bias) instead of LayerNorm, and a SwiGLU MLP *with* biases
  (`gate_proj`/`up_proj`/`down_proj`, `hidden_act` silu) instead of fc1/QuickGELU/fc2. The vision config
  uses `hidden_size` / `intermediate_size` / `out_hidden_size` (Qwen2-VL: `embed_dim` / `mlp_ratio` /
  `hidden_size`).
- Window attention: every block not listed in `fullatt_block_indexes` attends only inside windows of
  `window_size // merge_size // patch_size` merge units per side (per frame). transformers reorders the
  merge units window by window (`window_index`), runs variable-length attention over `cu_window_seqlens`,
  and undoes the order after the merger. Attention restricted to a set of keys does not depend on their
  order, every other op is per token, and the merger only mixes the patches of one merge unit (which the
  reordering keeps together), so the same result comes from giving each patch the id of its window and
  masking attention by equal ids, in the processor's patch order. `window_index` is computed on the host
  exactly as transformers does, and the per-patch `vision_window_segment_ids` derive from it.
- Patch merger: RMSNorm `ln_q` instead of LayerNorm.
- The LM is the Qwen2-VL decoder unchanged (same weights layout, chunked M-RoPE by `mrope_section`).
- Video temporal positions in the rope index advance by `tokens_per_second * second_per_grid_ts` per
  temporal patch (truncated to an integer), not by 1.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mrm_jax.errors import UserError
from mrm_jax.models import common, qwen2_vl
from mrm_jax.models.common import GatedMLP, Linear, RMSNorm

MODEL_TYPE = "qwen2_5_vl"

IMAGE_DEFAULTS = dict(qwen2_vl.IMAGE_DEFAULTS)
VIDEO_DEFAULTS = dict(qwen2_vl.VIDEO_DEFAULTS)
# transformers gives frame lists without video metadata an fps of 24 (`VideoMetadata.sampled_fps`), so
# the processor's `second_per_grid_ts` is temporal_patch_size / 24 for them.
DEFAULT_VIDEO_FPS = 24.0

TextConfig = qwen2_vl.TextConfig


# ----------------------------------------------------------------------------------------------
# Configuration

@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """`Qwen2_5_VLVisionConfig`; defaults are transformers' class defaults (the presets hold the hub's)."""
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

  @property
  def embed_dim(self) -> int:  # the name qwen2_vl.VisionAttention reads
    return self.hidden_size

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


_VISION_KEYS = [f.name for f in dataclasses.fields(VisionConfig)]


def parse_text_config(d: dict) -> TextConfig:
  """The Qwen2 decoder's config from config.json (flat or nested `text_config`), as qwen2_vl reads it."""
  text_d = dict(d)
  text_d.update(d.get("text_config") or {})
  text = {k: text_d[k] for k in qwen2_vl._TEXT_KEYS if text_d.get(k) is not None}
  text.update(qwen2_vl._rope_fields(d))
  text.update(qwen2_vl._rope_fields(d.get("text_config") or {}))
  return TextConfig(**text)


_TOP_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
             "tie_word_embeddings")


@dataclasses.dataclass(frozen=True)
class Config(common.VisionLanguageConfig):
  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()

  @classmethod
  def from_hf(cls, d: dict) -> "Config":
    vis_d = dict(d.get("vision_config") or {})
    if "in_chans" in vis_d and "in_channels" not in vis_d:
      vis_d["in_channels"] = vis_d["in_chans"]
    vision = {k: vis_d[k] for k in _VISION_KEYS if vis_d.get(k) is not None}
    if "fullatt_block_indexes" in vision:
      vision["fullatt_block_indexes"] = tuple(int(i) for i in vision["fullatt_block_indexes"])
    if (vt := qwen2_vl._rope_fields(vis_d).get("rope_theta")) is not None:
      vision["rope_theta"] = vt
    top = {k: d[k] for k in _TOP_KEYS if d.get(k) is not None}
    try:
      text = parse_text_config(d)
      vision.setdefault("out_hidden_size", text.hidden_size)
      cfg = cls(text=text, vision=VisionConfig(**vision), **top)
    except TypeError as e:
      raise UserError(f"config.json: {e}") from None
    cfg.validate()
    return cfg

  def validate(self) -> None:
    t, v = self.text, self.vision
    if t.hidden_size % t.num_attention_heads:
      raise UserError(f"config: hidden_size {t.hidden_size} is not a multiple of heads {t.num_attention_heads}")
    self.validate_text()
    if v.hidden_size % v.num_heads or v.out_hidden_size != t.hidden_size:
      raise UserError(f"config: vision hidden_size {v.hidden_size} / heads {v.num_heads} / out_hidden_size "
                      f"{v.out_hidden_size} (must equal text hidden_size {t.hidden_size})")
    if v.window_size // v.spatial_merge_size // v.patch_size < 1:
      raise UserError(f"config: window_size {v.window_size} is smaller than one merge unit "
                      f"({v.spatial_merge_size * v.patch_size} pixels)")

  def to_hf(self) -> dict:
    v = self.vision
    shim = qwen2_vl.Config(text=self.text, vision=qwen2_vl.VisionConfig(hidden_size=self.text.hidden_size))
    text = dict(shim.to_hf()["text_config"], model_type="qwen2_5_vl_text")
    vision = {k: getattr(v, k) for k in _VISION_KEYS if k != "rope_theta"}
    vision["fullatt_block_indexes"] = list(v.fullatt_block_indexes)
    vision.update(model_type="qwen2_5_vl_vision", rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta})
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": MODEL_TYPE,
        "text_config": text,
        "vision_config": vision,
        **{k: getattr(self, k) for k in _TOP_KEYS},
    }


def _hub_vision(out_hidden_size: int) -> VisionConfig:
  """The vision tower shared by every Qwen2.5-VL checkpoint on the hub."""
  return VisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                      out_hidden_size=out_hidden_size, window_size=112, fullatt_block_indexes=(7, 15, 23, 31),
                      tokens_per_second=2)


PRESETS: dict[str, Config] = {
    "tiny": Config(
        text=qwen2_vl.PRESETS["tiny"].text,
        # window 56 px = 2x2 merge units per window; blocks 1 and 3 attend globally
        vision=VisionConfig(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                            window_size=56, fullatt_block_indexes=(1, 3), tokens_per_second=2),
        **qwen2_vl.TINY_TOKEN_IDS),
    "qwen2.5-vl-3b": Config(
        text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                        num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000),
        vision=_hub_vision(2048), tie_word_embeddings=True),
    "qwen2.5-vl-7b": Config(
        text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000),
        vision=_hub_vision(3584)),
}


# ----------------------------------------------------------------------------------------------
# Vision tower

class VisionBlock(nnx.Module):
  """Pre-RMSNorm block: attention (qwen2_vl's, 2-D rotary) and a biased SwiGLU MLP."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs, attention=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = RMSNorm(cfg.hidden_size, 1e-6, axes=("vision_embed",), dtype=dtype, param_dtype=param_dtype)
    self.norm2 = RMSNorm(cfg.hidden_size, 1e-6, axes=("vision_embed",), dtype=dtype, param_dtype=param_dtype)
    self.attn = qwen2_vl.VisionAttention(cfg, attention=attention, **kw)
    self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act, use_bias=True,
                        axes=("vision_embed", "vision_mlp"), **kw)

  def __call__(self, x, cos, sin, mask):
    x = x + self.attn(self.norm1(x), cos, sin, mask)
    return x + self.mlp(self.norm2(x))


class VisionTower(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs, attention=None, remat="none"):
    self.cfg, self.remat = cfg, remat
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.patch_embed = Linear(cfg.patch_dim, cfg.hidden_size, use_bias=False, axes=(None, "vision_embed"), **kw)
    self.blocks = nnx.List([VisionBlock(cfg, attention=attention, **kw) for _ in range(cfg.depth)])
    self.merger = qwen2_vl.PatchMerger(cfg.out_hidden_size, cfg.hidden_size, cfg.spatial_merge_size,
                                       norm="rmsnorm", **kw)

  def __call__(self, pixel_values, segment_ids, window_segment_ids, pos_ids):
    """`pixel_values [P, patch_dim]` → merged tokens `[P / merge², out_hidden]` (processor patch order)."""
    x = self.patch_embed(pixel_values)
    cos, sin = common.vision_rotary_cos_sin(pos_ids, self.cfg.head_dim, self.cfg.rope_theta)
    full_mask = common.segment_mask(segment_ids)
    window_mask = common.segment_mask(window_segment_ids)
    policy = common.remat_policy(self.remat)
    for i, blk in enumerate(self.blocks):
      mask = full_mask if i in self.cfg.fullatt_block_indexes else window_mask
      x = common.remat_call(blk, policy, x, cos, sin, mask)
    return self.merger(x)


class Backbone(nnx.Module):
  """Qwen2.5-VL vision tower + the Qwen2 decoder; `__call__(batch)` → last hidden state `[B, T, H]`."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               attention: str | None = None, remat: str = "none"):
    self.config = cfg
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, attention=attention, remat=remat)
    self.visual = VisionTower(cfg.vision, **kw)
    self.language_model = qwen2_vl.TextModel(cfg.text, **kw)

  def __call__(self, batch: dict[str, Any]) -> jax.Array:
    ids = jnp.asarray(batch["input_ids"])
    embeds = self.language_model.embed_tokens(ids)
    pixels = batch.get("pixel_values")
    if pixels is not None and pixels.shape[0] > 0:
      vis = self.visual(jnp.asarray(pixels), jnp.asarray(batch["vision_segment_ids"]),
                        jnp.asarray(batch["vision_window_segment_ids"]), jnp.asarray(batch["vision_pos_ids"]))
      embeds = common.scatter_vision_tokens(embeds, ids, vis, (self.config.image_token_id,
                                                               self.config.video_token_id))
    return self.language_model(embeds, jnp.asarray(batch["position_ids"]), jnp.asarray(batch["attention_mask"]))


# ----------------------------------------------------------------------------------------------
# HF parameter names

def hf_param_map(cfg: Config) -> list[tuple[str, tuple, str]]:
  lin, norm = qwen2_vl._linear, qwen2_vl._norm
  v, vp = "model.visual", ("visual",)
  out = [(f"{v}.patch_embed.proj.weight", vp + ("patch_embed", "kernel"), "patch_embed")]
  for i in range(cfg.vision.depth):
    p, q = f"{v}.blocks.{i}", vp + ("blocks", i)
    out += norm(f"{p}.norm1", q + ("norm1",), False)
    out += norm(f"{p}.norm2", q + ("norm2",), False)
    out += lin(f"{p}.attn.qkv", q + ("attn", "qkv"))
    out += lin(f"{p}.attn.proj", q + ("attn", "proj"))
    for name in ("gate_proj", "up_proj", "down_proj"):
      out += lin(f"{p}.mlp.{name}", q + ("mlp", name))
  out += norm(f"{v}.merger.ln_q", vp + ("merger", "ln_q"), False)
  out += lin(f"{v}.merger.mlp.0", vp + ("merger", "fc1"))
  out += lin(f"{v}.merger.mlp.2", vp + ("merger", "fc2"))
  return out + qwen2_vl.text_param_map(cfg.text)


# ----------------------------------------------------------------------------------------------
# Processor hooks (numpy)

def window_index(grid_thw: np.ndarray, merge_size: int, window_size: int,
                 patch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """transformers' `get_vision_window_index` in numpy: `(window_index, cu_window_seqlens)`.

  `window_index [U]` lists the merge units (U = patches / merge²) window by window (frame-major, windows
  row-major, units row-major inside a window); `cu_window_seqlens` are the window boundaries in patches
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


def window_segment_ids(grid_thw: np.ndarray, merge_size: int, window_size: int, patch_size: int) -> np.ndarray:
  """Per-patch window ids `[P]` (1-based, processor patch order) equivalent to transformers' reordered
  `cu_window_seqlens` attention: the unit at reordered position j lies in window k when
  `cu[k] <= j * merge² < cu[k + 1]`."""
  idx, cu = window_index(grid_thw, merge_size, window_size, patch_size)
  unit = merge_size * merge_size
  win_of_position = np.searchsorted(cu, np.arange(idx.shape[0]) * unit, side="right")  # 1-based window
  unit_window = np.empty(idx.shape[0], np.int32)
  unit_window[idx] = win_of_position
  return np.repeat(unit_window, unit)


def vision_patch_arrays(grid_thw: np.ndarray, cfg: Config) -> dict[str, np.ndarray]:
  v = cfg.vision
  return {"vision_pos_ids": qwen2_vl.vision_position_ids(grid_thw, cfg.merge_size),
          "vision_window_segment_ids": window_segment_ids(grid_thw, v.spatial_merge_size, v.window_size,
                                                          v.patch_size)}


placeholder_text = qwen2_vl.placeholder_text


def mrope_positions(input_ids: np.ndarray, grid_thw: np.ndarray, image_token_id: int, video_token_id: int,
                    merge_size: int, video_intervals: Sequence[float] = ()) -> np.ndarray:
  """M-RoPE position ids `[3, T]` of one unpadded example, as transformers' `get_rope_index` builds them.

  Text runs count up by one. A vision item starting at `cur` gets temporal ids
  `cur + int(t * interval)` (interval 1 for images, `video_intervals[k]` for the k-th video, computed in
  float32 and truncated like torch's `.long()`), row / column ids `cur + i`; the text after it resumes
  at `cur + max(h, w) / merge_size` (transformers' rule, also for videos)."""
  ids = np.asarray(input_ids).reshape(-1)
  types = np.where(ids == image_token_id, 1, np.where(ids == video_token_id, 2, 0))
  grids = iter(np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3))
  intervals = iter(video_intervals)
  pos, cur, start = [], 0, 0
  for kind, group in itertools.groupby(types.tolist()):
    n = len(list(group))
    if kind == 0:
      pos.append(np.broadcast_to(np.arange(n) + cur, (3, n)))
      cur += n
    else:
      try:
        t, h, w = next(grids)
      except StopIteration:
        raise ValueError(f"more vision placeholder runs than vision items (token {start})") from None
      gh, gw = h // merge_size, w // merge_size
      if t * gh * gw != n:
        raise ValueError(f"vision item at token {start} has {n} placeholders but its grid {t}x{h}x{w} "
                         f"needs {t * gh * gw}")
      interval = np.float32(next(intervals, 1.0)) if kind == 2 else np.float32(1.0)
      temporal = (np.arange(t).astype(np.float32) * interval).astype(np.int64)
      tt, hh, ww = np.meshgrid(temporal, np.arange(gh), np.arange(gw), indexing="ij")
      pos.append(np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + cur)
      cur += max(gh, gw)
    start += n
  return (np.concatenate(pos, axis=1) if pos else np.zeros((3, 0))).astype(np.int32)


def rope_index(input_ids: np.ndarray, grid_thw: np.ndarray, cfg: Config,
               second_per_grid_ts: Sequence[float] | None = None) -> np.ndarray:
  """M-RoPE position ids `[3, T]` of one unpadded example. `second_per_grid_ts` (one per video, in order)
  defaults to `temporal_patch_size / DEFAULT_VIDEO_FPS`, what transformers' processor sets for frame lists."""
  ids = np.asarray(input_ids).reshape(-1)
  n_videos = sum(1 for k, _ in itertools.groupby(ids.tolist()) if k == cfg.video_token_id)
  if second_per_grid_ts is None:
    second_per_grid_ts = [cfg.vision.temporal_patch_size / DEFAULT_VIDEO_FPS] * n_videos
  intervals = [np.float32(cfg.vision.tokens_per_second) * np.float32(s) for s in second_per_grid_ts]
  return mrope_positions(ids, grid_thw, cfg.image_token_id, cfg.video_token_id, cfg.merge_size, intervals)
