"""`mrm-jax score`: reward of every record of a JSONL file (see `mrm_jax.evaluate.score_file`)."""

from __future__ import annotations

import argparse

from mrm_jax import distributed
from mrm_jax.cli_types import add_processing_arguments, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.description = (
    "Reward of every record of a JSONL file. Output: one line per input line, same order, the "
    "input "
    'record plus "score", written atomically at the end. Scoring is sharded over all devices of '
    "all "
    "processes; identical records are scored once. Scores are streamed to OUTPUT.progress one "
    "chunk at "
    "a time, so a killed run started again with the same command resumes after the last finished "
    "chunk and writes the same output as an uninterrupted run."
  )
  parser.add_argument(
    "--model",
    required=True,
    help="HF-format model directory (config.json, safetensors, "
    "tokenizer, optional value_head.safetensors) or a training workdir checkpoint",
  )
  parser.add_argument(
    "--input", required=True, help="scoring records, JSONL: {id, images, question, answer, system?}"
  )
  parser.add_argument(
    "--output", required=True, help='output JSONL: each input record plus "score"'
  )
  parser.add_argument(
    "--batch-size",
    type=positive_int,
    default=8,
    help="records per forward pass over all devices "
    "(default 8; rounded up to a multiple of the device count, padding rows are discarded)",
  )
  parser.add_argument(
    "--image-root",
    default=None,
    help="folder image paths are relative to (default: the input "
    "file's folder); paths escaping it are refused",
  )
  parser.add_argument(
    "--dtype",
    choices=["float32", "bfloat16"],
    default="float32",
    help="compute dtype (parameters are loaded in float32)",
  )
  parser.add_argument(
    "--max-len",
    type=positive_int,
    default=4096,
    help="maximum tokens per record; longer prompts are cut (never the answer's end)",
  )
  parser.add_argument(
    "--max-pixels",
    type=positive_int,
    default=None,
    help="override the processor's max_pixels per image",
  )
  parser.add_argument(
    "--chunk-size",
    type=positive_int,
    default=None,
    metavar="N",
    help="records encoded and scored together and saved to OUTPUT.progress as one unit "
    "(default 32 batches); resuming needs the same value and device count for bit-identical "
    "scores",
  )
  parser.add_argument(
    "--no-resume",
    action="store_true",
    help="ignore an existing OUTPUT.progress and score every record again",
  )
  add_processing_arguments(parser)
  distributed.add_arguments(parser)


def run(args) -> int:
  from mrm_jax.evaluate.score_file import score_file  # jax starts after distributed.initialize

  distributed.initialize(args)
  score_file(
    args.input,
    args.output,
    args.model,
    image_root=args.image_root,
    batch_size=args.batch_size,
    dtype=args.dtype,
    max_len=args.max_len,
    max_pixels=args.max_pixels,
    chunk_size=args.chunk_size,
    resume=not args.no_resume,
    image_preprocess=args.image_preprocess,
    template=args.template,
  )
  return 0
