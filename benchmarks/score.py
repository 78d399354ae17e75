"""Scoring throughput (sequences/s) of the project's scoring path
(`mrm_jax.evaluate.scoring.score_records`: host processing + batched, jitted reward-model forward
sharded data-parallel over the devices) on synthetic items.

    python benchmarks/score.py                                   # tiny Qwen2-VL, CPU
    # the sharded path on 2 CPU "devices"
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/score.py --devices 2
    python benchmarks/score.py --preset qwen2-vl-2b --dtype bfloat16 --n 256 --batch-size 32 \
        --image-size 448 --text-tokens 700                       # the GPU workload of shared/bench

The model has random weights (throughput does not depend on them); the tokenizer, chat template and
image processor settings are the demo world's, with the preset's shapes. Each item is one image
(random pixels, `--image-size` square), a question and an answer of about `--text-tokens` tokens
together. The first pass compiles and is not timed; the second is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path


def synthetic_records(
  root: Path, n: int, image_size: int, text_tokens: int, seed: int = 0
) -> list[dict]:
  import numpy as np
  from PIL import Image

  from mrm_jax.data.records import REWARD_SYSTEM_PROMPT

  rng = np.random.default_rng(seed)
  words = [
    "red",
    "circle",
    "blue",
    "square",
    "the",
    "image",
    "shows",
    "a",
    "green",
    "triangle",
    "near",
    "top",
    "left",
    "corner",
    "and",
    "small",
    "large",
    "yellow",
    "background",
    "object",
  ]
  recs = []
  n_images = max(1, n // 4)  # images are shared by several answers, as benchmark pairs share them
  for k in range(n_images):
    pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / f"img{k}.png")
  for k in range(n):
    q = " ".join(rng.choice(words, size=max(1, text_tokens // 4)))
    a = " ".join(rng.choice(words, size=max(1, text_tokens - text_tokens // 4)))
    recs.append(
      {
        "id": str(k),
        "images": [f"img{k % n_images}.png"],
        "question": f"<image>{q}?",
        "answer": a + ".",
        "system": REWARD_SYSTEM_PROMPT,
      }
    )
  return recs


def build(preset: str, dtype: str, image_size: int, model_dir: Path):
  """(model, processor): the preset's shapes with the demo world's tokenizer and settings."""
  from mrm_jax.demo.model_dir import write_model_dir
  from mrm_jax.models import create_reward_model, get_family
  from mrm_jax.models.hf_io import family_and_config
  from mrm_jax.models.processor import Processor

  write_model_dir(model_dir)
  fam, tiny = family_and_config(model_dir)
  if preset == "tiny":
    cfg = tiny
  else:
    fam = get_family("qwen2_vl")
    cfg = dataclasses.replace(
      fam.PRESETS[preset],
      **{
        k: getattr(tiny, k)
        for k in (
          "image_token_id",
          "video_token_id",
          "vision_start_token_id",
          "vision_end_token_id",
        )
      },
    )
  pixels = image_size * image_size
  processor = Processor.from_pretrained(model_dir, fam, cfg, min_pixels=pixels, max_pixels=pixels)
  model = create_reward_model("qwen2_vl", cfg, dtype=dtype)
  return model, processor


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
    "--preset", default="tiny", help="qwen2_vl preset: tiny (CPU), qwen2-vl-2b, qwen2-vl-7b"
  )
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--n", type=int, default=64, help="scoring records")
  p.add_argument(
    "--batch-size",
    type=int,
    default=16,
    help="global records per step (rounded up to a multiple of the device count)",
  )
  p.add_argument(
    "--devices", type=int, default=None, help="shard over the first N local devices (default: all)"
  )
  p.add_argument(
    "--image-size", type=int, default=56, help="image side in pixels (a multiple of 28)"
  )
  p.add_argument(
    "--text-tokens", type=int, default=48, help="about this many words of question + answer"
  )
  p.add_argument("--json", metavar="FILE", help="also write the figures here")
  args = p.parse_args(argv)

  import jax

  from mrm_jax.evaluate.scoring import score_records, scoring_mesh, step_rows

  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    (tmp / "images").mkdir()
    recs = synthetic_records(tmp / "images", args.n, args.image_size, args.text_tokens)
    model, processor = build(args.preset, args.dtype, args.image_size, tmp / "model")
    mesh = scoring_mesh(devices=jax.local_devices()[: args.devices] if args.devices else None)
    t0 = time.perf_counter()
    first = score_records(
      model, processor, recs, tmp / "images", args.batch_size, progress=False, mesh=mesh
    )
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = score_records(
      model, processor, recs, tmp / "images", args.batch_size, progress=False, mesh=mesh
    )
    seconds = time.perf_counter() - t0
  same = all(abs(a - b) <= 1e-6 * max(1.0, abs(a)) for a, b in zip(first, second))
  result = {
    "preset": args.preset,
    "dtype": args.dtype,
    "n": args.n,
    "batch_size": args.batch_size,
    "image_size": args.image_size,
    "text_tokens": args.text_tokens,
    "backend": jax.default_backend(),
    "devices": int(mesh.devices.size),
    "rows_per_step": step_rows(args.batch_size, mesh)[0],
    "first_pass_s": round(compile_s, 3),
    "seconds": round(seconds, 3),
    "sequences_per_s": round(args.n / seconds, 2),
    "deterministic": same,
  }
  print(json.dumps(result))
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main())
