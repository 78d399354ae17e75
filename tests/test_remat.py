"""Remat (activation checkpointing) leaves the train step's gradients unchanged, for all three
families, with the vision tower trained or frozen.

The gradient is taken the way `mrm_jax.train.step.Trainer` takes it: the model is merged from its
split states inside the differentiated loss, which is what made `nnx.remat` raise TraceContextError
(issue 17).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from test_qwen2_5_vl import jax_batch, make_example, tiny_config

from mrm_jax.models import create_reward_model, vision_layout
from mrm_jax.train.loss import pair_loss
from mrm_jax.train.step import split_model

# two pairs: chosen rows 0-1, rejected rows 2-3; images of different sizes, a text-only row, padding
SEGMENTS = [
  [("text", 3), ("image", (1, 4, 4)), ("text", 5)],
  [("text", 9)],
  [("text", 2), ("image", (1, 6, 4)), ("text", 2), ("image", (1, 2, 2)), ("text", 3)],
  [("text", 4), ("image", (1, 4, 4)), ("text", 7)],
]


def _batch(fam, cfg):
  rng = np.random.default_rng(0)
  examples = [make_example(cfg, s, rng) for s in SEGMENTS]
  seq_len = max(len(e["ids"]) for e in examples) + 3
  patches = sum(int(np.prod(thw)) for e in examples for _, thw, _ in e["items"])
  # the per-item vision attention layout collate adds (its NamedTuple goes through the checkpoint)
  return vision_layout.add_layouts(jax_batch(fam, cfg, examples, seq_len, patches + 8))


def _grads(family, cfg, batch, remat: str, freeze_vision: bool):
  model = create_reward_model(family, cfg, nnx.Rngs(0), remat=remat)
  graphdef, params, frozen, rest = split_model(model, freeze_vision)

  def loss(p):
    rewards = nnx.merge(graphdef, p, frozen, rest)(batch)
    return pair_loss(rewards)[0]

  return jax.value_and_grad(loss)(
    params
  )  # eager: tracing + op dispatch beats compiling 12 tiny steps


# The frozen tower (the default) is the case nnx.remat broke; one family also trains the tower
# through remat.
CASES = [("qwen2_vl", True), ("qwen2_5_vl", True), ("qwen3_vl", True), ("qwen2_vl", False)]


@pytest.mark.parametrize("family,freeze_vision", CASES)
def test_remat_gradients_equal_no_remat(family, freeze_vision):
  fam, cfg = tiny_config(family)
  batch = _batch(fam, cfg)
  loss0, g0 = _grads(family, cfg, batch, "none", freeze_vision)
  flat0 = nnx.to_flat_state(g0)
  assert any("visual" in str(k) for k, _ in flat0) != freeze_vision
  for remat in ("full", "dots"):
    loss, g = _grads(family, cfg, batch, remat, freeze_vision)
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
    flat = nnx.to_flat_state(g)
    assert [k for k, _ in flat] == [k for k, _ in flat0]
    for (k, a), (_, b) in zip(flat, flat0):
      np.testing.assert_allclose(
        np.asarray(a.get_value()),
        np.asarray(b.get_value()),
        atol=1e-5,
        rtol=1e-5,
        err_msg=f"{family} remat={remat} {k}",
      )
