"""`mrm-jax t2i`: text-to-image preferences → balanced two-image reward-model pairs (DESIGN §8)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mrm_jax.construct import t2i
from mrm_jax.construct.convert import OUTPUT_FORMATS, convert, write_pairs
from mrm_jax.io import check_distinct_paths

NATIVE = ("pickapic", "hpdv2", "imagereward")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.description = (
    "Reformulate T2I preferences (caption, chosen image, rejected image) as two-image pairs: the "
    "question shows 'Image 1' and 'Image 2' with the caption; the chosen answer names the "
    "preferred "
    "image's position first ('Image 2 is better than Image 1.'). Exactly floor(n/2) pairs show the "
    "preferred image first, picked by a seeded shuffle, so position carries no signal."
  )
  p.add_argument(
    "--input",
    required=True,
    help="T2I records JSONL {id?, caption, chosen_image, rejected_image}, or a native dataset "
    "(file or folder of shards) with --from",
  )
  p.add_argument("--output", required=True, help="pair file to write")
  p.add_argument("--seed", type=int, default=42, help="seed of the balanced shuffle (default 42)")
  p.add_argument(
    "--format",
    choices=OUTPUT_FORMATS,
    default="canonical",
    help="output record format (default canonical)",
  )
  p.add_argument(
    "--from",
    dest="source",
    choices=("generic",) + NATIVE,
    default="generic",
    help="input format: generic T2I JSONL (default), or native Pick-a-Pic v2 / HPDv2 / ImageReward",
  )
  p.add_argument(
    "--image-dir",
    default=None,
    help="native formats with embedded images: where they are extracted "
    "(default: OUTPUT's folder/images)",
  )


def run(args) -> int:
  check_distinct_paths({"--output": args.output}, {"--input": args.input})

  if args.source in NATIVE:
    n = convert(args.input, args.source, args.output, args.format, args.image_dir, args.seed)
    print(f"t2i: wrote {n} {args.format} pairs from {args.source} -> {args.output}")
    return 0
  records, wheres = t2i.read_generic(args.input)
  pairs = t2i.reformulate(records, seed=args.seed, wheres=wheres)
  write_pairs(args.output, pairs, args.format, source_root=Path(args.input).parent)
  first = sum(p["meta"]["chosen_position"] == 1 for p in pairs)
  print(
    f"t2i: {len(pairs)} pairs ({first} with the preferred image first, {len(pairs) - first} "
    "second) "
    f"-> {args.output}"
  )
  return 0
