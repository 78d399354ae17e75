"""Qwen2-VL in Flax NNX, matching transformers' `modeling_qwen2_vl.py`.

Vision tower: patch embedding (a Conv3d with stride = kernel, i.e. a matmul over flattened
`[C*tp*p*p]` patches), 2-D axial rotary, pre-LayerNorm blocks with QuickGELU MLPs, attention
restricted to each image / video frame (block-diagonal segment mask instead of `cu_seqlens`, so a
padded patch budget keeps shapes static), and a patch merger (LayerNorm → concatenate merge_size²
neighbours → MLP). Language model: the Qwen2 decoder (GQA, q/k/v bias, SwiGLU, RMSNorm) with
multimodal RoPE split by `mrope_section`. Merged vision tokens replace the `<|image_pad|>` /
`<|video_pad|>` embeddings in order of appearance. See mrm_jax/models/__init__.py for the
family-module interface this file implements.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mrm_jax.errors import UserError
from mrm_jax.models import common
from mrm_jax.models.common import GatedMLP, LayerNorm, Linear, MLP, RMSNorm

MODEL_TYPE = "qwen2_vl"

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_DEFAULTS = dict(patch_size=14, temporal_patch_size=2, merge_size=2, image_mean=OPENAI_CLIP_MEAN,
                      image_std=OPENAI_CLIP_STD, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
VIDEO_DEFAULTS = dict(IMAGE_DEFAULTS, min_pixels=128 * 28 * 28, max_pixels=28 * 28 * 768)


# ----------------------------------------------------------------------------------------------
# Configuration

@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  embed_dim: int = 1280
  hidden_size: int = 3584          # output of the merger = LM hidden size
  mlp_ratio: float = 4
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  spatial_merge_size: int = 2
  temporal_patch_size: int = 2
  hidden_act: str = "quick_gelu"
  rope_theta: float = 10000.0

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


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
  initializer_range: float = 0.02   # std of random init (transformers reads the text config's)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


_TEXT_KEYS = [f.name for f in dataclasses.fields(TextConfig)]
_VISION_KEYS = [f.name for f in dataclasses.fields(VisionConfig)]


def _rope_fields(d: dict) -> dict:
  """rope_theta / mrope_section from any of the layouts the hub has used."""
  out = {}
  rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
  theta = rope.get("rope_theta", d.get("rope_theta"))
  if theta is not None:
    out["rope_theta"] = float(theta)
  if rope.get("mrope_section") is not None:
    out["mrope_section"] = tuple(int(x) for x in rope["mrope_section"])
  return out


@dataclasses.dataclass(frozen=True)
class Config(common.VisionLanguageConfig):
  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()

  @classmethod
  def from_hf(cls, d: dict) -> "Config":
    """Parses config.json (flat pre-v5 layout, or nested `text_config` / `vision_config`)."""
    text_d = dict(d)
    text_d.update(d.get("text_config") or {})
    text = {k: text_d[k] for k in _TEXT_KEYS if text_d.get(k) is not None}
    text.update(_rope_fields(d))
    text.update(_rope_fields(d.get("text_config") or {}))
    vis_d = dict(d.get("vision_config") or {})
    if "in_chans" in vis_d and "in_channels" not in vis_d:
      vis_d["in_channels"] = vis_d["in_chans"]
    vision = {k: vis_d[k] for k in _VISION_KEYS if vis_d.get(k) is not None}
    if (vt := _rope_fields(vis_d).get("rope_theta")) is not None:
      vision["rope_theta"] = vt
    vision.setdefault("hidden_size", text.get("hidden_size", TextConfig.hidden_size))
    top = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                              "tie_word_embeddings") if d.get(k) is not None}
    try:
      cfg = cls(text=TextConfig(**text), vision=VisionConfig(**vision), **top)
    except TypeError as e:
      raise UserError(f"config.json: {e}") from None
    cfg.validate()
    return cfg

  def validate(self) -> None:
    t, v = self.text, self.vision
    if t.hidden_size % t.num_attention_heads:
      raise UserError(f"config: hidden_size {t.hidden_size} is not a multiple of heads {t.num_attention_heads}")
    self.validate_text()
    if v.embed_dim % v.num_heads or v.hidden_size != t.hidden_size:
      raise UserError(f"config: vision embed_dim {v.embed_dim} / heads {v.num_heads} / hidden_size "
                      f"{v.hidden_size} (must equal text hidden_size {t.hidden_size})")

  def to_hf(self) -> dict:
    t, v = self.text, self.vision
    text = {k: getattr(t, k) for k in _TEXT_KEYS if k not in ("rope_theta", "mrope_section")}
    text.update(model_type="qwen2_vl_text", rope_parameters={
        "rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section)})
    vision = {k: getattr(v, k) for k in _VISION_KEYS if k != "rope_theta"}
    vision.update(model_type="qwen2_vl_vision", rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta})
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": MODEL_TYPE,
        "text_config": text,
        "vision_config": vision,
        "image_token_id": self.image_token_id,
        "video_token_id": self.video_token_id,
        "vision_start_token_id": self.vision_start_token_id,
        "vision_end_token_id": self.vision_end_token_id,
        "tie_word_embeddings": self.tie_word_embeddings,
    }


# The tiny presets' vocabulary is small, so their special tokens live at its end (Qwen's real ids,
# 151643+, would index past the embedding table).
TINY_TOKEN_IDS = dict(vision_start_token_id=504, vision_end_token_id=505, image_token_id=506, video_token_id=507)

PRESETS: dict[str, Config] = {
    "tiny": Config(
        text=TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                        mrope_section=(2, 3, 3), max_position_embeddings=4096, bos_token_id=500,
                        eos_token_id=502),
        vision=VisionConfig(depth=2, embed_dim=32, hidden_size=64, num_heads=2),
        **TINY_TOKEN_IDS),
    "qwen2-vl-2b": Config(
        text=TextConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2),
        vision=VisionConfig(hidden_size=1536), tie_word_embeddings=True),
    "qwen2-vl-7b": Config(),
}


# ----------------------------------------------------------------------------------------------
# Vision tower

class VisionAttention(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs, attention=None):
    e = cfg.embed_dim
    self.num_heads, self.head_dim, self.attention = cfg.num_heads, cfg.head_dim, attention
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = Linear(e, 3 * e, axes=("vision_embed", "vision_heads"), **kw)
    self.proj = Linear(e, e, axes=("vision_heads", "vision_embed"), **kw)

  def __call__(self, x, cos, sin, mask):
    p = x.shape[0]
    qkv = self.qkv(x).reshape(p, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    c, s = cos[:, None, :], sin[:, None, :]
    q = common.apply_rotary(q.astype(jnp.float32), c, s).astype(x.dtype)
    k = common.apply_rotary(k.astype(jnp.float32), c, s).astype(x.dtype)
    impl = None if self.attention == "cudnn" else self.attention  # arbitrary masks: XLA path
    out = common.attention(q[None], k[None], v[None], mask=mask, implementation=impl)[0]
    return self.proj(out.reshape(p, -1))


class VisionBlock(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs, attention=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = LayerNorm(cfg.embed_dim, 1e-6, axes=("vision_embed",), dtype=dtype, param_dtype=param_dtype)
    self.norm2 = LayerNorm(cfg.embed_dim, 1e-6, axes=("vision_embed",), dtype=dtype, param_dtype=param_dtype)
    self.attn = VisionAttention(cfg, attention=attention, **kw)
    self.mlp = MLP(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), act=cfg.hidden_act, **kw)

  def __call__(self, x, cos, sin, mask):
    x = x + self.attn(self.norm1(x), cos, sin, mask)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """LayerNorm, then each merge_size² consecutive patches concatenated and projected to the LM width."""

  def __init__(self, dim: int, context_dim: int, merge_size: int, *, dtype, param_dtype, rngs,
               norm: str = "layernorm"):
    self.hidden = context_dim * merge_size ** 2
    if norm == "rmsnorm":
      self.ln_q = RMSNorm(context_dim, 1e-6, axes=("vision_embed",), dtype=dtype, param_dtype=param_dtype)
    else:
      self.ln_q = LayerNorm(context_dim, 1e-6, axes=("vision_embed",), dtype=dtype, param_dtype=param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = Linear(self.hidden, self.hidden, axes=(None, "vision_mlp"), **kw)
    self.fc2 = Linear(self.hidden, dim, axes=("vision_mlp", "embed"), **kw)

  def __call__(self, x):
    x = self.ln_q(x).reshape(-1, self.hidden)
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs, attention=None, remat="none"):
    self.cfg, self.remat = cfg, remat
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.patch_embed = Linear(cfg.patch_dim, cfg.embed_dim, use_bias=False, axes=(None, "vision_embed"), **kw)
    self.blocks = nnx.List([VisionBlock(cfg, attention=attention, **kw) for _ in range(cfg.depth)])
    self.merger = PatchMerger(cfg.hidden_size, cfg.embed_dim, cfg.spatial_merge_size, **kw)

  def __call__(self, pixel_values, segment_ids, pos_ids):
    """`pixel_values [P, patch_dim]` → merged tokens `[P / merge², hidden]`."""
    x = self.patch_embed(pixel_values)
    cos, sin = common.vision_rotary_cos_sin(pos_ids, self.cfg.head_dim, self.cfg.rope_theta)
    mask = common.segment_mask(segment_ids)
    policy = common.remat_policy(self.remat)
    for blk in self.blocks:
      x = common.remat_call(blk, policy, x, cos, sin, mask)
    return self.merger(x)


# ----------------------------------------------------------------------------------------------
# Language model

class TextAttention(nnx.Module):

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs, attention=None):
    h, n, k, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    self.n, self.k, self.d, self.attention = n, k, d, attention
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = Linear(h, n * d, axes=("embed", "heads"), **kw)
    self.k_proj = Linear(h, k * d, axes=("embed", "kv_heads"), **kw)
    self.v_proj = Linear(h, k * d, axes=("embed", "kv_heads"), **kw)
    self.o_proj = Linear(n * d, h, use_bias=False, axes=("heads", "embed"), **kw)

  def __call__(self, x, cos, sin, key_mask):
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.n, self.d)
    k = self.k_proj(x).reshape(b, t, self.k, self.d)
    v = self.v_proj(x).reshape(b, t, self.k, self.d)
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    q, k = common.apply_rotary(q, c, s), common.apply_rotary(k, c, s)
    out = common.attention(q, k, v, causal=True, key_mask=key_mask, implementation=self.attention)
    return self.o_proj(out.reshape(b, t, self.n * self.d))


class DecoderLayer(nnx.Module):
  """Pre-norm decoder block; `attention_cls` is the family's self-attention (Qwen3-VL adds q/k norms)."""

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs, attention=None, attention_cls=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, axes=("embed",), dtype=dtype,
                                   param_dtype=param_dtype)
    self.self_attn = (attention_cls or TextAttention)(cfg, attention=attention, **kw)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, axes=("embed",), dtype=dtype,
                                            param_dtype=param_dtype)
    self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act, **kw)

  def __call__(self, x, cos, sin, key_mask):
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, key_mask)
    return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nnx.Module):

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs, attention=None, remat="none"):
    self.cfg, self.remat = cfg, remat
    self.embed_tokens = common.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                     rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                         attention=attention) for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, axes=("embed",), dtype=dtype, param_dtype=param_dtype)

  def __call__(self, embeds, position_ids, attention_mask):
    cos, sin = common.mrope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.mrope_section)
    policy = common.remat_policy(self.remat)
    x = embeds
    for layer in self.layers:
      x = common.remat_call(layer, policy, x, cos, sin, attention_mask)
    return self.norm(x)


class Backbone(nnx.Module):
  """Vision tower + Qwen2 decoder; `__call__(batch)` → last hidden state `[B, T, H]` (after the norm)."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               attention: str | None = None, remat: str = "none"):
    self.config = cfg
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, attention=attention, remat=remat)
    with common.init_std(cfg.text.initializer_range):
      self.visual = VisionTower(cfg.vision, **kw)
      self.language_model = TextModel(cfg.text, **kw)

  def __call__(self, batch: dict[str, Any]) -> jax.Array:
    ids = jnp.asarray(batch["input_ids"])
    embeds = self.language_model.embed_tokens(ids)
    pixels = batch.get("pixel_values")
    if pixels is not None and pixels.shape[0] > 0:
      vis = self.visual(jnp.asarray(pixels), jnp.asarray(batch["vision_segment_ids"]),
                        jnp.asarray(batch["vision_pos_ids"]))
      embeds = common.scatter_vision_tokens(embeds, ids, vis, (self.config.image_token_id,
                                                               self.config.video_token_id))
    return self.language_model(embeds, jnp.asarray(batch["position_ids"]), jnp.asarray(batch["attention_mask"]))


# ----------------------------------------------------------------------------------------------
# HF parameter names

def _linear(prefix: str, path: tuple, bias: bool = True) -> list[tuple[str, tuple, str]]:
  out = [(f"{prefix}.weight", path + ("kernel",), "linear")]
  if bias:
    out.append((f"{prefix}.bias", path + ("bias",), "copy"))
  return out


def _norm(prefix: str, path: tuple, bias: bool) -> list[tuple[str, tuple, str]]:
  out = [(f"{prefix}.weight", path + ("scale",), "copy")]
  if bias:
    out.append((f"{prefix}.bias", path + ("bias",), "copy"))
  return out


def text_param_map(cfg: TextConfig, prefix: str = "model.language_model") -> list[tuple[str, tuple, str]]:
  """HF names of the Qwen2 decoder (shared by the Qwen2.5-VL family)."""
  lm = ("language_model",)
  out = [(f"{prefix}.embed_tokens.weight", lm + ("embed_tokens", "embedding"), "copy")]
  for i in range(cfg.num_hidden_layers):
    p, q = f"{prefix}.layers.{i}", lm + ("layers", i)
    out += _norm(f"{p}.input_layernorm", q + ("input_layernorm",), False)
    out += _norm(f"{p}.post_attention_layernorm", q + ("post_attention_layernorm",), False)
    for name in ("q_proj", "k_proj", "v_proj"):
      out += _linear(f"{p}.self_attn.{name}", q + ("self_attn", name))
    out += _linear(f"{p}.self_attn.o_proj", q + ("self_attn", "o_proj"), bias=False)
    for name in ("gate_proj", "up_proj", "down_proj"):
      out += _linear(f"{p}.mlp.{name}", q + ("mlp", name), bias=False)
  out += _norm(f"{prefix}.norm", lm + ("norm",), False)
  return out


def hf_param_map(cfg: Config) -> list[tuple[str, tuple, str]]:
  v, vp = "model.visual", ("visual",)
  out = [(f"{v}.patch_embed.proj.weight", vp + ("patch_embed", "kernel"), "patch_embed")]
  for i in range(cfg.vision.depth):
    p, q = f"{v}.blocks.{i}", vp + ("blocks", i)
    out += _norm(f"{p}.norm1", q + ("norm1",), True)
    out += _norm(f"{p}.norm2", q + ("norm2",), True)
    out += _linear(f"{p}.attn.qkv", q + ("attn", "qkv"))
    out += _linear(f"{p}.attn.proj", q + ("attn", "proj"))
    out += _linear(f"{p}.mlp.fc1", q + ("mlp", "fc1"))
    out += _linear(f"{p}.mlp.fc2", q + ("mlp", "fc2"))
  out += _norm(f"{v}.merger.ln_q", vp + ("merger", "ln_q"), True)
  out += _linear(f"{v}.merger.mlp.0", vp + ("merger", "fc1"))
  out += _linear(f"{v}.merger.mlp.2", vp + ("merger", "fc2"))
  return out + text_param_map(cfg.text)


# ----------------------------------------------------------------------------------------------
# Processor hooks (numpy)

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


def vision_patch_arrays(grid_thw: np.ndarray, cfg: Config) -> dict[str, np.ndarray]:
  return {"vision_pos_ids": vision_position_ids(grid_thw, cfg.merge_size)}


def placeholder_text(kind: str, thw, cfg: Config, merge_size: int, **video_timing) -> str:
  """One vision item's placeholder run; `video_timing` (frame counts) only matters to Qwen3-VL."""
  n = int(np.prod(thw)) // merge_size ** 2
  pad = "<|image_pad|>" if kind == "image" else "<|video_pad|>"
  return "<|vision_start|>" + pad * n + "<|vision_end|>"


def rope_index(input_ids: np.ndarray, grid_thw: np.ndarray, cfg: Config) -> np.ndarray:
  """M-RoPE position ids `[3, T]` of one unpadded example (transformers' `get_rope_index`)."""
  ids = np.asarray(input_ids).reshape(-1)
  types = np.where(ids == cfg.image_token_id, 1, np.where(ids == cfg.video_token_id, 2, 0))
  grids = iter(np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3))
  m = cfg.merge_size
  pos, cur, start = [], 0, 0
  for kind, group in itertools.groupby(types.tolist()):
    n = len(list(group))
    if kind == 0:
      pos.append(np.broadcast_to(np.arange(n) + cur, (3, n)))
      cur += n
    else:
      t, h, w = next(grids)
      gt, gh, gw = t, h // m, w // m
      if gt * gh * gw != n:
        raise ValueError(f"vision item at token {start} has {n} placeholders but its grid {t}x{h}x{w} "
                         f"needs {gt * gh * gw}")
      tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
      pos.append(np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + cur)
      cur += max(gh, gw)
    start += n
  return (np.concatenate(pos, axis=1) if pos else np.zeros((3, 0))).astype(np.int32)
