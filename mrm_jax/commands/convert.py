"""`mrm-jax convert`: a native dataset (DESIGN §3.3) → preference pairs (see
`mrm_jax.construct.convert`)."""

from __future__ import annotations

import argparse

from mrm_jax.construct.convert import FORMATS, OUTPUT_FORMATS, convert
from mrm_jax.io import check_distinct_paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--input", required=True, help="the native dataset: a file, or a folder of its shards"
  )
  parser.add_argument(
    "--from", dest="fmt", required=True, choices=FORMATS, help="the input's native format"
  )
  parser.add_argument("--output", required=True, help="the pair file to write (JSON Lines)")
  parser.add_argument(
    "--format",
    default="canonical",
    choices=OUTPUT_FORMATS,
    help="output record format (default: canonical pairs)",
  )
  parser.add_argument(
    "--image-dir",
    default=None,
    help="where embedded image bytes are extracted (default: OUTPUT's folder/images); "
    "must lie inside the output's folder, since records refer to images relative to it",
  )
  parser.add_argument(
    "--seed",
    type=int,
    default=42,
    help="T2I formats only: seed of the balanced shuffle deciding which image is shown first",
  )


def run(args) -> int:
  check_distinct_paths({"--output": args.output}, {"--input": args.input})
  convert(args.input, args.fmt, args.output, args.format, args.image_dir, args.seed)
  return 0
