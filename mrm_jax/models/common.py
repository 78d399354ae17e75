"""Building blocks shared by the Qwen-VL families, written to match transformers' math.

Conventions (every family follows them, so HF weights map mechanically):
- `Linear.kernel` is `[in, out]` (the transpose of torch's `[out, in]` weight); `Linear.bias`
  `[out]`.
- Norm weights are called `scale` (and `bias` for LayerNorm); embeddings `embedding` `[vocab, H]`.
- Parameters carry logical axis names (docs/internals.md) as NNX sharding metadata, created with
  `eager_sharding=False` so a model can be built without a mesh; `mrm_jax.train.sharding` places
  them.
- Parameters are stored in `param_dtype` (fp32 by default); matmuls run in `dtype` (the compute
  dtype); norms, softmax statistics and rotary angles are computed in float32 as transformers does.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from flax import nnx

Axes = tuple[str | None, ...]

INIT_STD = 0.02  # transformers' initializer_range for every Qwen-VL config


_ABSTRACT = threading.local()
_INIT = threading.local()


@contextlib.contextmanager
def init_std(std: float | None):
  """Inside this context `Linear` / `Embed` draw from normal(std) instead of `INIT_STD`: a config's
  `initializer_range`, which transformers' `_init_weights` honours too (tiny models train from a
  wider init). None keeps the current value."""
  prev = getattr(_INIT, "std", None)
  _INIT.std = prev if std is None else float(std)
  try:
    yield
  finally:
    _INIT.std = prev


def default_init_std() -> float:
  return getattr(_INIT, "std", None) or INIT_STD


@contextlib.contextmanager
def abstract_params():
  """Inside this context parameters are created as `jax.ShapeDtypeStruct`s (with their metadata) and
  no initializer runs: an abstract model like `nnx.eval_shape` gives, built in linear time (tracing
  a 7B model's initializers under eval_shape takes tens of seconds). Used by the HF loader, which
  fills
  in every parameter, and for parameter counts."""
  prev = getattr(_ABSTRACT, "on", False)
  _ABSTRACT.on = True
  try:
    yield
  finally:
    _ABSTRACT.on = prev


def make_param(
  key, init: Callable, shape: Sequence[int], axes: Axes, param_dtype=jnp.float32
) -> nnx.Param:
  """An `nnx.Param` with logical-axis metadata. `key` may be None for deterministic initializers."""
  if getattr(_ABSTRACT, "on", False):
    return nnx.Param(
      jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(param_dtype)),
      out_sharding=tuple(axes),
      eager_sharding=False,
    )
  init = nnx.with_partitioning(init, tuple(axes), eager_sharding=False)
  return nnx.Param(init(jax.random.key(0) if key is None else key, tuple(shape), param_dtype))


class Linear(nnx.Module):
  """`y = x @ kernel + bias` with kernel `[in, out]`, computed in `dtype`."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    axes: Axes = (None, None),
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
    init_std: float | None = None,
  ):
    self.in_features, self.out_features = in_features, out_features
    init_std = default_init_std() if init_std is None else init_std
    self.dtype = dtype
    # one key per layer: drawing from `rngs` is the slow part of building (or eval_shape-ing) big
    # models
    key = None if getattr(_ABSTRACT, "on", False) else rngs.params()
    self.kernel = make_param(
      key, nnx.initializers.normal(init_std), (in_features, out_features), axes, param_dtype
    )
    self.bias = (
      make_param(None, nnx.initializers.zeros_init(), (out_features,), (axes[1],), param_dtype)
      if use_bias
      else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding table `[vocab, H]` (logical axes `("vocab", "embed")`)."""

  def __init__(
    self,
    num_embeddings: int,
    features: int,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None,
    axes: Axes = ("vocab", "embed"),
  ):
    self.dtype = dtype
    key = None if getattr(_ABSTRACT, "on", False) else rngs.params()
    self.embedding = make_param(
      key,
      nnx.initializers.normal(default_init_std()),
      (num_embeddings, features),
      axes,
      param_dtype,
    )

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
  """transformers' `Qwen2RMSNorm`: statistics in fp32, cast back, then scaled."""

  def __init__(
    self,
    dim: int,
    eps: float = 1e-6,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
    axes: Axes = (None,),
  ):
    self.eps, self.dtype = eps, dtype
    self.scale = make_param(None, nnx.initializers.ones_init(), (dim,), axes, param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    in_dtype = x.dtype
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.dtype) * h.astype(in_dtype).astype(self.dtype)


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm (biased variance), computed in fp32, output in `dtype`."""

  def __init__(
    self,
    dim: int,
    eps: float = 1e-6,
    *,
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
    axes: Axes = (None,),
  ):
    self.eps, self.dtype = eps, dtype
    self.scale = make_param(None, nnx.initializers.ones_init(), (dim,), axes, param_dtype)
    self.bias = (
      make_param(None, nnx.initializers.zeros_init(), (dim,), axes, param_dtype)
      if use_bias
      else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.astype(jnp.float32)
    mean = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
    h = (h - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      h = h + self.bias[...].astype(jnp.float32)
    return h.astype(self.dtype)


# ----------------------------------------------------------------------------------------------
# Activations and MLPs


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable] = {
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "quick_gelu": quick_gelu,
  "relu": jax.nn.relu,
}


def activation(name: str) -> Callable:
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation '{name}' (known: {', '.join(sorted(ACTIVATIONS))})")
  return ACTIVATIONS[name]


class GatedMLP(nnx.Module):
  """SwiGLU-style `down(act(gate(x)) * up(x))` (Qwen2 decoder MLP; Qwen2.5-VL vision MLP with
  bias)."""

  def __init__(
    self,
    dim: int,
    hidden: int,
    *,
    act: str = "silu",
    use_bias: bool = False,
    axes: tuple[str | None, str | None] = ("embed", "mlp"),
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None,
  ):
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = Linear(dim, hidden, axes=axes, **kw)
    self.up_proj = Linear(dim, hidden, axes=axes, **kw)
    self.down_proj = Linear(hidden, dim, axes=(axes[1], axes[0]), **kw)
    self.act = act

  def __call__(self, x):
    return self.down_proj(activation(self.act)(self.gate_proj(x)) * self.up_proj(x))


class MLP(nnx.Module):
  """`fc2(act(fc1(x)))` (Qwen2-VL vision MLP, QuickGELU by default)."""

  def __init__(
    self,
    dim: int,
    hidden: int,
    *,
    act: str = "quick_gelu",
    use_bias: bool = True,
    axes: tuple[str | None, str | None] = ("vision_embed", "vision_mlp"),
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None,
  ):
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = Linear(dim, hidden, axes=axes, **kw)
    self.fc2 = Linear(hidden, dim, axes=(axes[1], axes[0]), **kw)
    self.act = act

  def __call__(self, x):
    return self.fc2(activation(self.act)(self.fc1(x)))


# ----------------------------------------------------------------------------------------------
# Rotary embeddings


def rotate_half(x):
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
  """`x * cos + rotate_half(x) * sin`; `cos/sin` broadcast against `x` ([..., T, D] vs [..., T, N,
  D])."""
  return x * cos + rotate_half(x) * sin


def rope_inv_freq(dim: int, theta: float) -> np.ndarray:
  """`1 / theta^(2i/dim)` for i < dim/2, in float32 like transformers."""
  return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(
    np.float32
  )


def mrope_cos_sin(
  position_ids, head_dim: int, theta: float, mrope_section: Sequence[int], interleaved: bool = False
):
  """Multimodal RoPE. `position_ids [3, B, T]` (temporal, height, width) → `cos, sin [B, T,
  head_dim]` fp32.

  Chunked (Qwen2-VL / Qwen2.5-VL): the frequency axis is split into `mrope_section` chunks taken
  from the t, h, w positions in turn. Interleaved (Qwen3-VL): frequency i uses h when i % 3 == 1 and
  i < 3*section[1], w when i % 3 == 2 and i < 3*section[2], t otherwise.
  """
  inv_freq = jnp.asarray(rope_inv_freq(head_dim, theta))
  freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, T, D/2]
  n = inv_freq.shape[0]
  if interleaved:
    idx = np.arange(n)
    src = np.zeros(n, np.int32)
    src[(idx % 3 == 1) & (idx < 3 * mrope_section[1])] = 1
    src[(idx % 3 == 2) & (idx < 3 * mrope_section[2])] = 2
  else:
    if sum(mrope_section) != n:
      raise ValueError(f"mrope_section {list(mrope_section)} must sum to head_dim/2 = {n}")
    src = np.concatenate([np.full(s, i % 3, np.int32) for i, s in enumerate(mrope_section)])
  onehot = jnp.asarray(np.eye(3, dtype=np.float32)[src].T)  # [3, D/2]
  freqs = jnp.einsum("sbtd,sd->btd", freqs, onehot)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def vision_rotary_cos_sin(pos_hw, head_dim: int, theta: float = 10000.0):
  """2-D axial rotary of the Qwen vision towers: `pos_hw [P, 2]` → `cos, sin [P, head_dim]` fp32.

  Frequencies use `head_dim // 2` (shared by rows and columns); the angle vector is
  `[h*f, w*f, h*f, w*f]` so that rotate_half pairs each h angle with itself."""
  inv_freq = jnp.asarray(rope_inv_freq(head_dim // 2, theta))
  freqs = pos_hw.astype(jnp.float32)[..., None] * inv_freq  # [P, 2, D/4]
  hw = jnp.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)
  emb = jnp.concatenate([hw, hw], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


# ----------------------------------------------------------------------------------------------
# Attention

ATTENTION_CHOICES = ("auto", "xla", "cudnn")
_LOGGED: set = set()


def resolve_attention(
  requested: str | None, dtype, platform: str | None = None, head_dims: Sequence[int] = ()
) -> str:
  """The attention implementation to build: "xla" or "cudnn". `requested` None / "auto" picks
  cuDNN's fused kernel on NVIDIA GPUs when the compute dtype is bf16 / fp16 and every head dim
  suits it (a multiple of 8, at most 128), else XLA (cuDNN has no fp32 kernel). `platform`:
  "cuda", "rocm", "cpu", "tpu" (default: this process's backend). The choice is logged once."""
  req = "auto" if requested in (None, "") else str(requested)
  if req not in ATTENTION_CHOICES:
    raise ValueError(f"unknown attention '{requested}' ({' | '.join(ATTENTION_CHOICES)})")
  if req != "auto":
    return req
  platform = default_platform() if platform is None else platform
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  heads_ok = all(d % 8 == 0 and d <= 128 for d in head_dims)
  choice = "cudnn" if platform == "cuda" and half and heads_ok else "xla"
  key = (platform, str(jnp.dtype(dtype)), tuple(head_dims), choice)
  if key not in _LOGGED:
    _LOGGED.add(key)
    logging.getLogger(__name__).info(
      "attention auto -> %s (platform %s, dtype %s, head dims %s)",
      choice,
      platform,
      jnp.dtype(dtype),
      list(head_dims),
    )
  return choice


def default_platform() -> str:
  """ "cuda" / "rocm" for GPUs (by the runtime's platform version), else the backend's name."""
  backend = jax.default_backend()
  if backend != "gpu":
    return backend
  version = jax.extend.backend.get_backend().platform_version.lower()
  return "rocm" if "rocm" in version or "hip" in version else "cuda"


def attention(
  q, k, v, *, mask=None, causal: bool = False, key_mask=None, implementation: str | None = None
):
  """Scaled dot-product attention via `jax.nn.dot_product_attention`.

  q `[B, T, N, D]`, k/v `[B, S, K, D]` with N a multiple of K (GQA handled natively).
  `mask`: optional boolean `[B, 1|N, T, S]` (True = attend). `key_mask` `[B, S]` (1 = real token)
  with
  `causal` gives the LM mask (works for left or right padding). `implementation`: None (let JAX
  pick), "xla" or "cudnn". cuDNN takes no arbitrary mask here, so it gets `is_causal` plus per-row
  key lengths, which is exact for right-padded batches (what `collate` produces).
  """
  if implementation in (None, "auto"):
    implementation = None
  if implementation == "cudnn" and mask is None:
    # an empty row (length 0) would give cuDNN nothing to normalise over: NaN
    lengths = None if key_mask is None else jnp.maximum(jnp.sum(key_mask.astype(jnp.int32), -1), 1)
    return jax.nn.dot_product_attention(
      q, k, v, is_causal=causal, key_value_seq_lengths=lengths, implementation="cudnn"
    )
  if key_mask is not None:
    km = key_mask.astype(bool)[:, None, None, :]
    mask = km if mask is None else (mask & km)
  if causal:
    t, s = q.shape[1], k.shape[1]
    cm = jnp.tril(jnp.ones((t, s), bool), k=s - t)[None, None]
    mask = cm if mask is None else (mask & cm)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


class PairLayout(NamedTuple):
  """The shared-prompt pair layout of a text batch (mrm_jax/models/pair_layout.py): `b_index
  [B, S]`, `r_index [B, R]`, `lengths [B, 3]`, `r_slot [B, T]`."""

  b_index: jax.Array
  r_index: jax.Array
  lengths: jax.Array
  r_slot: jax.Array


PAIR_LAYOUT_KEYS = ("pair_b_index", "pair_r_index", "pair_lengths", "pair_r_slot")


def pair_layout(batch) -> PairLayout | None:
  if "pair_b_index" not in batch:
    return None
  return PairLayout(*(jnp.asarray(batch[k]) for k in PAIR_LAYOUT_KEYS))


def pair_attention(q, k, v, layout: PairLayout, implementation: str | None = None):
  """Attention of packed pair rows: q `[B, T, N, D]`, k/v `[B, T, K, D]` → `[B, T, N, D]`.

  Sequence A (prefix + chosen) is the row's start: one causal call on the first S positions with
  A's key length (the rejected tokens among them get outputs that are not used). The rejected
  response's own tokens are gathered as queries `[B, R]` against sequence B's keys `[B, S]`
  (prefix + rejected) under B's causal mask, so the prefix is attended to once; their outputs go
  back to their packed positions. cuDNN runs the first call as padded causal attention and the
  second with the mask as a bias."""
  s, t, r = layout.b_index.shape[1], q.shape[1], layout.r_index.shape[1]
  span = jnp.arange(s, dtype=jnp.int32)
  lengths = layout.lengths.astype(jnp.int32)
  out_a = attention(
    q[:, :s],
    k[:, :s],
    v[:, :s],
    causal=True,
    key_mask=span[None, :] < lengths[:, :1],
    implementation=implementation,
  )

  def gather(x, index):
    return jnp.take_along_axis(x, index.astype(jnp.int32)[:, :, None, None], axis=1)

  # query m of row b is B's token prefix + m: it sees B's keys up to itself (at least one key)
  query_pos = lengths[:, 2:3] + jnp.arange(r, dtype=jnp.int32)[None, :]
  last = jnp.maximum(jnp.minimum(query_pos, lengths[:, 1:2] - 1), 0)
  mask = span[None, None, :] <= last[:, :, None]
  impl = None if implementation in (None, "auto") else implementation
  if impl == "cudnn" and (r % 2 or s % 2):
    impl = "xla"  # cuDNN trains with a bias only for even lengths (the configured buckets are)
  out_r = jax.nn.dot_product_attention(
    gather(q, layout.r_index),
    gather(k, layout.b_index),
    gather(v, layout.b_index),
    mask=mask[:, None],
    implementation=impl,
  )
  out_a = jnp.pad(out_a, ((0, 0), (0, t - s), (0, 0), (0, 0)))
  slot = layout.r_slot.astype(jnp.int32)
  from_r = gather(out_r, jnp.maximum(slot - 1, 0))
  return jnp.where((slot > 0)[:, :, None, None], from_r, out_a)


class ItemLayout(NamedTuple):
  """Per-item attention layout (see mrm_jax/models/vision_layout.py): `index [R, L]` patch of each
  slot, `lengths [R]` patches per row, `slot [P, 2]` (row, column) of each patch."""

  index: jax.Array
  lengths: jax.Array
  slot: jax.Array


def item_layout(batch, prefix: str) -> ItemLayout | None:
  """The `ItemLayout` of `<prefix>_*` batch arrays, or None when the batch has none."""
  if f"{prefix}_index" not in batch:
    return None
  return ItemLayout(*(jnp.asarray(batch[f"{prefix}{s}"]) for s in ("_index", "_lengths", "_slot")))


def item_attention(q, k, v, layout: ItemLayout, implementation: str | None = None):
  """Attention within each item of a flat patch sequence: q/k/v `[P, N, D]` → `[P, N, D]`.

  Each row of the layout gathers one item's patches; rows attend independently under a padding
  mask (per-row key lengths, which cuDNN takes natively), then every patch reads its own slot. An
  empty row gets length 1 so its (unused) outputs stay finite."""
  n_rows, width = layout.index.shape
  flat = layout.index.reshape(-1)
  rows = [jnp.take(t, flat, axis=0).reshape((n_rows, width) + t.shape[1:]) for t in (q, k, v)]
  lengths = jnp.maximum(layout.lengths.astype(jnp.int32), 1)
  impl = "cudnn" if implementation == "cudnn" else "xla"
  out = jax.nn.dot_product_attention(
    *rows, query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation=impl
  )
  where = layout.slot[:, 0].astype(jnp.int32) * width + layout.slot[:, 1].astype(jnp.int32)
  return jnp.take(out.reshape((n_rows * width,) + out.shape[2:]), where, axis=0)


def segment_mask(segment_ids):
  """Block-diagonal mask `[1, 1, P, P]` from per-patch segment ids (attend within equal ids)."""
  return (segment_ids[:, None] == segment_ids[None, :])[None, None]


def scatter_vision_tokens(
  embeds, input_ids, vision_embeds, token_ids: Sequence[int], row_offsets=None
):
  """Replaces the embeddings at placeholder positions (`input_ids` in `token_ids`) by
  `vision_embeds`, consumed in row-major order (transformers' `masked_scatter`), or, given
  `row_offsets [B]`, row b's placeholders from `vision_embeds[row_offsets[b]]` on (rows may share
  tokens). `vision_embeds
  [M, H]` may hold more rows (padding) than placeholders; extra rows are ignored."""
  is_vis = jnp.zeros(input_ids.shape, bool)
  for t in token_ids:
    is_vis = is_vis | (input_ids == t)
  if row_offsets is None:
    idx = jnp.cumsum(is_vis.reshape(-1).astype(jnp.int32)) - 1
  else:
    within = jnp.cumsum(is_vis.astype(jnp.int32), axis=-1) - 1
    idx = (within + jnp.asarray(row_offsets, jnp.int32)[:, None]).reshape(-1)
  idx = jnp.clip(idx, 0, max(vision_embeds.shape[0] - 1, 0))
  gathered = jnp.take(vision_embeds, idx, axis=0).reshape(embeds.shape).astype(embeds.dtype)
  return jnp.where(is_vis[..., None], gathered, embeds)


def remat_policy(name: str | None):
  """Activation checkpointing policy by name: none | full | dots (save matmul outputs)."""
  if name in (None, "", "none"):
    return None
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  if name == "dots":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  raise ValueError(f"unknown remat policy '{name}' (none | full | dots)")


def remat_call(layer: nnx.Module, policy, *args):
  """`layer(*args)`, recomputed in the backward pass under the checkpoint `policy` (None: plain
  call).

  The checkpointed function is a pure function of the layer's split state, not `nnx.remat`: under
  `jax.grad` of a model merged inside the traced loss (the train step), nnx.remat's write-back of
  the layer's state raises flax's TraceContextError. These layers never mutate their state, so
  nothing needs writing back."""
  if policy is None:
    return layer(*args)
  graphdef, state = nnx.split(layer)

  def pure(state, *args):
    return nnx.merge(graphdef, state)(*args)

  return jax.checkpoint(pure, policy=policy)(state, *args)


def apply_layers(
  layers: Sequence[nnx.Module],
  remat: str | None,
  x,
  *args,
  layer_args: Callable[[int], tuple] | None = None,
  after: Callable[[int, jax.Array], jax.Array] | None = None,
):
  """`x` through each of `layers` in turn, each call checkpointed under `remat_policy(remat)`.

  Layer i gets `(x, *args)`, or `(x, *layer_args(i))` when `layer_args` is given (per-block masks);
  `after(i, x)` then replaces x (DeepStack injection, feature taps); it runs outside the
  checkpoint."""
  policy = remat_policy(remat)
  for i, layer in enumerate(layers):
    x = remat_call(layer, policy, x, *(args if layer_args is None else layer_args(i)))
    if after is not None:
      x = after(i, x)
  return x


def count_params(module: nnx.Module) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param))))
