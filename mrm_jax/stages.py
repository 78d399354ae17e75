"""Resumable stages: a directory of outputs plus a manifest naming what made them.

    runner = StageRunner(Faults.from_env(), say=print)
    manifest = runner.run(directory, "round_0/flip", inputs, settings, body)

A stage is done when DIR/manifest.json names the current key (a digest of the stage name, its
inputs and its settings) and every output it lists still has its recorded hash; a rerun then
skips it. `.started` holds the key of the attempt in progress: the same key keeps partial work
for the body to resume from, a different one (changed inputs) wipes the directory first. The
manifest is written last, atomically, so a kill at any point leaves the stage unfinished.

Fingerprints (`digest`, `file_sha256`, `model_fingerprint`) are content hashes, not paths: a
copied or moved workdir keeps its finished stages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jax

from mrm_jax.distributed import barrier
from mrm_jax.errors import UserError
from mrm_jax.faults import Faults
from mrm_jax.io import atomic_open, read_json_object, write_json
from mrm_jax.train.checkpoint import Checkpointer
from mrm_jax.train.manifest import sha256_file


def digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
  return sha256_file(path)


def model_fingerprint(path: Path) -> str:
  """A given model's identity without hashing its weights: config + file names and sizes (an HF
  directory), or the manifest and the latest checkpoint step (a training workdir)."""
  if not path.exists():
    raise UserError(f"{path}: no such model directory")
  if (path / "manifest.json").is_file():
    checkpoints = Checkpointer(path)
    step = checkpoints.latest_step()
    checkpoints.close()
    return digest({"manifest": file_sha256(path / "manifest.json"), "step": step})
  files = sorted(
    (str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file()
  )
  cfg = file_sha256(path / "config.json") if (path / "config.json").is_file() else None
  return digest({"config": cfg, "files": files})


@dataclasses.dataclass
class StageResult:
  """What a stage body made: its output files, counts for the manifest and the progress line,
  and any further manifest entries."""

  outputs: dict[str, Path]
  counts: dict
  extra: dict = dataclasses.field(default_factory=dict)


class Stage:
  """One stage directory: its key, whether it is finished, and its manifest."""

  def __init__(self, directory: Path, name: str, inputs: dict, settings: dict):
    self.dir = directory
    self.name = name
    self.key = digest({"stage": name, "inputs": inputs, "settings": settings})
    self.inputs = inputs
    self.manifest_path = directory / "manifest.json"

  def finished(self) -> dict | None:
    if not self.manifest_path.is_file():
      return None
    man = read_stage_manifest(self.manifest_path)
    if man["key"] != self.key:
      return None
    for rec in man["outputs"].values():
      p = self.dir / rec["path"]
      if not p.is_file() or file_sha256(p) != rec["sha256"]:
        return None
    return man

  def begin(self) -> None:
    marker = self.dir / ".started"
    previous = marker.read_text().strip() if marker.is_file() else None
    if previous != self.key and self.dir.exists():
      shutil.rmtree(self.dir)
    self.dir.mkdir(parents=True, exist_ok=True)
    if previous != self.key:
      with atomic_open(marker) as f:
        f.write(self.key)

  def finish(self, result: StageResult, seconds: float) -> dict:
    outputs = {
      k: {"path": os.path.relpath(p, self.dir), "sha256": file_sha256(p)}
      for k, p in result.outputs.items()
    }
    man = {
      "stage": self.name,
      "key": self.key,
      "inputs": self.inputs,
      "outputs": outputs,
      "counts": result.counts,
      "seconds": round(seconds, 3),
      **result.extra,
    }
    write_json(self.manifest_path, man)
    return man


def read_stage_manifest(path: Path) -> dict:
  """A stage's manifest.json; a malformed one (edited, or damaged on disk: the run writes it
  atomically) is a UserError naming it rather than a silently redone stage."""
  man = read_json_object(path)
  outputs = man.get("outputs")
  ok = (
    isinstance(man.get("key"), str)
    and isinstance(outputs, dict)
    and all(
      isinstance(r, dict) and isinstance(r.get("path"), str) and isinstance(r.get("sha256"), str)
      for r in outputs.values()
    )
  )
  if not ok:
    raise UserError(
      f"{path}: not a stage manifest (needs 'key' and 'outputs' "
      "{name: {path, sha256}}); delete it to redo the stage"
    )
  return man


def counts_line(counts: dict) -> str:
  return ", ".join(f"{k} {v}" for k, v in counts.items())


class StageRunner:
  """Runs stages across processes: process 0 owns the stage directories and manifests; a body
  runs on process 0 only, or on every process (`everyone`: training, scoring). `faults` gets one
  tick at the end of each stage (its last unit of work, just before the manifest); `say`
  receives one progress line per stage (process 0 only)."""

  def __init__(self, faults: Faults, say: Callable[[str], None]):
    self.faults = faults
    self.rank, self.nproc = jax.process_index(), jax.process_count()
    self.primary = self.rank == 0
    self._say = say

  def say(self, text: str) -> None:
    if self.primary:
      self._say(text)

  def sync(self, name: str) -> None:
    barrier(f"curate:{name}")

  def run(
    self,
    directory: Path,
    name: str,
    inputs: dict,
    settings: dict,
    body: Callable[[Path], StageResult],
    *,
    everyone: bool = False,
  ) -> dict:
    """The manifest of the stage: `body(directory)` is run unless the stage is done."""
    stage = Stage(directory, name, inputs, settings)
    man = stage.finished()
    self.sync(f"{name}:check")
    if man is not None:
      self.say(f"[{name}] done earlier ({counts_line(man['counts'])})")
      return man
    if self.primary:
      stage.begin()
    self.sync(f"{name}:begin")
    t0 = time.time()
    result = body(directory) if (everyone or self.primary) else None
    self.sync(f"{name}:body")
    if self.primary:
      self.faults.tick(name)
      man = stage.finish(result, time.time() - t0)
      self.say(f"[{name}] {counts_line(man['counts'])} ({man['seconds']:.1f} s)")
    self.sync(f"{name}:finish")
    return read_stage_manifest(stage.manifest_path)
