"""Times the project's real jitted train step (the same `Setup`/`Trainer` as `mrm-jax train`) on
synthetic pair batches and prints one JSON line.

  python benchmarks/train_step.py --preset tiny                 # CPU, harness check
  python benchmarks/train_step.py --preset qwen2vl_2b_shape     # the peer's workload on one GPU
  python benchmarks/train_step.py --preset qwen2vl_2b_shape --remat full --lower-only  # CPU: lower

`qwen2vl_2b_shape` is the workload of shared/bench/peer_torch_rm_step.py: a Qwen2-VL-2B-shaped
reward model, 8 pairs (16 sequences) x 1,024 tokens, one 448x448 image per sequence (1,024
patches, 256 merged image tokens), vision tower frozen, bf16 compute, AdamW. Model FLOPs are
counted exactly as the peer counts them (`mrm_jax.train.metrics.step_flops`, every row's image),
MFU against --peak (790 TFLOP/s: the bf16 matmul rate measured on the H200). The batch is collated
as the training pipeline does it: each pair's image once (the rejected row shares it).
`--lower-only` traces and lowers the step from `jax.ShapeDtypeStruct`s (no parameter allocated,
nothing executed) and prints XLA's FLOP count of the lowered program.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

PRESETS = {
  # name: (model preset, pairs, text tokens, image side, compute dtype)
  "tiny": ("tiny", 2, 48, 56, "float32"),
  "qwen2vl_2b_shape": ("qwen2-vl-2b", 8, 768, 448, "bfloat16"),
}


def synthetic_examples(cfg_model, family, n: int, text: int, img: int, seed: int = 0):
  """`n` encoded sequences shaped like the peer's: random text, one image right after the 5th
  token."""
  from mrm_jax.models.processor import Encoded

  rng = np.random.default_rng(seed)
  vc = cfg_model.vision
  grid = img // vc.patch_size
  n_img_tok = grid * grid // cfg_model.merge_size**2
  length = text + n_img_tok
  thw = np.array([[1, grid, grid]], np.int32)
  out = []
  for _ in range(n):
    # plain text tokens: below every special (vision) token id, as in a real vocabulary
    specials = (
      cfg_model.image_token_id,
      cfg_model.video_token_id,
      cfg_model.vision_start_token_id,
      cfg_model.vision_end_token_id,
    )
    ids = rng.integers(0, min(cfg_model.text.vocab_size, 150000, *specials), size=length)
    ids = ids.astype(np.int32)
    ids[5] = cfg_model.vision_start_token_id
    ids[6 : 6 + n_img_tok] = cfg_model.image_token_id
    ids[6 + n_img_tok] = cfg_model.vision_end_token_id
    pixels = rng.standard_normal((grid * grid, vc.patch_dim), dtype=np.float32)
    out.append(
      Encoded(
        ids,
        family.rope_index(ids, thw, cfg_model).astype(np.int32),
        pixels,
        thw,
        family.vision_patch_arrays(thw, cfg_model),
        vision_kinds=("image",),
      )
    )
  return out, length


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
  p.add_argument("--pairs", type=int, help="pairs per step (default: the preset's)")
  p.add_argument("--text", type=int, help="text tokens per sequence besides the image tokens")
  p.add_argument("--img", type=int, help="image side in pixels (one image per sequence)")
  p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
  p.add_argument(
    "--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: the preset's)"
  )
  p.add_argument("--remat", default="none", choices=["none", "full", "dots"])
  p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
  p.add_argument("--peak", type=float, default=790e12, help="peak FLOP/s per device for MFU")
  p.add_argument("--lower-only", action="store_true", help="trace and lower the step, run nothing")
  a = p.parse_args(argv)

  import jax

  from mrm_jax.config import base_config
  from mrm_jax.models import get_family
  from mrm_jax.models.processor import collate, pair_share
  from mrm_jax.train import metrics as mx
  from mrm_jax.train import sharding as shd
  from mrm_jax.train.loop import Setup, _model_flops_spec, _stack_micro

  preset, pairs, text, img, dtype = PRESETS[a.preset]
  pairs, text, img, dtype = a.pairs or pairs, a.text or text, a.img or img, a.dtype or dtype
  cfg = base_config()
  cfg.model.family, cfg.model.preset, cfg.model.dtype = "qwen2_vl", preset, dtype
  cfg.model.remat, cfg.model.attention = a.remat, a.attention
  cfg.train.batch_size, cfg.train.learning_rate = pairs, 1e-5
  setup = Setup(cfg, num_steps=a.steps + 2)
  family = get_family("qwen2_vl")
  mcfg = setup.spec.model_config
  examples, seq_len = synthetic_examples(mcfg, family, 2 * pairs, text, img)
  peer_patches = sum(e.num_patches for e in examples)  # the peer encodes every row's image
  for r, c in zip(examples[pairs:], examples[:pairs]):  # a pair's rows share its image
    r.pixel_values, r.grid_thw, r.patch_arrays = c.pixel_values, c.grid_thw, c.patch_arrays
  batch = collate(
    examples,
    seq_len,
    merge_size=mcfg.merge_size,
    patch_dim=mcfg.vision.patch_dim,
    strength=np.zeros(pairs, np.float32),
    share=pair_share(2 * pairs),
  )
  host = _stack_micro([batch])
  if a.lower_only:
    t = time.perf_counter()
    shardings = shd.batch_shardings(host, setup.mesh, leading=1)
    sds = {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in host.items()
    }
    lowered = setup.trainer.train_step.trace(setup.abstract_state(), sds).lower()
    print(
      json.dumps(
        dict(
          impl="mrm_jax",
          preset=a.preset,
          remat=a.remat,
          dtype=dtype,
          pairs=pairs,
          seq=seq_len,
          lowered=True,
          lower_s=round(time.perf_counter() - t, 1),
          flops_per_pair=float(lowered.cost_analysis()["flops"]) / pairs,
        )
      )
    )
    return
  state = setup.fresh_state()
  device_batch = shd.put_batch(host, setup.mesh, leading=1)

  for _ in range(2):
    state, m = setup.trainer.train_step(state, device_batch)
  jax.block_until_ready(m["loss"])
  t = time.perf_counter()
  for _ in range(a.steps):
    state, m = setup.trainer.train_step(state, device_batch)
  jax.block_until_ready(m["loss"])
  dt = (time.perf_counter() - t) / a.steps

  rows = 2 * pairs
  flops = mx.step_flops(_model_flops_spec(setup, state), rows, seq_len, peer_patches)
  n_dev = setup.mesh.devices.size
  stats = [d.memory_stats() or {} for d in setup.mesh.devices.flat]
  peak_mem = max((s.get("peak_bytes_in_use", 0) for s in stats), default=0) / 2**30
  print(
    json.dumps(
      dict(
        impl="mrm_jax",
        preset=a.preset,
        backend=jax.default_backend(),
        devices=n_dev,
        dtype=dtype,
        remat=a.remat,
        pairs=pairs,
        seq=seq_len,
        step_s=round(dt, 4),
        tokens_per_s=round(rows * seq_len / dt),
        pairs_per_s=round(pairs / dt, 2),
        model_tflops=round(flops / dt / 1e12, 3),
        mfu=round(flops / dt / (a.peak * n_dev), 4),
        peak_mem_gb=round(peak_mem, 2),
        loss=float(m["loss"]),
      )
    )
  )


if __name__ == "__main__":
  main()
