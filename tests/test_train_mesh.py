"""The jitted train step of the real tiny Qwen2-VL reward model on different meshes of the 8 fake
CPU devices gives the one-device loss trajectory; frozen vision stays frozen; gradient
accumulation equals the big batch."""

import jax
import numpy as np
import pytest
from test_train_runs import REPO, make_world, overrides

from mrm_jax.config import apply_overrides, load_config_file


@pytest.fixture(scope="module")
def setup_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("meshworld")
  make_world(root, n_train=16, n_eval=2)
  cfg = load_config_file(str(REPO / "configs" / "demo.py"))
  apply_overrides(
    cfg,
    overrides(
      root, **{"train.learning_rate": 1e-2, "train.warmup_ratio": 0.0, "model.freeze_vision": True}
    ),
  )
  from mrm_jax.train.data import default_data_factory

  data = default_data_factory(cfg, "train", str(root / "model"))
  it = iter(data)
  batches = [next(it) for _ in range(3)]
  data.close()
  # the same pairs in micro-batches of half the size: the pipeline cuts its order consecutively
  half = cfg.copy_and_resolve_references()
  half.train.batch_size = cfg.train.batch_size // 2
  data = default_data_factory(half, "train", str(root / "model"))
  it = iter(data)
  halves = [next(it) for _ in range(6)]
  data.close()
  for b, (h0, h1) in zip(batches, zip(halves[0::2], halves[1::2])):
    assert sorted(b["strength"]) == sorted([*h0["strength"], *h1["strength"]])
  return cfg, batches, halves


def run_steps(cfg, batches, mesh_shape, grad_accum=1):
  """Losses of len(batches) steps; with grad_accum > 1, `batches` holds that many micro-batches
  per step."""
  from mrm_jax.train import loop
  from mrm_jax.train import sharding as shd

  cfg = cfg.copy_and_resolve_references()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh_shape
  cfg.train.grad_accum = grad_accum
  n = int(np.prod(mesh_shape))
  steps = [batches[i : i + grad_accum] for i in range(0, len(batches), grad_accum)]
  setup = loop.Setup(cfg, num_steps=len(steps), devices=jax.devices()[:n])
  state = setup.fresh_state()
  vision0 = jax.device_get(state["frozen"])
  losses = []
  for micro in steps:
    host = loop._stack_micro(micro)
    state, m = setup.trainer.train_step(state, shd.put_batch(host, setup.mesh, leading=1))
    losses.append(float(m["loss"]))
  return losses, state, vision0


_ONE_DEVICE = {}


def one_device(cfg, batches):
  if not _ONE_DEVICE:
    _ONE_DEVICE["run"] = run_steps(cfg, batches, (1, 1, 1))
  return _ONE_DEVICE["run"]


def test_meshes_match_one_device(setup_data):
  cfg, batches, _ = setup_data
  ref, state, vision0 = one_device(cfg, batches)
  assert ref[0] != ref[-1]  # it trains
  # frozen vision tower: untouched after 3 steps, and it holds real parameters
  assert jax.tree.leaves(vision0)
  for a, b in zip(jax.tree.leaves(vision0), jax.tree.leaves(jax.device_get(state["frozen"]))):
    np.testing.assert_array_equal(a, b)
  for shape in [(8, 1, 1), (2, 2, 2), (1, 4, 2)]:
    got, _, _ = run_steps(cfg, batches, shape)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0, err_msg=str(shape))


def test_grad_accumulation_equals_big_batch(setup_data):
  cfg, batches, halves = setup_data
  big, _, _ = one_device(cfg, batches)
  acc, _, _ = run_steps(cfg, halves, (1, 1, 1), grad_accum=2)
  # same pairs, same updates: the trajectories agree (Adam amplifies float noise on ~0 gradients, so
  # parameters are compared through the losses they produce on the following steps; the
  # micro-batches are padded to their own buckets, which moves the third step's loss by about 1e-5)
  np.testing.assert_allclose(acc[:2], big[:2], atol=1e-5, rtol=0)
  np.testing.assert_allclose(acc, big, atol=3e-5, rtol=0)
