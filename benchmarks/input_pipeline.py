"""Input pipeline throughput: pairs (examples) per second per CPU core, 448×448 images.

Builds a synthetic pair file (random-noise 448² JPEGs, so decoding costs what a photo costs;
~60-word questions and answers), then runs the real training pipeline
(`mrm_jax.data.pipeline` + the Qwen2-VL processor: JPEG decode, smart_resize, bicubic resize,
normalise, patchify, chat template, tokenise, M-RoPE ids, collate to static shapes) pinned to
`--cores` CPU cores with as many parallel map calls, and reports pairs/s and pairs/s per core.
One pair = chosen + rejected = two encoded sequences of one 448² image (1024 patches each).

    python benchmarks/input_pipeline.py --cores 1
    python benchmarks/input_pipeline.py --cores 1 2 4 8   # scaling (on a machine with the cores)

Nothing is downloaded: the tokenizer is the embedded demo world's (its size barely matters; the
image work dominates), with Qwen2-VL's image settings at max_pixels = 448².
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = (
  "the a red green blue circle square triangle left right top bottom image shows small large "
  "object near corner background answer question describe colour shape"
).split()


def make_data(root: Path, n_pairs: int, n_images: int, size: int = 448, seed: int = 0) -> Path:
  from PIL import Image

  rng = np.random.default_rng(seed)
  (root / "img").mkdir(parents=True, exist_ok=True)
  for i in range(n_images):
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(root / "img" / f"{i}.jpg", quality=90)
  text = lambda n: " ".join(rng.choice(WORDS, n))
  with open(root / "pairs.jsonl", "w") as f:
    for i in range(n_pairs):
      f.write(
        json.dumps(
          {
            "id": f"b{i}",
            "images": [f"img/{i % n_images}.jpg"],
            "question": text(60) + "?",
            "chosen": text(60) + ".",
            "rejected": text(60) + ".",
          }
        )
        + "\n"
      )
  return root / "pairs.jsonl"


def processor_for(root: Path):
  from mrm_jax.demo.model_dir import write_model_dir
  from mrm_jax.models import hf_io
  from mrm_jax.models.processor import Processor

  write_model_dir(root / "model")
  fam, cfg = hf_io.family_and_config(root / "model")
  return Processor.from_pretrained(
    root / "model", fam, cfg, min_pixels=56 * 56, max_pixels=448 * 448
  )


def measure(pairs: Path, processor, cores: int, batch: int, batches: int, warmup: int) -> dict:
  from mrm_jax.data import pipeline as pl

  avail = sorted(os.sched_getaffinity(0))
  if cores > len(avail):
    raise SystemExit(f"--cores {cores}: only {len(avail)} cores available")
  os.sched_setaffinity(0, avail[:cores])
  try:
    p = pl.from_processor(
      pl.load_entries(pairs),
      processor,
      batch_size=batch,
      seq_lens=(512, 1024),
      patch_budgets=(2 * batch * 1024,),
      seed=0,
      num_parallel_calls=cores,
      prefetch=2,
    )
    for _ in range(warmup):
      next(p)
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(batches):
      b = next(p)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    p.close()
    del p
    import gc

    gc.collect()
  finally:
    os.sched_setaffinity(0, avail)
  n = batches * batch
  return {
    "cores": cores,
    "pairs": n,
    "seconds": round(wall, 3),
    "pairs_per_s": round(n / wall, 2),
    "pairs_per_s_per_core": round(n / wall / cores, 2),
    "pairs_per_cpu_second": round(n / cpu, 2),
    "cpu_utilisation": round(cpu / wall / cores, 2),
    "batch_shapes": {k: list(v.shape) for k, v in b.items() if k in ("input_ids", "pixel_values")},
  }


_POOL = {}  # what each forked worker of `measure_pool` reads: the processor and the entries


def _encode_pair(index: int):
  """One pair → (chosen, rejected) encodings: what a tf.data worker of PairPipeline does per
  record."""
  from mrm_jax.data.pipeline import check_pair
  from mrm_jax.data.records import pair_to_scoring

  entry, processor = _POOL["entries"][index], _POOL["processor"]
  pair, _ = check_pair(entry)
  chosen, rejected = pair_to_scoring(pair)
  first = processor.encode(chosen, entry.image_root, 1024, entry.where)
  # the pair's images once: the rejected response reuses them, as the pipeline does
  return first, processor.encode(rejected, entry.image_root, 1024, entry.where, vision=first)


def measure_pool(pairs: Path, processor, cores: int, batch: int, batches: int, warmup: int) -> dict:
  """The same per-pair work (image decode, resize, patchify, chat template, tokenise, M-RoPE ids) in
  a pool of `cores` forked processes, collated to the pipeline's static shapes in this one; no
  tf.data,
  for machines without tensorflow. The figure to set beside a train step's pairs/s."""
  import multiprocessing as mp

  from mrm_jax.data import pipeline as pl
  from mrm_jax.models.processor import pair_share

  os.environ["TOKENIZERS_PARALLELISM"] = "false"  # forked workers: no tokenizer threads
  _POOL.update(entries=pl.load_entries(pairs), processor=processor)
  n = len(_POOL["entries"])
  with mp.get_context("fork").Pool(cores) as pool:

    def run(n_batches: int, start: int):
      out = None
      for k in range(n_batches):
        idx = [(start + k * batch + i) % n for i in range(batch)]
        encoded = pool.map(_encode_pair, idx)
        examples = [e[0] for e in encoded] + [e[1] for e in encoded]
        seq = 512 if max(e.length for e in examples) <= 512 else 1024
        out = processor.collate(
          examples,
          seq,
          max(sum(e.num_patches for e in examples[:batch]), 4),
          share=pair_share(len(examples)),
        )
      return out

    run(warmup, 0)
    t0 = time.perf_counter()
    b = run(batches, warmup * batch)
    wall = time.perf_counter() - t0
  m = batches * batch
  return {
    "engine": "pool",
    "cores": cores,
    "pairs": m,
    "seconds": round(wall, 3),
    "pairs_per_s": round(m / wall, 2),
    "pairs_per_s_per_core": round(m / wall / cores, 2),
    "batch_shapes": {k: list(v.shape) for k, v in b.items() if k in ("input_ids", "pixel_values")},
  }


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument(
    "--cores", type=int, nargs="+", default=[1], help="core counts to measure (pinned)"
  )
  ap.add_argument("--batch", type=int, default=8, help="pairs per batch")
  ap.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
  ap.add_argument("--warmup", type=int, default=2, help="untimed batches first")
  ap.add_argument("--pairs", type=int, default=256, help="pairs in the synthetic file")
  ap.add_argument("--images", type=int, default=32, help="distinct 448² images")
  ap.add_argument("--image-size", type=int, default=448, help="image side in pixels")
  ap.add_argument(
    "--engine",
    choices=("tfdata", "pool"),
    default="tfdata",
    help="tfdata: the training pipeline itself; pool: the same encoding in a process pool "
    "(no tensorflow needed)",
  )
  args = ap.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  with tempfile.TemporaryDirectory(prefix="mrm-bench-input-") as tmp:
    root = Path(tmp)
    pairs = make_data(root, args.pairs, args.images, args.image_size)
    processor = processor_for(root)
    run = measure_pool if args.engine == "pool" else measure
    for cores in args.cores:
      print(
        json.dumps(run(pairs, processor, cores, args.batch, args.batches, args.warmup)), flush=True
      )


if __name__ == "__main__":
  main()
