"""A tiny byte-level BPE tokenizer for the world, built exactly like Qwen2's.

Same pipeline as Qwen2's tokenizer.json (NFC normaliser, Qwen's split regex, byte-level
pre-tokenizer and decoder), so transformers' `Qwen2Tokenizer` — which rebuilds the
pipeline from vocab + merges — and `tokenizers.Tokenizer.from_file` agree token for
token. The BPE merges are trained on every text the world can produce; the Qwen special
tokens follow the learned vocabulary, in Qwen's order.
"""

from __future__ import annotations

from tokenizers import (
  AddedToken,
  Regex,
  Tokenizer,
  decoders,
  models,
  normalizers,
  pre_tokenizers,
  processors,
  trainers,
)

from mrm_jax.construct import t2i
from mrm_jax.data.records import REWARD_SYSTEM_PROMPT
from mrm_jax.demo import scenes

# transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX
PRETOKENIZE_REGEX = (
  r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
  r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2-VL's special tokens in their vocabulary order (151643 ... 151656 there).
SPECIAL_TOKENS = (
  "<|endoftext|>",
  "<|im_start|>",
  "<|im_end|>",
  "<|object_ref_start|>",
  "<|object_ref_end|>",
  "<|box_start|>",
  "<|box_end|>",
  "<|quad_start|>",
  "<|quad_end|>",
  "<|vision_start|>",
  "<|vision_end|>",
  "<|vision_pad|>",
  "<|image_pad|>",
  "<|video_pad|>",
)

# Qwen2-VL-*-Instruct's chat template, verbatim.
CHAT_TEMPLATE = (
  "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
  "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
  "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
  "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] "
  "}}<|im_end|>\n"
  "{% else %}{% for content in message['content'] %}"
  "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
  "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ "
  "image_count.value }}: "
  "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
  "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = "
  "video_count.value + 1 %}"
  "{% if add_vision_id %}Video {{ video_count.value }}: {% endif "
  "%}<|vision_start|><|video_pad|><|vision_end|>"
  "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif "
  "%}{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BPE_VOCAB_SIZE = 1024  # upper bound; the corpus supports fewer merges than this


def world_texts() -> list[str]:
  """Every question, answer style, caption and fixed phrase the world and the pipeline use
  (seed-free)."""
  # The fixed prompts open every example: weight them like the data does, so BPE merges their words.
  texts = [REWARD_SYSTEM_PROMPT, "You are a helpful assistant.", "system", "user", "assistant"] * 50
  texts += [t2i.verdict(1, 2), t2i.verdict(2, 1)]
  variant = 0
  for color in scenes.COLORS:
    for shape in scenes.SHAPES:
      for background in scenes.BACKGROUNDS:
        for count in (1, 2, 3, 4):
          for position in scenes.POSITIONS if count == 1 else (None,):
            facts = {
              "color": color,
              "shape": shape,
              "count": count,
              "background": background,
              "position": position,
            }
            captions = [scenes.caption(facts, 0), scenes.caption(facts, 1)]
            texts += captions + [t2i.QUESTION.format(caption=c) for c in captions]
            for qtype in scenes.QUESTION_TYPES:
              if qtype == "position" and position is None:
                continue
              texts += [scenes.question(qtype, facts, 0), scenes.question(qtype, facts, 1)]
              for style in scenes.STYLES:
                texts.append(scenes.answer(qtype, facts, style, variant))
                variant += 1
  return texts


def build_tokenizer() -> Tokenizer:
  tok = Tokenizer(
    models.BPE(
      unk_token=None,
      continuing_subword_prefix="",
      end_of_word_suffix="",
      fuse_unk=False,
      byte_fallback=False,
    )
  )
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(
    add_prefix_space=False, trim_offsets=False, use_regex=False
  )
  trainer = trainers.BpeTrainer(
    vocab_size=BPE_VOCAB_SIZE,
    min_frequency=2,
    show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    special_tokens=[],
  )
  tok.train_from_iterator(world_texts(), trainer=trainer)
  tok.add_special_tokens(
    [
      AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
      for t in SPECIAL_TOKENS
    ]
  )
  return tok


def tokenizer_config(tok: Tokenizer) -> dict:
  """tokenizer_config.json in the layout of Qwen2-VL-*-Instruct."""
  decoder = {}
  for t in SPECIAL_TOKENS:
    decoder[str(tok.token_to_id(t))] = {
      "content": t,
      "lstrip": False,
      "normalized": False,
      "rstrip": False,
      "single_word": False,
      "special": True,
    }
  return {
    "add_prefix_space": False,
    "added_tokens_decoder": decoder,
    "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
    "bos_token": None,
    "chat_template": CHAT_TEMPLATE,
    "clean_up_tokenization_spaces": False,
    "eos_token": "<|im_end|>",
    "errors": "replace",
    "model_max_length": 32768,
    "pad_token": "<|endoftext|>",
    "padding_side": "right",
    "split_special_tokens": False,
    "tokenizer_class": "Qwen2Tokenizer",
    "unk_token": None,
  }
