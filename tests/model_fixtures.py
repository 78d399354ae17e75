"""Tiny Qwen-VL fixtures shared by the model tests (importable by other families' tests):
a byte-level BPE tokenizer with the Qwen special tokens and chat template, tiny random HF configs,
transformers models saved as HF directories with a LLaMA-Factory value head, and the PyTorch oracle.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = [
  "<|endoftext|>",
  "<|im_start|>",
  "<|im_end|>",
  "<|vision_start|>",
  "<|vision_end|>",
  "<|image_pad|>",
  "<|video_pad|>",
]

# The chat template of Qwen/Qwen2-VL-7B-Instruct.
QWEN2_VL_CHAT_TEMPLATE = (
  "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for "
  "message in messages %}"
  "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
  "assistant.<|im_end|>\n"
  "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ "
  "message['content'] }}"
  "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' "
  "or 'image' in content "
  "or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if "
  "add_vision_id %}Picture "
  "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif "
  "content['type'] == 'video' "
  "or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id "
  "%}Video "
  "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' "
  "in content %}"
  "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if "
  "add_generation_prompt %}"
  "<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
  "You are a helpful assistant.",
  "What is in the image? Describe the picture in detail.",
  "A red circle on a blue background. The cat sits on the mat.",
  "Which image is better? Image 1 Image 2",
  "The answer is yes. No, the object is a green square near the top left corner.",
  "system user assistant 0123456789 .,:;!?'\"()[]{}<>-_/\\ \n\t",
]


def build_tokenizer(out_dir, vocab_size: int = 400, chat_template: str = QWEN2_VL_CHAT_TEMPLATE):
  """Trains a tiny byte-level BPE with the Qwen special tokens and saves it as an HF tokenizer dir.
  Returns the transformers tokenizer."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size - len(SPECIAL_TOKENS),
    show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(_CORPUS * 4, trainer)
  tok.add_special_tokens(SPECIAL_TOKENS)
  fast = PreTrainedTokenizerFast(
    tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
  )
  fast.chat_template = chat_template
  Path(out_dir).mkdir(parents=True, exist_ok=True)
  fast.save_pretrained(str(out_dir))
  return fast


def special_ids(tokenizer) -> dict[str, int]:
  return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def tiny_qwen2_vl_config(
  tokenizer,
  *,
  hidden: int = 64,
  layers: int = 2,
  heads: int = 4,
  kv_heads: int = 2,
  vision_dim: int = 32,
  vision_depth: int = 2,
  vision_heads: int = 2,
  patch_size: int = 14,
):
  """A transformers Qwen2VLConfig sized for CPU tests, with the tokenizer's special token ids."""
  from transformers import Qwen2VLConfig

  ids = special_ids(tokenizer)
  head_dim = hidden // heads
  half = head_dim // 2
  section = [half - 2 * (half // 3), half // 3, half // 3]
  return Qwen2VLConfig(
    text_config=dict(
      vocab_size=len(tokenizer),
      hidden_size=hidden,
      intermediate_size=2 * hidden,
      num_hidden_layers=layers,
      num_attention_heads=heads,
      num_key_value_heads=kv_heads,
      rms_norm_eps=1e-6,
      max_position_embeddings=4096,
      bos_token_id=None,
      eos_token_id=ids["<|im_end|>"],
      pad_token_id=ids["<|endoftext|>"],
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
    ),
    vision_config=dict(
      depth=vision_depth,
      embed_dim=vision_dim,
      num_heads=vision_heads,
      hidden_size=hidden,
      patch_size=patch_size,
      spatial_merge_size=2,
      temporal_patch_size=2,
    ),
    image_token_id=ids["<|image_pad|>"],
    video_token_id=ids["<|video_pad|>"],
    vision_start_token_id=ids["<|vision_start|>"],
    vision_end_token_id=ids["<|vision_end|>"],
  )


def randomize_(model, seed: int) -> None:
  """Every parameter random (norm weights near 1, biases non-zero) so wrong mappings cannot hide."""
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
      if p.ndim == 1 and ("norm" in name or "ln_q" in name) and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * noise)
      elif name.endswith("bias"):
        p.copy_(0.05 * noise)
      else:
        p.copy_(0.05 * noise)


def save_value_head(out_dir, hidden: int, seed: int):
  """LLaMA-Factory's value_head.safetensors; returns (weight [1, H], bias [1]) as numpy."""
  from safetensors.numpy import save_file

  rng = np.random.default_rng(seed)
  w = rng.normal(0, 0.5, (1, hidden)).astype(np.float32)
  b = rng.normal(0, 0.5, (1,)).astype(np.float32)
  save_file(
    {"v_head.summary.weight": w, "v_head.summary.bias": b},
    str(Path(out_dir) / "value_head.safetensors"),
  )
  return w, b


def save_preprocessor(
  out_dir, patch_size: int = 14, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 16
):
  cfg = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "rescale_factor": 1 / 255,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "patch_size": patch_size,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "resample": 3,
    "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
  }
  (Path(out_dir) / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))
  video = dict(cfg, size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
  (Path(out_dir) / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
  return cfg


def save_tiny_qwen2_vl(out_dir, seed: int = 0, **config_kw):
  """An HF directory as transformers + LLaMA-Factory leave it: config, model.safetensors, tokenizer,
  preprocessor config, value head. Returns (torch model, value head (w, b), tokenizer)."""
  import torch
  from transformers import Qwen2VLForConditionalGeneration

  out_dir = Path(out_dir)
  tok = build_tokenizer(out_dir)
  cfg = tiny_qwen2_vl_config(tok, **config_kw)
  torch.manual_seed(seed)
  model = Qwen2VLForConditionalGeneration(cfg).eval()
  randomize_(model, seed)
  model.save_pretrained(str(out_dir))
  head = save_value_head(out_dir, cfg.text_config.hidden_size, seed)
  save_preprocessor(out_dir, patch_size=cfg.vision_config.patch_size)
  return model, head, tok


def torch_hidden_and_rewards(model, head, batch: dict):
  """PyTorch oracle: last hidden state of `model.model` and value_head(hidden at the last non-pad
  token).
  `batch`: numpy input_ids, attention_mask, pixel_values?, image_grid_thw?, pixel_values_videos?,
  video_grid_thw?; mm_token_type_ids is derived from the placeholder ids."""
  import torch

  cfg = model.config
  ids = torch.as_tensor(np.asarray(batch["input_ids"]), dtype=torch.long)
  mask = torch.as_tensor(np.asarray(batch["attention_mask"]), dtype=torch.long)
  mm = (ids == cfg.image_token_id).long() + 2 * (ids == cfg.video_token_id).long()
  kw = {}
  for k in ("pixel_values", "pixel_values_videos"):
    if batch.get(k) is not None:
      kw[k] = torch.as_tensor(np.asarray(batch[k]), dtype=torch.float32)
  for k in ("image_grid_thw", "video_grid_thw"):
    if batch.get(k) is not None:
      kw[k] = torch.as_tensor(np.asarray(batch[k]), dtype=torch.long)
  with torch.no_grad():
    out = model.model(
      input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, use_cache=False, **kw
    )
  hidden = out.last_hidden_state.float().numpy()
  last = (
    np.asarray(batch["attention_mask"]).shape[1]
    - 1
    - np.argmax(np.asarray(batch["attention_mask"])[:, ::-1], 1)
  )
  w, b = head
  rewards = hidden[np.arange(len(last)), last] @ w[0].astype(np.float64) + b[0]
  return hidden, rewards.astype(np.float32)


def tiny_processor(out_dir, max_pixels: int = 56 * 56):
  """The real Processor of a tiny Qwen2-VL directory (tokenizer + config + preprocessor) written to
  `out_dir`."""
  from mrm_jax.models import hf_io
  from mrm_jax.models.processor import Processor

  tok = build_tokenizer(out_dir)
  tiny_qwen2_vl_config(tok).save_pretrained(str(out_dir))
  save_preprocessor(out_dir, max_pixels=max_pixels)
  fam, cfg = hf_io.family_and_config(out_dir)
  return Processor.from_pretrained(out_dir, fam, cfg)
