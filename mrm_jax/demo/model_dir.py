"""The world's model directory: a tiny Qwen2-VL checkpoint without weights.

Written in the layout of a real HF checkpoint (transformers 5's `Qwen2VLConfig` save
format with `text_config` / `vision_config`, Qwen2-VL's tokenizer files and image
processor config), so the rest of the code loads it exactly like a downloaded model;
parameters are random-initialised from `config.json` because there is no weights file.
Images of the world are 56×56: with 14-pixel patches merged 2×2 that is a 4×4 patch
grid and 4 image tokens, and `min_pixels`/`max_pixels` keep `smart_resize` at 56×56.
"""

from __future__ import annotations

from pathlib import Path

from mrm_jax.demo import tokenizer as world_tokenizer
from mrm_jax.io import atomic_open, write_json

TEXT_DIMS = {
  "hidden_size": 64,
  "intermediate_size": 128,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "mrope_section": [2, 3, 3],
}  # head_dim 16 → 8 rotary pairs
VISION_DIMS = {"depth": 2, "embed_dim": 64, "num_heads": 4, "mlp_ratio": 2}
# Std of the random init (config.json `initializer_range`, honoured by transformers and by
# mrm_jax.models.qwen2_vl). Qwen's 0.02 leaves a model this small with near-uniform attention and a
# last-token state that barely depends on the image: it then sits on the 0.693 loss plateau for
# hundreds of steps; a wider init lets image features reach the reward from the first steps.
INITIALIZER_RANGE = 0.1
MIN_PIXELS = 28 * 28
MAX_PIXELS = 64 * 64
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]  # Qwen2-VL's (CLIP's) normalisation
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def model_config(tok_ids: dict[str, int], vocab_size: int) -> dict:
  """config.json of a Qwen2-VL model (transformers 5 layout)."""
  t, v = TEXT_DIMS, VISION_DIMS
  return {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "image_token_id": tok_ids["<|image_pad|>"],
    "model_type": "qwen2_vl",
    "text_config": {
      "attention_dropout": 0.0,
      "bos_token_id": tok_ids["<|endoftext|>"],
      "eos_token_id": tok_ids["<|im_end|>"],
      "hidden_act": "silu",
      "hidden_size": t["hidden_size"],
      "initializer_range": INITIALIZER_RANGE,
      "intermediate_size": t["intermediate_size"],
      "layer_types": ["full_attention"] * t["num_hidden_layers"],
      "max_position_embeddings": 4096,
      "max_window_layers": t["num_hidden_layers"],
      "model_type": "qwen2_vl_text",
      "num_attention_heads": t["num_attention_heads"],
      "num_hidden_layers": t["num_hidden_layers"],
      "num_key_value_heads": t["num_key_value_heads"],
      "pad_token_id": None,
      "rms_norm_eps": 1e-06,
      "rope_parameters": {
        "mrope_section": list(t["mrope_section"]),
        "rope_theta": 10000.0,
        "rope_type": "default",
      },
      "sliding_window": None,
      "use_cache": True,
      "use_sliding_window": False,
      "vocab_size": vocab_size,
    },
    "tie_word_embeddings": False,
    "video_token_id": tok_ids["<|video_pad|>"],
    "vision_config": {
      "depth": v["depth"],
      "embed_dim": v["embed_dim"],
      "hidden_act": "quick_gelu",
      "hidden_size": t["hidden_size"],  # the merger's output: the LM's hidden size
      "in_channels": 3,
      "initializer_range": INITIALIZER_RANGE,
      "mlp_ratio": v["mlp_ratio"],
      "model_type": "qwen2_vl_vision",
      "num_heads": v["num_heads"],
      "patch_size": 14,
      "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"},
      "spatial_merge_size": 2,
      "temporal_patch_size": 2,
    },
    "vision_end_token_id": tok_ids["<|vision_end|>"],
    "vision_start_token_id": tok_ids["<|vision_start|>"],
  }


def preprocessor_config() -> dict:
  return {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": IMAGE_MEAN,
    "image_processor_type": "Qwen2VLImageProcessor",
    "image_std": IMAGE_STD,
    "max_pixels": MAX_PIXELS,
    "merge_size": 2,
    "min_pixels": MIN_PIXELS,
    "patch_size": 14,
    "processor_class": "Qwen2VLProcessor",
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"longest_edge": MAX_PIXELS, "shortest_edge": MIN_PIXELS},
    "temporal_patch_size": 2,
  }


def write_model_dir(out: str | Path) -> dict:
  """Writes config.json, tokenizer.json, tokenizer_config.json, chat_template.json and
  preprocessor_config.json into `out`; returns a summary for world.json."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  tok = world_tokenizer.build_tokenizer()
  n_tokens = tok.get_vocab_size(with_added_tokens=True)
  vocab_size = -(-n_tokens // 64) * 64  # padded like Qwen's embedding table
  ids = {t: tok.token_to_id(t) for t in world_tokenizer.SPECIAL_TOKENS}
  with atomic_open(out / "tokenizer.json") as f:
    f.write(tok.to_str(pretty=True))
  write_json(out / "tokenizer_config.json", world_tokenizer.tokenizer_config(tok))
  write_json(out / "chat_template.json", {"chat_template": world_tokenizer.CHAT_TEMPLATE})
  write_json(out / "preprocessor_config.json", preprocessor_config())
  write_json(out / "config.json", model_config(ids, vocab_size))
  return {
    "path": "model",
    "tokens": n_tokens,
    "vocab_size": vocab_size,
    "image_token_id": ids["<|image_pad|>"],
    "text": dict(TEXT_DIMS),
    "vision": dict(VISION_DIMS),
  }
