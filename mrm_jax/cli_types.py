"""argparse `type=` functions for numeric options, checked while the command line is parsed.

A bad value (`--batch-size 0`, `--timeout nan`, `--flip-fraction 2`) is then argparse's own
`mrm-jax CMD: error: argument --batch-size: ...` line with exit status 2, before any file is read
or any model loaded. Standard library only: every command module imports this at parse time.
"""

from __future__ import annotations

import argparse
import math

IMAGE_PREPROCESS_CHOICES = ("auto", "transformers", "llamafactory")
TEMPLATE_CHOICES = ("model", "qwen2_vl", "qwen3_vl", "qwen3_vl_nothink")


def add_processing_arguments(parser) -> None:
  """`--image-preprocess` and `--template`: how records become model inputs (README: LLaMA-Factory
  interop)."""
  parser.add_argument(
    "--image-preprocess",
    choices=IMAGE_PREPROCESS_CHOICES,
    default="auto",
    help="image preprocessing: transformers' image processor (PIL backend), "
    "or LLaMA-Factory's (image_max_pixels 768*768 / image_min_pixels 32*32 "
    "resize, 28 px minimum side, alpha dropped, torchvision resize); auto "
    "(default) = llamafactory for a directory LLaMA-Factory wrote, announced on "
    "stderr, else transformers",
  )
  parser.add_argument(
    "--template",
    choices=TEMPLATE_CHOICES,
    default="model",
    help="chat template: the model directory's own (default), or "
    "LLaMA-Factory's of that name (qwen3_vl: Qwen3-VL Thinking, an empty <think> "
    "block before the answer)",
  )


def _number(kind, text: str):
  try:
    value = kind(text)
  except ValueError:
    what = "an integer" if kind is int else "a number"
    raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
  if kind is float and not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
  return value


def positive_int(text: str) -> int:
  value = _number(int, text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
  return value


def nonnegative_int(text: str) -> int:
  value = _number(int, text)
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
  return value


def finite_float(text: str) -> float:
  return _number(float, text)


def positive_float(text: str) -> float:
  value = _number(float, text)
  if value <= 0:
    raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
  return value


def nonnegative_float(text: str) -> float:
  value = _number(float, text)
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
  return value


def fraction(text: str) -> float:
  value = _number(float, text)
  if not 0 <= value <= 1:
    raise argparse.ArgumentTypeError(f"must be within [0, 1], got {text}")
  return value
