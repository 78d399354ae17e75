"""The model code the Qwen-VL families share: vision attention / blocks / tower, the decoder, the
backbone forward, the HF names of these layers, and the processor's M-RoPE position ids.

A family selects among the shared layouts through class constants on its config classes (not
config.json fields; see mrm_jax/models/__init__.py):
- vision config: `norm` ("layernorm" | "rmsnorm": blocks and `PatchMerger`), `mlp` ("mlp":
  fc1 → act → fc2 | "gated": biased SwiGLU), plus `embed_dim` (tower width), `mlp_dim` (block MLP
  width) and `out_dim` (merger output = LM width).
- text config: `qkv_bias`, `o_bias`, `qk_norm` (per-head q/k RMSNorm), `mrope_interleaved`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mrm_jax.models import common
from mrm_jax.models.common import MLP, GatedMLP, LayerNorm, Linear, RMSNorm

ParamNames = list[tuple[str, tuple, str]]


# ----------------------------------------------------------------------------------------------
# Vision tower


class VisionAttention(nnx.Module):
  """Fused-qkv attention under the 2-D rotary, within each image / frame / window: per item
  (`common.ItemLayout`, cost linear in the number of items) or, given a mask, over the whole
  sequence under that block-diagonal mask (batches without a layout)."""

  def __init__(self, cfg, *, dtype, param_dtype, rngs, attention=None):
    e = cfg.embed_dim
    self.num_heads, self.head_dim, self.attention = cfg.num_heads, cfg.head_dim, attention
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = Linear(e, 3 * e, axes=("vision_embed", "vision_heads"), **kw)
    self.proj = Linear(e, e, axes=("vision_heads", "vision_embed"), **kw)

  def __call__(self, x, cos, sin, mask):
    """`mask`: a `common.ItemLayout` or a boolean `[1, 1, P, P]` mask."""
    p = x.shape[0]
    qkv = self.qkv(x).reshape(p, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    c, s = cos[:, None, :], sin[:, None, :]
    q = common.apply_rotary(q.astype(jnp.float32), c, s).astype(x.dtype)
    k = common.apply_rotary(k.astype(jnp.float32), c, s).astype(x.dtype)
    if isinstance(mask, common.ItemLayout):
      out = common.item_attention(q, k, v, mask, implementation=self.attention)
    else:
      impl = None if self.attention == "cudnn" else self.attention  # arbitrary masks: XLA path
      out = common.attention(q[None], k[None], v[None], mask=mask, implementation=impl)[0]
    return self.proj(out.reshape(p, -1))


def _vision_norm(cfg, dim: int, *, dtype, param_dtype, axes=("vision_embed",)):
  norm = RMSNorm if cfg.norm == "rmsnorm" else LayerNorm
  return norm(dim, 1e-6, axes=axes, dtype=dtype, param_dtype=param_dtype)


class VisionBlock(nnx.Module):
  """Pre-norm block: `VisionAttention` and the config's MLP (`cfg.norm`, `cfg.mlp`)."""

  def __init__(self, cfg, *, dtype, param_dtype, rngs, attention=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = _vision_norm(cfg, cfg.embed_dim, dtype=dtype, param_dtype=param_dtype)
    self.norm2 = _vision_norm(cfg, cfg.embed_dim, dtype=dtype, param_dtype=param_dtype)
    self.attn = VisionAttention(cfg, attention=attention, **kw)
    if cfg.mlp == "gated":
      self.mlp = GatedMLP(
        cfg.embed_dim,
        cfg.mlp_dim,
        act=cfg.hidden_act,
        use_bias=True,
        axes=("vision_embed", "vision_mlp"),
        **kw,
      )
    else:
      self.mlp = MLP(cfg.embed_dim, cfg.mlp_dim, act=cfg.hidden_act, **kw)

  def __call__(self, x, cos, sin, mask):
    x = x + self.attn(self.norm1(x), cos, sin, mask)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """Norm, then each merge_size² consecutive patches concatenated and projected to the LM width
  (Qwen2-VL: LayerNorm; Qwen2.5-VL: RMSNorm)."""

  def __init__(self, cfg, *, dtype, param_dtype, rngs):
    self.hidden = cfg.embed_dim * cfg.spatial_merge_size**2
    self.ln_q = _vision_norm(cfg, cfg.embed_dim, dtype=dtype, param_dtype=param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = Linear(self.hidden, self.hidden, axes=(None, "vision_mlp"), **kw)
    self.fc2 = Linear(self.hidden, cfg.out_dim, axes=("vision_mlp", "embed"), **kw)

  def __call__(self, x):
    x = self.ln_q(x).reshape(-1, self.hidden)
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):
  """Qwen2-VL / Qwen2.5-VL tower: patch embedding (a bias-free matmul over flattened patches),
  `VisionBlock`s under the 2-D rotary, `PatchMerger`. Blocks attend within each image / frame or,
  given `window_segment_ids`, within windows except the blocks in `cfg.fullatt_block_indexes`."""

  def __init__(self, cfg, *, dtype, param_dtype, rngs, attention=None, remat="none"):
    self.cfg, self.remat = cfg, remat
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.patch_embed = Linear(
      cfg.patch_dim, cfg.embed_dim, use_bias=False, axes=(None, "vision_embed"), **kw
    )
    self.blocks = nnx.List([VisionBlock(cfg, attention=attention, **kw) for _ in range(cfg.depth)])
    self.merger = PatchMerger(cfg, **kw)

  def __call__(
    self, pixel_values, segment_ids, pos_ids, window_segment_ids=None, *, items=None, windows=None
  ):
    """`pixel_values [P, patch_dim]` → (merged tokens `[P / merge², out_dim]`, no DeepStack
    features). `items` / `windows`: the `common.ItemLayout`s of the segment ids (per-item
    attention); without them attention runs under block-diagonal masks."""
    x = self.patch_embed(pixel_values)
    cos, sin = common.vision_rotary_cos_sin(pos_ids, self.cfg.head_dim, self.cfg.rope_theta)
    mask = items if items is not None else common.segment_mask(segment_ids)
    if window_segment_ids is None:
      x = common.apply_layers(self.blocks, self.remat, x, cos, sin, mask)
    else:
      window = windows if windows is not None else common.segment_mask(window_segment_ids)
      full = self.cfg.fullatt_block_indexes
      x = common.apply_layers(
        self.blocks, self.remat, x, layer_args=lambda i: (cos, sin, mask if i in full else window)
      )
    return self.merger(x), []


# ----------------------------------------------------------------------------------------------
# Language model


class TextAttention(nnx.Module):
  """GQA under multimodal RoPE; optional per-head q/k RMSNorm before the rotary (Qwen3)."""

  def __init__(self, cfg, *, dtype, param_dtype, rngs, attention=None):
    h, n, k, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    self.n, self.k, self.d, self.attention = n, k, d, attention
    kw = dict(use_bias=cfg.qkv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = Linear(h, n * d, axes=("embed", "heads"), **kw)
    self.k_proj = Linear(h, k * d, axes=("embed", "kv_heads"), **kw)
    self.v_proj = Linear(h, k * d, axes=("embed", "kv_heads"), **kw)
    self.o_proj = Linear(n * d, h, axes=("heads", "embed"), **dict(kw, use_bias=cfg.o_bias))
    norm = dict(dtype=dtype, param_dtype=param_dtype)
    self.q_norm = RMSNorm(d, cfg.rms_norm_eps, **norm) if cfg.qk_norm else None
    self.k_norm = RMSNorm(d, cfg.rms_norm_eps, **norm) if cfg.qk_norm else None

  def __call__(self, x, cos, sin, key_mask):
    """`key_mask`: `[B, T]` (1 = real token; causal attention) or a `common.PairLayout`."""
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.n, self.d)
    k = self.k_proj(x).reshape(b, t, self.k, self.d)
    v = self.v_proj(x).reshape(b, t, self.k, self.d)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    q, k = common.apply_rotary(q, c, s), common.apply_rotary(k, c, s)
    if isinstance(key_mask, common.PairLayout):
      out = common.pair_attention(q, k, v, key_mask, implementation=self.attention)
    else:
      out = common.attention(q, k, v, causal=True, key_mask=key_mask, implementation=self.attention)
    return self.o_proj(out.reshape(b, t, self.n * self.d))


class DecoderLayer(nnx.Module):
  """Pre-RMSNorm decoder block: `TextAttention` and a SwiGLU MLP."""

  def __init__(self, cfg, *, dtype, param_dtype, rngs, attention=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm = dict(axes=("embed",), dtype=dtype, param_dtype=param_dtype)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
    self.self_attn = TextAttention(cfg, attention=attention, **kw)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
    self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act, **kw)

  def __call__(self, x, cos, sin, key_mask):
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, key_mask)
    return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nnx.Module):
  """Token embedding, `DecoderLayer`s, final RMSNorm (no LM head)."""

  def __init__(self, cfg, *, dtype, param_dtype, rngs, attention=None, remat="none"):
    self.cfg, self.remat = cfg, remat
    self.embed_tokens = common.Embed(
      cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.layers = nnx.List(
      [
        DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, attention=attention)
        for _ in range(cfg.num_hidden_layers)
      ]
    )
    self.norm = RMSNorm(
      cfg.hidden_size, cfg.rms_norm_eps, axes=("embed",), dtype=dtype, param_dtype=param_dtype
    )

  def __call__(self, embeds, position_ids, attention_mask, deepstack: Sequence[jax.Array] = ()):
    """`deepstack[k]` (`[B, T, H]`, zero away from vision tokens) is added after decoder layer k."""
    c = self.cfg
    cos, sin = common.mrope_cos_sin(
      position_ids, c.head_dim, c.rope_theta, c.mrope_section, interleaved=c.mrope_interleaved
    )

    def add_deepstack(i, x):
      return x + deepstack[i].astype(x.dtype) if i < len(deepstack) else x

    x = common.apply_layers(
      self.layers,
      self.remat,
      embeds,
      cos,
      sin,
      attention_mask,
      after=add_deepstack if deepstack else None,
    )
    return self.norm(x)


# ----------------------------------------------------------------------------------------------
# Backbone


class Backbone(nnx.Module):
  """Vision tower + decoder; `__call__(batch)` → last hidden state `[B, T, H]` (after the norm).

  Embeds the tokens, replaces the placeholder embeddings by the merged vision tokens, runs the
  decoder (adding the tower's DeepStack features, if any, at the placeholders). A family subclass
  sets `vision_tower` (called with `pixel_values` then the batch arrays named in `vision_keys`, and
  returning `(tokens, deepstack_features)`)."""

  vision_tower: type = VisionTower
  vision_keys: tuple[str, ...] = ("vision_segment_ids", "vision_pos_ids")
  # tower keyword ← batch prefix of its per-item attention layout (vision_layout.LAYOUTS)
  vision_layouts: dict[str, str] = {"items": "vision_items"}

  def __init__(
    self,
    cfg,
    *,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    attention: str | None = None,
    remat: str = "none",
  ):
    self.config = cfg
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, attention=attention, remat=remat)
    self.visual = self.vision_tower(cfg.vision, **kw)
    self.language_model = TextModel(cfg.text, **kw)

  def __call__(self, batch: dict[str, Any]) -> jax.Array:
    ids = jnp.asarray(batch["input_ids"])
    embeds = self.language_model.embed_tokens(ids)
    pixels = batch.get("pixel_values")
    deepstack = []
    if pixels is not None and pixels.shape[0] > 0:
      tokens = (self.config.image_token_id, self.config.video_token_id)
      arrays = [jnp.asarray(batch[k]) for k in self.vision_keys]
      layouts = {k: common.item_layout(batch, prefix) for k, prefix in self.vision_layouts.items()}
      vis, feats = self.visual(
        jnp.asarray(pixels), *arrays, **{k: v for k, v in layouts.items() if v is not None}
      )
      offsets = batch.get("vision_token_offset")
      embeds = common.scatter_vision_tokens(embeds, ids, vis, tokens, offsets)
      zeros = jnp.zeros_like(embeds)
      deepstack = [common.scatter_vision_tokens(zeros, ids, f, tokens, offsets) for f in feats]
    pairs = common.pair_layout(batch)  # the shared-prompt layout, or the LM's key mask
    mask = pairs if pairs is not None else jnp.asarray(batch["attention_mask"])
    return self.language_model(embeds, jnp.asarray(batch["position_ids"]), mask, deepstack)


# ----------------------------------------------------------------------------------------------
# HF parameter names of these layers (`(hf_key, nnx_path, kind)`, see `hf_param_map` in __init__)


def linear_names(prefix: str, path: tuple, bias: bool = True) -> ParamNames:
  out = [(f"{prefix}.weight", path + ("kernel",), "linear")]
  if bias:
    out.append((f"{prefix}.bias", path + ("bias",), "copy"))
  return out


def norm_names(prefix: str, path: tuple, bias: bool) -> ParamNames:
  out = [(f"{prefix}.weight", path + ("scale",), "copy")]
  if bias:
    out.append((f"{prefix}.bias", path + ("bias",), "copy"))
  return out


def vision_block_names(
  cfg, mlp_names: Callable[[str, tuple], ParamNames], prefix: str = "model.visual"
) -> ParamNames:
  """Every `VisionBlock` of the tower; `mlp_names(hf_prefix, nnx_path)` names one block's MLP."""
  out = []
  for i in range(cfg.depth):
    p, q = f"{prefix}.blocks.{i}", ("visual", "blocks", i)
    out += norm_names(f"{p}.norm1", q + ("norm1",), cfg.norm == "layernorm")
    out += norm_names(f"{p}.norm2", q + ("norm2",), cfg.norm == "layernorm")
    out += linear_names(f"{p}.attn.qkv", q + ("attn", "qkv"))
    out += linear_names(f"{p}.attn.proj", q + ("attn", "proj"))
    out += mlp_names(f"{p}.mlp", q + ("mlp",))
  return out


def vision_tower_names(
  cfg, mlp_names: Callable[[str, tuple], ParamNames], prefix: str = "model.visual"
) -> ParamNames:
  """`VisionTower` (patch embedding, blocks, `PatchMerger`)."""
  vp = ("visual",)
  return (
    [(f"{prefix}.patch_embed.proj.weight", vp + ("patch_embed", "kernel"), "patch_embed")]
    + vision_block_names(cfg, mlp_names, prefix)
    + norm_names(f"{prefix}.merger.ln_q", vp + ("merger", "ln_q"), cfg.norm == "layernorm")
    + linear_names(f"{prefix}.merger.mlp.0", vp + ("merger", "fc1"))
    + linear_names(f"{prefix}.merger.mlp.2", vp + ("merger", "fc2"))
  )


def text_model_names(cfg, prefix: str = "model.language_model") -> ParamNames:
  """`TextModel` (embedding, decoder layers, final norm)."""
  lm = ("language_model",)
  out = [(f"{prefix}.embed_tokens.weight", lm + ("embed_tokens", "embedding"), "copy")]
  for i in range(cfg.num_hidden_layers):
    p, q = f"{prefix}.layers.{i}", lm + ("layers", i)
    out += norm_names(f"{p}.input_layernorm", q + ("input_layernorm",), False)
    out += norm_names(f"{p}.post_attention_layernorm", q + ("post_attention_layernorm",), False)
    for name in ("q_proj", "k_proj", "v_proj"):
      out += linear_names(f"{p}.self_attn.{name}", q + ("self_attn", name), bias=cfg.qkv_bias)
    out += linear_names(f"{p}.self_attn.o_proj", q + ("self_attn", "o_proj"), bias=cfg.o_bias)
    if cfg.qk_norm:
      out += norm_names(f"{p}.self_attn.q_norm", q + ("self_attn", "q_norm"), False)
      out += norm_names(f"{p}.self_attn.k_norm", q + ("self_attn", "k_norm"), False)
    for name in ("gate_proj", "up_proj", "down_proj"):
      out += linear_names(f"{p}.mlp.{name}", q + ("mlp", name), bias=False)
  return out + norm_names(f"{prefix}.norm", lm + ("norm",), False)


# ----------------------------------------------------------------------------------------------
# Processor hooks shared by the families (numpy)


def vision_position_ids(grid_thw: np.ndarray, merge_size: int) -> np.ndarray:
  """Per-patch (row, column) ids `[P, 2]` in the merge-block-major patch order of the processor."""
  out = []
  for t, h, w in np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3):
    hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge_size, merge_size, w // merge_size, merge_size)
    hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    out.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
  return np.concatenate(out, 0).astype(np.int32) if out else np.zeros((0, 2), np.int32)


def placeholder_text(kind: str, thw, cfg, merge_size: int, **video_timing) -> str:
  """One vision item's placeholder run; `video_timing` (frame counts) only matters to Qwen3-VL."""
  n = int(np.prod(thw)) // merge_size**2
  pad = "<|image_pad|>" if kind == "image" else "<|video_pad|>"
  return "<|vision_start|>" + pad * n + "<|vision_end|>"


def mrope_positions(
  input_ids: np.ndarray,
  grid_thw: np.ndarray,
  image_token_id: int,
  video_token_id: int,
  merge_size: int,
  video_intervals: Sequence[float] = (),
) -> np.ndarray:
  """M-RoPE position ids `[3, T]` of one unpadded example, as transformers' `get_rope_index`
  builds them.

  Text runs count up by one. A vision item starting at `cur` gets temporal ids
  `cur + int(t * interval)` (interval 1 for images, `video_intervals[k]` for the k-th video,
  computed in float32 and truncated like torch's `.long()`; 1 when not given), row / column ids
  `cur + i`; the text after it resumes at `cur + max(h, w) / merge_size` (transformers' rule, also
  for videos)."""
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
        msg = f"more vision placeholder runs than vision items (token {start})"
        raise ValueError(msg) from None
      gh, gw = h // merge_size, w // merge_size
      if t * gh * gw != n:
        raise ValueError(
          f"vision item at token {start} has {n} placeholders but its grid "
          f"{t}x{h}x{w} needs {t * gh * gw}"
        )
      interval = np.float32(next(intervals, 1.0)) if kind == 2 else np.float32(1.0)
      temporal = (np.arange(t).astype(np.float32) * interval).astype(np.int64)
      tt, hh, ww = np.meshgrid(temporal, np.arange(gh), np.arange(gw), indexing="ij")
      pos.append(np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + cur)
      cur += max(gh, gw)
    start += n
  return (np.concatenate(pos, axis=1) if pos else np.zeros((3, 0))).astype(np.int32)
