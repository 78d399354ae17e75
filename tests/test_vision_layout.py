"""Per-item vision attention and image-once pair batches give the rewards and gradients of the
full-square, block-diagonal-masked path (float32, <= 1e-5), for all three families, on batches
mixing several images per example, videos, text-only rows and padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_qwen2_5_vl import jax_batch, make_example, tiny_config  # noqa: E402  (shared helpers)
from test_qwen3_vl import frame_video_tokens  # noqa: E402

from mrm_jax.models import common, create_reward_model, vision_layout
from mrm_jax.models.processor import Encoded, collate, pair_share
from mrm_jax.train.loss import pair_loss
from mrm_jax.train.step import split_model

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
# chosen rows 0-2, rejected rows 3-5 (each with its chosen row's vision items, other text)
VISION = [
  [("image", (1, 6, 6)), ("video", (2, 4, 8))],
  [],
  [("image", (1, 10, 4)), ("image", (1, 2, 2)), ("image", (1, 4, 4))],
]


def _segments(items, rng, n_text):
  out = []
  for it in items:
    out += [("text", int(rng.integers(1, 6))), it]
  return out + [("text", n_text)]


def _examples(family, cfg, seed=0):
  """Six examples; rejected row i has chosen row i's vision items *and pixels*, other text."""
  rng = np.random.default_rng(seed)
  video_tokens = frame_video_tokens if family == "qwen3_vl" else None
  kw = {} if video_tokens is None else {"video_tokens": video_tokens}
  chosen = [
    make_example(cfg, _segments(v, rng, 4 + 3 * i), rng, **kw) for i, v in enumerate(VISION)
  ]
  rejected = []
  for c, v in zip(chosen, VISION):
    r = make_example(cfg, _segments(v, rng, 9), rng, **kw)
    r["items"] = list(c["items"])
    rejected.append(r)
  return chosen + rejected


def _encoded(fam, cfg, ex):
  grids = np.asarray([thw for _, thw, _ in ex["items"]], np.int32).reshape(-1, 3)
  dim = cfg.vision.patch_dim
  pixels = (
    np.concatenate([px for _, _, px in ex["items"]])
    if ex["items"]
    else np.zeros((0, dim), np.float32)
  )
  ids = ex["ids"].astype(np.int32)
  return Encoded(
    ids,
    fam.rope_index(ids, grids, cfg).astype(np.int32),
    pixels,
    grids,
    fam.vision_patch_arrays(grids, cfg),
    vision_kinds=tuple(k for k, _, _ in ex["items"]),
  )


def _loss_and_grads(model_args, batch, freeze_vision):
  family, cfg = model_args
  model = create_reward_model(family, cfg, nnx.Rngs(0))
  graphdef, params, frozen, rest = split_model(model, freeze_vision)

  def loss(p):
    rewards = nnx.merge(graphdef, p, frozen, rest)(batch)
    return pair_loss(rewards)[0], rewards

  (value, rewards), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return value, rewards, nnx.to_flat_state(grads)


def _assert_same(a, b, what):
  (la, ra, ga), (lb, rb, gb) = a, b
  np.testing.assert_allclose(
    np.asarray(ra), np.asarray(rb), atol=1e-5, rtol=0, err_msg=f"{what} rewards"
  )
  np.testing.assert_allclose(float(la), float(lb), atol=1e-6, rtol=0)
  assert [k for k, _ in ga] == [k for k, _ in gb]
  for (k, x), (_, y) in zip(ga, gb):
    np.testing.assert_allclose(
      np.asarray(x.get_value()),
      np.asarray(y.get_value()),
      atol=1e-5,
      rtol=1e-5,
      err_msg=f"{what} {k}",
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_per_item_attention_and_shared_vision_match_the_masked_path(family):
  fam, cfg = tiny_config(family)
  examples = _examples(family, cfg)
  seq_len = max(len(e["ids"]) for e in examples) + 3
  patches = sum(int(np.prod(thw)) for e in examples for _, thw, _ in e["items"])
  # the old layout: every row's patches, one full square under a block-diagonal mask
  masked = jax_batch(fam, cfg, examples, seq_len, patches + 8)
  assert "vision_items_index" not in masked
  ref = _loss_and_grads((family, cfg), masked, freeze_vision=False)

  # the same flat patches, attention per item (layouts built from the same segment ids)
  per_item = vision_layout.add_layouts(dict(masked))
  assert per_item["vision_items_index"].shape[0] >= 2 * 4  # one row per image / frame of the batch
  _assert_same(_loss_and_grads((family, cfg), per_item, False), ref, f"{family} per-item")

  # collate with image-once pairs: half the patches, rejected rows read their chosen row's tokens
  enc = [_encoded(fam, cfg, e) for e in examples]
  shared = collate(
    enc,
    seq_len,
    patches // 2 + 8,
    merge_size=cfg.merge_size,
    patch_dim=cfg.vision.patch_dim,
    share=pair_share(len(enc)),
  )
  assert int((shared["vision_segment_ids"] > 0).sum()) == patches // 2
  offsets = shared["vision_token_offset"]
  np.testing.assert_array_equal(offsets[3:], offsets[:3])
  for freeze in (False, True):
    got = _loss_and_grads((family, cfg), shared, freeze)
    _assert_same(
      got,
      ref if not freeze else _loss_and_grads((family, cfg), masked, True),
      f"{family} shared freeze={freeze}",
    )


def test_item_layout_shapes_and_padding():
  seg = np.asarray([1, 1, 2, 2, 2, 1, 0, 0, 5, 5], np.int32)  # item 1 not contiguous (a window)
  index, lengths, slot = vision_layout.item_layout(seg, rows=4, width=8)
  assert index.shape == (4, 8) and lengths.tolist() == [3, 3, 2, 0]
  assert index[0, :3].tolist() == [0, 1, 5] and index[1, :3].tolist() == [2, 3, 4]
  assert index[2, :2].tolist() == [8, 9]
  assert slot[5].tolist() == [0, 2] and slot[6].tolist() == [0, 0]
  with pytest.raises(ValueError, match="do not fit"):
    vision_layout.item_layout(seg, rows=2, width=8)
  assert [vision_layout.ladder(n) for n in (1, 4, 5, 8, 9, 1000, 1024, 1025)] == [
    1,
    4,
    5,
    8,
    10,
    1024,
    1024,
    1280,
  ]
  assert vision_layout.ladder(17, unit=4) == 20


def test_item_attention_equals_masked_attention():
  rng = np.random.default_rng(0)
  seg = np.asarray([1] * 5 + [2] * 3 + [3] * 7 + [0] * 2, np.int32)
  q, k, v = (jnp.asarray(rng.standard_normal((len(seg), 2, 8)), jnp.float32) for _ in range(3))
  ref = common.attention(q[None], k[None], v[None], mask=common.segment_mask(jnp.asarray(seg)))[0]
  layout = common.ItemLayout(*map(jnp.asarray, vision_layout.item_layout(seg)))
  got = common.item_attention(q, k, v, layout)
  real = seg > 0
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], atol=1e-6)
  assert np.isfinite(np.asarray(got)).all()


def test_resolve_attention():
  bf16, f32 = jnp.bfloat16, jnp.float32
  assert common.resolve_attention("auto", bf16, platform="cuda", head_dims=(128, 80)) == "cudnn"
  assert common.resolve_attention(None, jnp.float16, platform="cuda") == "cudnn"
  assert common.resolve_attention("auto", f32, platform="cuda") == "xla"
  assert common.resolve_attention("auto", bf16, platform="cuda", head_dims=(100,)) == "xla"
  for platform in ("cpu", "tpu", "rocm"):
    assert common.resolve_attention("auto", bf16, platform=platform) == "xla"
  assert common.resolve_attention("xla", bf16, platform="cuda") == "xla"
  assert common.resolve_attention("cudnn", f32, platform="cpu") == "cudnn"
  assert common.resolve_attention("auto", f32) == "xla"  # this (CPU) machine
  with pytest.raises(ValueError, match="unknown attention"):
    common.resolve_attention("flash", bf16)
