"""`mrm-jax export`: a reward model → an HF directory (config.json, safetensors with transformers-5
names, `value_head.safetensors`, tokenizer and preprocessor files), loadable by transformers and by
`mrm-jax score`. `--checkpoint` is an HF-format model directory or a training workdir.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mrm_jax.io import check_distinct_paths, check_writable_dir
from mrm_jax.loading import load_for_export
from mrm_jax.models import hf_io


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--checkpoint",
    required=True,
    help="model to export: an HF-format directory (or a training workdir checkpoint)",
  )
  parser.add_argument("--output", required=True, help="output HF directory")
  parser.add_argument(
    "--dtype",
    choices=["float32", "bfloat16"],
    default=None,
    help="tensor dtype in the safetensors (default: the parameter dtype)",
  )


def run(args) -> int:
  out = Path(args.output).resolve()
  check_distinct_paths({"--output": out}, {"--checkpoint": args.checkpoint})
  model, source_dir = load_for_export(args.checkpoint)
  check_writable_dir(out)
  hf_io.export_hf(model, out, dtype=args.dtype, source_dir=source_dir)
  print(f"exported {args.checkpoint} -> {out}")
  return 0
