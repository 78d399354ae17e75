"""The shared-prompt pair layout (mrm_jax/models/pair_layout.py) gives the rewards, loss and
gradients of the unshared layout (float32, <= 1e-5), for all three families, on batches mixing
text-only, multi-image and video pairs, a pair whose answers begin alike, identical answers, and a
pair whose prompts differ (the unshared fallback row)."""

from __future__ import annotations

import numpy as np
import pytest
from test_qwen2_5_vl import make_example, tiny_config  # noqa: E402  (shared helpers)
from test_qwen3_vl import frame_video_tokens  # noqa: E402
from test_vision_layout import _assert_same, _encoded, _loss_and_grads  # noqa: E402

from mrm_jax.models import pair_layout
from mrm_jax.models.processor import collate, pair_share

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
# per pair: prompt segments, chosen answer length, rejected answer length, how they relate
PAIRS = [
  ([("text", 3), ("image", (1, 6, 6)), ("text", 2), ("video", (2, 4, 8)), ("text", 4)], 5, 9, ""),
  ([("text", 7)], 4, 6, ""),  # text only
  ([("text", 2), ("image", (1, 10, 4)), ("image", (1, 2, 2)), ("text", 3)], 8, 3, "same_start"),
  ([("image", (1, 4, 4)), ("text", 5)], 4, 4, "identical"),
  ([("text", 2), ("image", (1, 4, 4)), ("text", 3)], 6, 5, "other_prompt"),
]


def _pairs(family, cfg, seed=0):
  """(chosen, rejected) example dicts of `make_example`'s form per pair of PAIRS."""
  rng = np.random.default_rng(seed)
  kw = {"video_tokens": frame_video_tokens} if family == "qwen3_vl" else {}
  out = []
  for segments, n_c, n_r, how in PAIRS:
    prompt = make_example(cfg, segments, rng, **kw)
    answer_c = rng.integers(1, 400, size=n_c)
    answer_r = rng.integers(1, 400, size=n_r)
    if how == "same_start":
      answer_r[:2] = answer_c[:2]
    if how == "identical":
      answer_r = answer_c.copy()
    chosen = dict(prompt, ids=np.concatenate([prompt["ids"], answer_c]))
    rejected = dict(prompt, ids=np.concatenate([prompt["ids"], answer_r]))
    if how == "other_prompt":  # its first token differs: nothing in common before the image
      rejected["ids"] = rejected["ids"].copy()
      rejected["ids"][0] = (rejected["ids"][0] % 399) + 1
    out.append((chosen, rejected))
  return out


def _batches(family, cfg):
  family_mod, _ = tiny_config(family)
  pairs = _pairs(family, cfg)
  chosen = [_encoded(family_mod, cfg, c) for c, _ in pairs]
  rejected = [_encoded(family_mod, cfg, r) for _, r in pairs]
  for c, r in zip(chosen, rejected):  # the rejected row has its chosen row's processed images
    r.pixel_values, r.patch_arrays = c.pixel_values, c.patch_arrays
  rows = chosen + rejected
  seq_len = max(e.length for e in rows) + 3
  patches = sum(e.num_patches for e in chosen)
  kw = dict(merge_size=cfg.merge_size, patch_dim=cfg.vision.patch_dim)
  unshared = collate(rows, seq_len, patches + 8, share=pair_share(len(rows)), **kw)

  tokens = (cfg.image_token_id, cfg.video_token_id)
  packed = [
    pair_layout.pack(c, r, tokens, lambda g: family_mod.vision_patch_arrays(g, cfg))
    for c, r in zip(chosen, rejected)
  ]
  sub_len = max(p.sub_length for p in packed) + 2
  own_len = max(p.own_length for p in packed) + 1
  row_len = max(p.length for p in packed) + 5
  need = sum(p.num_patches for p in packed)
  shared = collate(packed, row_len, need + 4, **kw)
  shared.update(pair_layout.layout_arrays(packed, row_len, sub_len, own_len))
  return packed, unshared, shared


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prompt_rewards_loss_and_gradients_equal_the_unshared_layout(family):
  _, cfg = tiny_config(family)
  packed, unshared, shared = _batches(family, cfg)
  assert [p.shared for p in packed] == [True, True, True, True, False]
  # the prompt once: the packed rows hold fewer tokens than the two sequences together
  lengths = unshared["attention_mask"].sum(1)
  b = len(packed)
  for i, p in enumerate(packed[:4]):
    assert p.length == lengths[i] + lengths[b + i] - p.prefix_length
  prompt = [int(lengths[i]) - n_c for i, (_, n_c, _, _) in enumerate(PAIRS)]
  # the common prefix: the prompt, plus the answers' common start; identical rows keep one token
  assert [p.prefix_length for p in packed] == [
    prompt[0],
    prompt[1],
    prompt[2] + 2,
    int(lengths[3]) - 1,
    0,
  ]
  assert int(shared["attention_mask"].sum()) < int(lengths.sum())
  # the tower trained too: its gradients flow through the prompt's vision tokens, once per pair
  ref = _loss_and_grads((family, cfg), unshared, freeze_vision=False)
  got = _loss_and_grads((family, cfg), shared, freeze_vision=False)
  _assert_same(got, ref, f"{family} shared prompt")


def test_layout_arrays_by_hand():
  """Prompt of 3 tokens, chosen response 2, rejected response 1 (row [p p p c c r])."""

  class Enc:
    def __init__(self, ids):
      self.input_ids = np.asarray(ids, np.int32)
      self.position_ids = np.stack([np.arange(len(ids))] * 3).astype(np.int32)
      self.pixel_values = np.zeros((0, 4), np.float32)
      self.grid_thw = np.zeros((0, 3), np.int32)
      self.patch_arrays, self.truncated, self.vision_kinds = {}, False, ()

    @property
    def length(self):
      return len(self.input_ids)

  pair = pair_layout.pack(Enc([5, 6, 7, 8, 9]), Enc([5, 6, 7, 4]), (1, 2), lambda g: {})
  assert pair.shared and pair.prefix_length == 3
  np.testing.assert_array_equal(pair.input_ids, [5, 6, 7, 8, 9, 4])
  np.testing.assert_array_equal(pair.position_ids[0], [0, 1, 2, 3, 4, 3])
  arrays = pair_layout.layout_arrays([pair], seq_len=8, sub_len=6, own_len=2)
  np.testing.assert_array_equal(arrays["pair_b_index"], [[0, 1, 2, 5, 0, 0]])
  np.testing.assert_array_equal(arrays["pair_r_index"], [[5, 0]])
  np.testing.assert_array_equal(arrays["pair_lengths"], [[5, 4, 3]])
  np.testing.assert_array_equal(arrays["pair_r_slot"], [[0, 0, 0, 0, 0, 1, 0, 0]])
  np.testing.assert_array_equal(arrays["reward_index"], [[4, 5]])
  # identical sequences: each keeps its last token
  same = pair_layout.pack(Enc([5, 6, 7]), Enc([5, 6, 7]), (1, 2), lambda g: {})
  np.testing.assert_array_equal(same.input_ids, [5, 6, 7, 7])
  np.testing.assert_array_equal(same.b_index, [0, 1, 3])
  with pytest.raises(ValueError, match="more than"):
    pair_layout.layout_arrays([pair], seq_len=8, sub_len=4, own_len=2)
