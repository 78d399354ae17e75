"""Flax NNX reward models: Qwen-VL backbones, the scalar value head, and HF weight interop.

Entry points
------------
- `create_reward_model(family, preset_or_config, rngs, ...)` → `RewardModel` with random weights.
- `load_reward_model(path, dtype=..., param_dtype=...)` → `(RewardModel, Processor)` from a local HF
  directory (see `mrm_jax.models.hf_io`).
- `get_family(name)` → the family module for a `model_type` / `model.family` ("qwen2_vl",
  "qwen2_5_vl", "qwen3_vl"), imported lazily (`mrm_jax.models.families`).

LAYOUT
------
- `common`: building blocks (Linear/Embed/RMSNorm/LayerNorm/GatedMLP/MLP, rotary incl. interleaved
  M-RoPE, attention (`resolve_attention`: what "auto" means per platform; `item_attention`: per
  image / frame / window rows), `segment_mask`, `scatter_vision_tokens`, `remat_policy` /
  `remat_call` / `apply_layers` (the layer loop under activation checkpointing),
  `abstract_params` (build a shapes-only model fast, what the HF loader fills)).
- `configs`: config code shared by the families: the `VisionLanguageConfig` base, config.json
  helpers (`rope_fields`, `vision_fields`, `hf_rope_parameters`, `hf_config_errors`), the derived
  vision sizes (`VisionDims`, `HiddenSizeVisionDims`).
- `layers`: the model code the families share: `VisionAttention`, `VisionBlock`, `PatchMerger`,
  `VisionTower` (Qwen2-VL / Qwen2.5-VL), `TextAttention` / `DecoderLayer` / `TextModel` (Qwen2 and
  Qwen3 decoders), `Backbone` (embed → scatter vision tokens → decoder → final norm), the HF names
  of these layers (`linear_names`, `vision_tower_names`, `text_model_names`, ...) and the
  processor's `mrope_positions` / `vision_position_ids` / `placeholder_text`. A family picks among
  the shared
  layouts with class constants on its configs (vision: `norm`, `mlp`, and the `embed_dim` /
  `mlp_dim` / `out_dim` sizes; text: `qkv_bias`, `o_bias`, `qk_norm`, `mrope_interleaved`).
- `<family>.py` (qwen2_vl, qwen2_5_vl, qwen3_vl): only what differs: its Config / presets, its
  `Backbone` subclass (which vision tower, which batch arrays it reads), family-specific modules
  (Qwen3-VL's tower with DeepStack) and processor hooks (windows, video timing).
- `<family>_params.py`: the family's `hf_param_map`, re-exported by the family module.
- `reward` (value head), `hf_io` (HF checkpoints in / out), `processor` (numpy preprocessing),
  `vision_layout` (numpy: the per-item vision attention layout and shared vision tokens).

FAMILY MODULE INTERFACE (mrm_jax/models/<family>.py; qwen2_vl.py is the reference implementation)
--------------------------------------------------------------------------------------------------
A family module defines:

`MODEL_TYPE: str`
    The config.json `model_type` it loads ("qwen2_vl").
`Config`
    A frozen (hashable) dataclass. Must provide:
      `Config.from_hf(d: dict) -> Config`   parse a config.json dict (flat pre-v5 layout or
                                            nested `text_config`/`vision_config`); raise
                                            `UserError` on bad values.
      `cfg.to_hf() -> dict`                 config.json content that transformers' AutoConfig loads.
      `cfg.hidden_size`                     LM hidden size (input of the value head).
      `cfg.image_token_id`, `cfg.video_token_id`, `cfg.vision_start_token_id`,
      `cfg.vision_end_token_id`.
      `cfg.merge_size`                      spatial merge size (patches per LM token:
                                            merge_size**2).
      `cfg.vision.patch_dim`                C * temporal_patch_size * patch_size**2 (the width of
                                            pixel_values).
      `dataclasses.replace(cfg, ...)` must work (the tests shrink presets).
`PRESETS: dict[str, Config]`
    At least "tiny" (CPU tests) and the real sizes (e.g. "qwen2-vl-2b", "qwen2-vl-7b").
`Backbone(cfg, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32, attention=None, remat="none")`
    Usually a subclass of `layers.Backbone`: an `nnx.Module` with sub-modules `visual` (vision tower
    and merger; what `freeze_vision` freezes) and `language_model`. `__call__(batch) -> [B, T, H]`:
    the last hidden state AFTER the final norm, in `dtype`. The LM head (vocabulary projection) is
    never built or computed. `attention`: "xla" | "cudnn" (`RewardModel` resolves "auto" / None
    with `common.resolve_attention`). The batch keys it reads:
      input_ids [B,T] int32, attention_mask [B,T] int32 (1 = token), position_ids [3,B,T] int32,
      pixel_values [P, C*tp*p*p] float32 or bfloat16 (P = static patch budget, a multiple of
      merge_size**2; may be 0), vision_segment_ids [P] int32 (0 = padding patch; one id per image /
      video frame), plus the family's per-patch arrays (below), and optionally (what `collate`
      adds, see vision_layout.py) the per-item attention layouts `vision_items_*`
      (`vision_windows_*`), without which vision attention runs over the whole sequence under a
      block-diagonal mask, and `vision_token_offset [B]` (each row's first merged vision token:
      rows may share them).
      Placeholder tokens (image_token_id / video_token_id) receive the merged vision tokens in
      order of appearance (row-major over the batch).
`hf_param_map(cfg) -> list[tuple[str, tuple, str]]`  (defined in `<family>_params.py`)
    `(hf_key, nnx_path, kind)` for every parameter of `Backbone`: `hf_key` in the transformers-5
    naming (`model.language_model.*`, `model.visual.*`); `hf_io` also accepts the older hub names
    (`model.layers.*`, `model.embed_tokens.*`, `model.norm.*`, `visual.*`) by rewriting prefixes.
    `nnx_path` is the path in `nnx.state(backbone)`. `kind`: "linear" (torch `[out, in]` ↔ kernel
    `[in, out]`), "copy" (same layout), "patch_embed" (torch Conv3d `[E, C, tp, p, p]` ↔ kernel
    `[C*tp*p*p, E]`).
Processor hooks (numpy, used by `mrm_jax.models.processor`):
    `IMAGE_DEFAULTS` / `VIDEO_DEFAULTS`: dicts with patch_size, temporal_patch_size, merge_size,
      image_mean, image_std, min_pixels, max_pixels (overridden by the model dir's
      preprocessor_config.json / video_preprocessor_config.json).
    `rope_index(input_ids [T], grid_thw [n,3], cfg) -> [3, T] int32`: M-RoPE position ids of one
      unpadded example; `grid_thw` lists its vision items (images and videos) in order of
      appearance.
    `vision_patch_arrays(grid_thw [n,3], cfg) -> dict[str, np.ndarray]`: per-patch arrays of one
      example in patch order (first dim = its patch count), e.g. {"vision_pos_ids": [P, 2]}.
      `collate` pads them to the patch budget with zeros; names ending in "_segment_ids" are
      offset to stay unique across the batch (0 stays "padding").
    `placeholder_text(kind, thw, cfg, merge_size) -> str`: the text replacing one templated
      `<|vision_start|><|image_pad|><|vision_end|>` (kind "image") or `...<|video_pad|>...`
      ("video"), given the item's (t, h, w) patch grid.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mrm_jax.errors import UserError
from mrm_jax.models import hf_io
from mrm_jax.models.families import FAMILIES, get_family  # noqa: F401 - the package's API
from mrm_jax.models.processor import Processor
from mrm_jax.models.reward import RewardModel


def create_reward_model(
  family: str,
  preset_or_config,
  rngs=None,
  *,
  dtype="float32",
  param_dtype="float32",
  attention=None,
  remat="none",
  head_init="normal",
):
  """A `RewardModel` with random weights: `preset_or_config` is a preset name of the family or a
  Config."""
  fam = get_family(family)
  if isinstance(preset_or_config, str):
    if preset_or_config not in fam.PRESETS:
      raise UserError(
        f"unknown preset '{preset_or_config}' for {family} (known: {', '.join(fam.PRESETS)})"
      )
    cfg = fam.PRESETS[preset_or_config]
  else:
    cfg = preset_or_config
  rngs = rngs if rngs is not None else nnx.Rngs(0)
  return RewardModel(
    fam,
    cfg,
    rngs=rngs,
    dtype=jnp.dtype(dtype),
    param_dtype=jnp.dtype(param_dtype),
    attention=attention,
    remat=remat,
    head_init=head_init,
  )


def load_reward_model(
  path,
  *,
  dtype="float32",
  param_dtype="float32",
  attention=None,
  remat="none",
  min_pixels=None,
  max_pixels=None,
):
  """`(RewardModel, Processor)` from a local HF directory (weights + optional value head +
  tokenizer)."""
  model = hf_io.load_hf(
    path, dtype=dtype, param_dtype=param_dtype, attention=attention, remat=remat
  )
  processor = Processor.from_pretrained(
    path, model.family, model.config, min_pixels=min_pixels, max_pixels=max_pixels
  )
  return model, processor
