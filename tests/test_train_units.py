"""Training building blocks against hand-computed oracles: loss, schedule, sharding rules,
metrics log, TensorBoard framing, FLOP counting."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrm_jax.config import base_config
from mrm_jax.errors import UserError
from mrm_jax.train import metrics as mx
from mrm_jax.train import sharding as shd
from mrm_jax.train.loss import pair_loss
from mrm_jax.train.optimizer import make_optimizer, make_schedule


def test_pair_loss_matches_hand_computation():
  chosen = np.array([2.0, -1.0, 0.5], np.float32)
  rejected = np.array([1.0, 0.5, 0.5], np.float32)
  strength = np.array([0.5, 2.0, 1.0], np.float32)
  rewards = jnp.asarray(np.concatenate([chosen, rejected]))
  # plain Bradley-Terry
  loss, m = pair_loss(rewards)
  expect = np.mean([math.log1p(math.exp(-(c - r))) for c, r in zip(chosen, rejected)])
  assert float(loss) == pytest.approx(expect, rel=1e-6)
  assert float(m["accuracy"]) == pytest.approx(1 / 3)  # the tie (0.5 vs 0.5) counts as wrong
  assert float(m["reward_margin"]) == pytest.approx(np.mean(chosen - rejected), rel=1e-6)
  # margin and centering
  loss, _ = pair_loss(rewards, jnp.asarray(strength), margin_scale=0.3, center_weight=0.1)
  expect = np.mean(
    [
      math.log1p(math.exp(-(c - r - 0.3 * s))) + 0.1 * (c + r) ** 2
      for c, r, s in zip(chosen, rejected, strength)
    ]
  )
  assert float(loss) == pytest.approx(expect, rel=1e-6)
  # padding weights drop pairs from every mean
  loss, m = pair_loss(rewards, weights=jnp.asarray([1.0, 0.0, 1.0]))
  expect = np.mean(
    [math.log1p(math.exp(-(c - r))) for c, r in zip(chosen[[0, 2]], rejected[[0, 2]])]
  )
  assert float(loss) == pytest.approx(expect, rel=1e-6)
  assert float(m["accuracy"]) == pytest.approx(0.5)


def test_loss_stays_float32_for_bf16_rewards():
  rewards = jnp.asarray([30.0, -30.0], jnp.bfloat16)
  loss, _ = pair_loss(rewards)
  assert loss.dtype == jnp.float32 and float(loss) < 1e-20  # log1p(exp(-60)) is tiny but finite


def test_schedule_is_linear_warmup_then_cosine():
  lr, steps, ratio = 1e-5, 50, 0.1
  s = make_schedule(lr, steps, ratio)
  warm = math.ceil(ratio * steps)
  for t in range(steps + 1):
    if t < warm:
      expect = lr * t / warm
    else:
      expect = lr * 0.5 * (1 + math.cos(math.pi * (t - warm) / (steps - warm)))
    assert float(s(t)) == pytest.approx(expect, rel=1e-5, abs=1e-12), t


def test_optimizer_clips_and_skips_decay_on_vectors():
  cfg = base_config().train
  cfg.learning_rate, cfg.warmup_ratio, cfg.weight_decay, cfg.grad_clip = 0.1, 0.0, 0.5, 1.0
  tx, _ = make_optimizer(cfg, 10)
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  state = tx.init(params)
  grads = {"w": jnp.zeros((2, 2)), "b": jnp.zeros((2,))}
  updates, _ = tx.update(grads, state, params)
  # zero gradient: only decoupled weight decay moves the matrix; the bias is not decayed
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["b"], np.zeros(2), atol=0)
  # a huge gradient is clipped to global norm 1 before Adam (first Adam step is ±lr anyway, so
  # check the clip through the second moment): same update direction/magnitude as a unit gradient
  big = {"w": jnp.full((2, 2), 1e6), "b": jnp.full((2,), 1e6)}
  u_big, _ = tx.update(big, state, params)
  unit = jax.tree.map(lambda g: g / np.sqrt(6) / 1e6, big)
  u_unit, _ = tx.update(unit, state, params)
  np.testing.assert_allclose(u_big["b"], u_unit["b"], rtol=1e-5)


def test_mesh_shape_fill_and_errors():
  assert shd.mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, 8) == (8, 1, 1)
  assert shd.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
  assert shd.mesh_shape({"data": 1, "fsdp": 4, "tensor": 2}, 8) == (1, 4, 2)
  with pytest.raises(UserError, match="needs 4 devices"):
    shd.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
  with pytest.raises(UserError, match="at most one axis"):
    shd.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(UserError, match="cannot be split"):
    shd.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)


def test_logical_rules_map_and_fall_back_to_replication():
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
  P = jax.sharding.PartitionSpec
  assert shd.logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
  assert shd.logical_to_spec(("vocab", "embed"), (100, 64), mesh) == P("tensor", "fsdp")
  assert shd.logical_to_spec(("embed", "heads"), (63, 128), mesh) == P(
    None, "tensor"
  )  # 63 % 2 != 0
  assert shd.logical_to_spec(("mlp", "heads"), (64, 64), mesh) == P(
    "tensor", None
  )  # an axis only once
  assert shd.logical_to_spec((None,), (7,), mesh) == P(None)
  assert shd.logical_to_spec(None, (4, 4), mesh) == P()
  assert shd.batch_spec((16, 32), mesh) == P(("data", "fsdp"), None)
  assert shd.batch_spec((6, 32), mesh) == P()  # not divisible by 4: replicated
  b = {
    "input_ids": np.zeros((4, 16, 8)),
    "position_ids": np.zeros((4, 3, 16, 8)),
    "pixel_values": np.zeros((4, 10, 3)),
  }
  sh = shd.batch_shardings(b, mesh, leading=1)
  assert sh["input_ids"].spec == P(None, ("data", "fsdp"), None)
  assert sh["position_ids"].spec == P(None, None, ("data", "fsdp"), None)
  assert sh["pixel_values"].spec == P()


def test_metrics_log_drops_lines_after_the_resume_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  log = mx.MetricsLog(path)
  for s in range(1, 6):
    log.write({"step": s, "loss": float(s)})
  log.write({"step": 4, "split": "eval", "loss": 0.5})
  log.close()
  with open(path, "a") as f:
    f.write('{"step": 6, "lo')  # torn line from a kill
  log = mx.MetricsLog(path, resume_step=3)
  log.write({"step": 4, "loss": 40.0})
  log.close()
  assert [(r["step"], r["loss"]) for r in mx.read_metrics(path)] == [
    (1, 1.0),
    (2, 2.0),
    (3, 3.0),
    (4, 40.0),
  ]


def test_tensorboard_event_file_framing(tmp_path):
  import tensorflow as tf

  w = mx.TensorBoardWriter(tmp_path)
  w.scalars(7, {"loss": 0.25, "bad": float("nan")}, prefix="train/")
  w.close()
  (f,) = tmp_path.iterdir()
  # TensorFlow's own reader checks every record's length and data CRCs as it reads
  records = list(tf.compat.v1.train.summary_iterator(str(f)))
  assert len(records) == 2 and records[0].file_version == "brain.Event:2"
  ev = records[1]
  # step 7; the tag and its value present; the NaN was dropped
  assert ev.step == 7 and [v.tag for v in ev.summary.value] == ["train/loss"]
  assert float(tf.make_ndarray(ev.summary.value[0].tensor)) == 0.25


def test_tensorboard_without_tensorflow_writes_nothing(tmp_path, monkeypatch, caplog):
  import sys

  monkeypatch.setitem(sys.modules, "tensorflow", None)  # as on the GPU check machine
  w = mx.TensorBoardWriter(tmp_path / "tb")
  w.scalars(1, {"loss": 0.5})
  w.close()
  assert not (tmp_path / "tb").exists()
  assert [r.levelname for r in caplog.records if "TensorBoard" in r.message] == ["WARNING"]


def test_step_flops_counts_like_the_peer_benchmark():
  spec = {
    "n_lm": 1000,
    "n_vis": 500,
    "lm_layers": 2,
    "lm_attn_dim": 8,
    "vis_layers": 3,
    "vis_attn_dim": 4,
  }
  rows, seq, patches = 4, 16, 40
  expect = (
    6 * 1000 * rows * seq
    + 2 * 500 * patches
    + 2 * 2 * 2 * seq * seq * 8 * rows * 3
    + 3 * 2 * 2 * 10 * 10 * 4 * rows
  )
  assert mx.step_flops(spec, rows, seq, patches) == pytest.approx(expect)
  assert json.dumps(mx.format_console(3, 10, {"loss": 0.5, "accuracy": 1.0, "learning_rate": 1e-5}))


def test_throughput_counts_each_rows_images_like_the_peer():
  """A pair's rows share one pass of the vision tower (the batch holds its patches once), but MFU
  counts every row's image as the peer does: from the placeholder tokens of each row."""
  from mrm_jax.train.loop import _Throughput

  spec = {
    "n_lm": 10,
    "n_vis": 7,
    "vis_layers": 1,
    "vis_attn_dim": 2,
    "vision_token_ids": (5, 6),
    "patches_per_token": 4,
  }
  ids = np.zeros((1, 2, 8), np.int32)  # one micro-batch: a pair's chosen and rejected rows
  ids[0, :, 1:4] = 5  # 3 image tokens per row = 12 patches per row
  host = {
    "input_ids": ids,
    "attention_mask": np.ones_like(ids),
    "vision_segment_ids": np.array([[1] * 12 + [0] * 4]),
  }  # the shared image, once
  t = _Throughput(spec, peak=None, n_devices=1)
  t.add(host, micro=1)
  assert t.flops == pytest.approx(mx.step_flops(spec, 2, 8, 24))
  assert t.tokens == 16 and t.steps == 1


def test_bf16_training_collates_bf16_pixels_with_the_same_rewards(tmp_path):
  """With model.dtype bfloat16 the training processor collates pixel_values as bfloat16: half the
  bytes each step copies to the device. The patch embedding computes in bfloat16 anyway and the
  host's cast rounds as the device's would, so the rewards are bit-identical."""
  from flax import nnx
  from model_fixtures import tiny_processor
  from PIL import Image

  from mrm_jax.models import create_reward_model
  from mrm_jax.train.data import make_processor

  tiny_processor(tmp_path, max_pixels=112 * 112)
  cfg = base_config()
  assert make_processor(cfg, str(tmp_path)).pixel_dtype == np.float32
  cfg.model.dtype = "bfloat16"
  proc = make_processor(cfg, str(tmp_path))
  assert proc.pixel_dtype == jnp.bfloat16
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (100, 90, 3), np.uint8)).save(tmp_path / "a.png")
  rec = {"images": ["a.png"], "question": "<image>What is shown?", "answer": "Noise."}
  enc = proc.encode(rec, tmp_path, max_len=512)
  half = proc.collate([enc, enc], 128)
  assert half["pixel_values"].dtype == jnp.bfloat16 and half["pixel_values"].size > 0
  proc.pixel_dtype = np.dtype(np.float32)
  full = proc.collate([enc, enc], 128)
  assert full["pixel_values"].dtype == np.float32
  assert half["pixel_values"].nbytes * 2 == full["pixel_values"].nbytes

  model = create_reward_model("qwen2_vl", proc.config, nnx.Rngs(0), dtype="bfloat16")
  r_half, r_full = (np.asarray(model(b), np.float32) for b in (half, full))
  np.testing.assert_array_equal(r_half, r_full)
  assert np.all(np.isfinite(r_half))
