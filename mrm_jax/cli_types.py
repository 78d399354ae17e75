"""argparse `type=` functions for numeric options, checked while the command line is parsed.

A bad value (`--batch-size 0`, `--timeout nan`, `--flip-fraction 2`) is then argparse's own
`mrm-jax CMD: error: argument --batch-size: ...` line with exit status 2, before any file is read
or any model loaded. Standard library only: every command module imports this at parse time.
"""

from __future__ import annotations

import argparse
import math


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
