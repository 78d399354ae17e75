"""Host time per train step outside the device computation, and whether the loop reads device
values every step. Prints one JSON line.

  python benchmarks/host_loop.py        # bench-shaped batch (8 pairs x 1,024 tokens, 448² images)
  python benchmarks/host_loop.py --pairs 2 --text 48 --img 56 --steps 5   # quick look

The real `mrm_jax.train.loop.train` runs a tiny Qwen2-VL reward model on the same host batch every
step (so the input pipeline's own cost is not counted; benchmarks/input_pipeline.py measures that),
and the same jitted step runs alone on a batch already on the device. The difference of the two
per-step times is what the loop adds: stacking, the host-to-device copy, dispatch and any wait on
device values that keeps the next step from being dispatched.

On a CPU the device step (seconds) drowns that difference in noise, so `--null-step` also runs the
loop with a step that reads every batch array but computes nothing: the loop's time per step is
then the host's own time per step (fetch, stack, copy to the device, dispatch, reads of device
values), the figure issue 17 asks to halve.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import train_step as bench  # benchmarks/train_step.py: the synthetic bench-shaped examples
from flax import nnx

from mrm_jax.config import base_config
from mrm_jax.models import create_reward_model, get_family
from mrm_jax.models.processor import collate
from mrm_jax.train import sharding as shd
from mrm_jax.train import step as train_step_module
from mrm_jax.train.loop import Setup, train


def host_batch(cfg_model, pairs: int, text: int, img: int, pixel_dtype="float32") -> dict:
  examples, seq_len = bench.synthetic_examples(
    cfg_model, get_family("qwen2_vl"), 2 * pairs, text, img
  )
  batch = collate(
    examples,
    seq_len,
    merge_size=cfg_model.merge_size,
    patch_dim=cfg_model.vision.patch_dim,
    strength=np.zeros(pairs, np.float32),
  )
  # what the training pipeline's workers collate (mrm_jax/train/data.py `make_processor`)
  batch["pixel_values"] = batch["pixel_values"].astype(jnp.dtype(pixel_dtype))
  return batch


def config(pairs: int, steps: int, dtype: str = "float32"):
  cfg = base_config()
  cfg.model.dtype = dtype
  cfg.model.family, cfg.model.preset = "qwen2_vl", "tiny"
  cfg.train.batch_size, cfg.train.num_steps = pairs, steps + 1
  cfg.train.log_every = steps + 1  # one window: steps 2..N+1 (step 1 compiles)
  cfg.train.checkpoint_every = 10**6
  cfg.train.tensorboard = False
  cfg.data.eval = ""
  return cfg


def loop_step_seconds(cfg, batch: dict) -> float:
  def model_factory(seed):
    return create_reward_model("qwen2_vl", "tiny", nnx.Rngs(seed))

  def data_factory(cfg, split, model_path):
    return [batch] * 4 if split == "train" else []

  with tempfile.TemporaryDirectory() as wd:
    train(cfg, wd, model_factory=model_factory, data_factory=data_factory, progress=False)
    last = [json.loads(x) for x in (Path(wd) / "metrics.jsonl").read_text().splitlines()][-1]
  return 1.0 / last["steps_per_s"]


def _null_train_step(self, state, batch):
  """A step that depends on every batch array (so all of it is transferred) and computes nothing."""
  touch = sum(jnp.sum(v.reshape(-1)[:1].astype(jnp.float32)) for v in jax.tree.leaves(batch))
  loss = touch * 0.0 + 0.5
  metrics = {"loss": loss, "accuracy": loss, "learning_rate": loss, "grad_norm": loss}
  return dict(state, step=state["step"] + 1), metrics


def null_loop_step_seconds(cfg, batch: dict) -> float:
  real = train_step_module.Trainer._train_step
  train_step_module.Trainer._train_step = _null_train_step
  try:
    return loop_step_seconds(cfg, batch)
  finally:
    train_step_module.Trainer._train_step = real


def device_step_seconds(cfg, batch: dict, steps: int) -> float:
  setup = Setup(
    cfg,
    num_steps=steps + 2,
    model_factory=lambda seed: create_reward_model("qwen2_vl", "tiny", nnx.Rngs(seed)),
  )
  state = setup.fresh_state()
  device_batch = shd.put_batch(
    {k: np.asarray(v)[None] for k, v in batch.items()}, setup.mesh, leading=1
  )
  state, m = setup.trainer.train_step(state, device_batch)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(steps):
    state, m = setup.trainer.train_step(state, device_batch)
  jax.block_until_ready(m)
  return (time.perf_counter() - t) / steps


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--pairs", type=int, default=8)
  p.add_argument(
    "--text", type=int, default=768, help="text tokens per sequence besides the image's"
  )
  p.add_argument("--img", type=int, default=448, help="image side (one image per sequence)")
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--null-step", action="store_true", help="also time the loop around a null step")
  p.add_argument(
    "--null-only", action="store_true", help="time only the loop around a null step (quick)"
  )
  p.add_argument(
    "--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype"
  )
  p.add_argument(
    "--pixel-dtype",
    choices=("float32", "bfloat16"),
    help="dtype of the batch's pixel_values (default: what training collates for --dtype)",
  )
  a = p.parse_args(argv)
  cfg = config(a.pairs, a.steps, a.dtype)
  model_cfg = get_family("qwen2_vl").PRESETS["tiny"]
  batch = host_batch(model_cfg, a.pairs, a.text, a.img, a.pixel_dtype or a.dtype)
  device = None if a.null_only else device_step_seconds(cfg, batch, a.steps)
  loop = None if a.null_only else loop_step_seconds(cfg, batch)
  host_only = null_loop_step_seconds(cfg, batch) if a.null_step or a.null_only else None
  print(
    json.dumps(
      {
        "benchmark": "host_loop",
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "pairs": a.pairs,
        "dtype": a.dtype,
        "pixel_dtype": str(batch["pixel_values"].dtype),
        "seq": int(batch["input_ids"].shape[1]),
        "batch_mb": round(sum(np.asarray(v).nbytes for v in batch.values()) / 2**20, 1),
        "loop_step_s": None if loop is None else round(loop, 4),
        "device_step_s": None if device is None else round(device, 4),
        "host_s_per_step": None if loop is None else round(max(loop - device, 0.0), 4),
        "null_step_loop_s": None if host_only is None else round(host_only, 4),
      }
    )
  )


if __name__ == "__main__":
  main()
