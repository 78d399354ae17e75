"""Training inside curation (DESIGN §9 step 3): the training config of a stage, the fault hook
on its batches, and JAX's compilation cache (every round retrains with the same shapes)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections

from mrm_jax.faults import Faults
from mrm_jax.train.data import default_data_factory

# Sections of a curation config that are not training settings.
NOT_TRAINING = ("curate", "world")


def train_config(cfg, *, model: str, data_files: list[Path], eval_spec: str, image_root: Path):
  """The training config of one training stage: cfg's training settings on these files."""
  t = ml_collections.ConfigDict(cfg.to_dict())
  for k in NOT_TRAINING:
    if k in t:
      del t[k]
  t.model.path = model
  t.data.train = ",".join(str(f) for f in data_files)
  t.data.eval = eval_spec
  t.data.image_root = str(image_root)
  return t


def stage_settings(tcfg) -> dict:
  """The training settings a stage is keyed on: all but the data paths (the stage's inputs
  carry the data's content hashes)."""
  settings = tcfg.to_dict()
  settings["data"] = {k: v for k, v in settings["data"].items() if k not in ("train", "eval")}
  return settings


class TickingData:
  """A train data source whose iterator calls `tick()` per batch (the fault hook)."""

  def __init__(self, inner, tick: Callable[[], None]):
    self.inner, self.tick = inner, tick

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def __iter__(self):
    for batch in self.inner:
      self.tick()
      yield batch


def fault_data_factory(faults: Faults, stage: str):
  """A `train(data_factory=)` that ticks `stage` per training batch; None when no fault is
  asked for there (the trainer's own factory then)."""
  if not faults.active(stage):
    return None

  def factory(c, split, path):
    data = default_data_factory(c, split, path)
    return TickingData(data, lambda: faults.tick(stage)) if split == "train" else data

  return factory


def enable_compilation_cache(path: Path) -> None:
  """Each round retrains with the same shapes, but every `train()` call builds new jitted
  functions: JAX's persistent cache makes every compile after the first a disk read (also across
  restarts). JAX decides once per process whether the cache is on, so call this before anything
  compiles (`curate run` does; so should an in-process caller such as the demo). A cache the user
  configured wins."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", str(path))
