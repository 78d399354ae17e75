"""What the `mrm-jax` command prints besides its own output: quiet third-party start-up, log lines
that never land on an open progress bar, and errors on a line of their own.

A successful run should print nothing a user has to wonder about. Left alone, the stack announces
itself: TensorFlow's C++ logging (the oneDNN notice, preceded by absl's "All log messages before
absl::InitializeLog()"), jax's INFO line about the TPU backend it could not find on a CPU or GPU
host, transformers' "PyTorch was not found" advice (the runtime needs no torch), matplotlib's font
cache. None of it says anything about the run. `-v` brings all of it back.
"""

from __future__ import annotations

import gc
import logging
import os
import sys

# Set before TensorFlow / transformers are first imported (they read them once, at import).
QUIET_ENVIRONMENT = {
  "TF_CPP_MIN_LOG_LEVEL": "1",  # TF C++ INFO lines (CPU feature notice); warnings stay
  # TF announces its oneDNN kernels before its log level applies. TF only runs tf.data here (the
  # work inside is numpy), so the kernels change nothing; turning them off turns off the notice.
  "TF_ENABLE_ONEDNN_OPTS": "0",
  "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",  # "PyTorch was not found ..." and similar advice
}

LOG_FORMAT = "%(asctime)s %(levelname).1s %(name)s] %(message)s"


def quiet_third_party(verbose: bool = False) -> None:
  """Environment defaults for quiet start-up; a value the user set is kept."""
  if verbose:
    return
  for key, value in QUIET_ENVIRONMENT.items():
    os.environ.setdefault(key, value)


def _open_bars() -> list:
  """tqdm's live bars, without importing tqdm when nothing has."""
  tqdm_module = sys.modules.get("tqdm")
  if tqdm_module is None:
    return []
  return [bar for bar in list(getattr(tqdm_module.tqdm, "_instances", ())) if not bar.disable]


class _BarAwareHandler(logging.StreamHandler):
  """Writes each record through `tqdm.write` while a bar is open, so the line lands above the bar
  instead of being glued to its end. Without a fixed stream it writes to whatever `sys.stderr` is at
  the
  time (a test's capture, a redirected stream), not to the one that was current at set-up."""

  def __init__(self, stream=None):
    super().__init__(stream)
    self._fixed = stream

  @property
  def stream(self):
    return self._fixed if self._fixed is not None else sys.stderr

  @stream.setter
  def stream(self, value):
    self._fixed = value

  def emit(self, record: logging.LogRecord) -> None:
    if not _open_bars():
      super().emit(record)
      return
    try:
      sys.modules["tqdm"].tqdm.write(self.format(record), file=self.stream)
    except Exception:  # noqa: BLE001 -- logging must never raise
      self.handleError(record)


def setup_logging(verbose: bool = False) -> None:
  """The project's own INFO lines by default; every library's INFO and DEBUG with -v."""
  handler = _BarAwareHandler()
  handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
  root = logging.getLogger()
  root.handlers[:] = [handler]
  root.setLevel(logging.DEBUG if verbose else logging.WARNING)
  logging.getLogger("mrm_jax").setLevel(logging.DEBUG if verbose else logging.INFO)


def close_progress_bars() -> None:
  """Closes every open bar, so what is printed next starts on a fresh line."""
  for bar in _open_bars():
    bar.close()


def print_error(message: str) -> None:
  close_progress_bars()
  print(message, file=sys.stderr, flush=True)


def release_background_work() -> None:
  """Frees tf.data iterators still held in reference cycles now, while the interpreter is whole:
  finalised at shutdown they log "Error occurred when finalizing GeneratorDataset iterator"."""
  gc.collect()
