"""Scoring a record file with a resumable progress log (`mrm-jax score`, DESIGN §3.1/§3.2).

Output: one line per input line, same order, the input record plus `"score": float`, written
atomically at the end. A missing image or one outside the image root stops the run with an error
naming the record (file:line).

Scoring is sharded over all devices of all processes (every process reads the whole input and
walks the same global batches, but encodes only its own devices' records; see
mrm_jax.evaluate.scoring); the output does not depend on the number of processes. Identical
records (same images, system, question and answer) are scored once. Scores are streamed, in input
order, to a progress log `OUTPUT.progress` one chunk at a time (each line fsynced); a killed run
started again with the same command resumes after the last finished chunk and writes an output
identical to an uninterrupted run's. The log starts with the settings that determine the scores
(model, dtype, max length, pixels, image root); a log written with other settings, or for other
records, is not reused. It is deleted once the output is written.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from mrm_jax import faults
from mrm_jax.errors import UserError
from mrm_jax.evaluate.scoring import (
  iter_score_chunks,
  read_scoring_file,
  scoring_key,
  scoring_mesh,
  step_rows,
)
from mrm_jax.io import (
  AppendLog,
  atomic_open,
  check_distinct_paths,
  dumps,
  read_append_log,
  write_jsonl,
)
from mrm_jax.loading import load_model

log = logging.getLogger(__name__)

PROGRESS_SUFFIX = ".progress"
# tests: stop after this many chunks were logged (the log then looks like a killed run's)
FAULT_ENV = faults.SCORE_STOP_ENV


def _model_fingerprint(path: Path) -> list:
  """Name, size and modification time of the model directory's files: a model rewritten in place
  does not reuse the scores of the old one."""
  if not path.is_dir():
    return []
  return [
    [f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(path.iterdir()) if f.is_file()
  ]


def _digest(keys) -> str:
  return hashlib.sha1("".join(keys).encode("ascii")).hexdigest()


def _valid_prefix(entries: list[dict], settings: dict, keys: list[str]) -> list[dict]:
  """The leading chunks of a progress log that belong to this run: same settings, contiguous from
  record 0, each chunk's records the same as now."""
  if not entries or entries[0].get("settings") != settings:
    return []
  good, pos = [], 0
  for e in entries[1:]:
    try:
      start, scores = int(e["start"]), [float(s) for s in e["scores"]]
      ok = (
        start == pos
        and 0 < len(scores)
        and pos + len(scores) <= len(keys)
        and e["digest"] == _digest(keys[pos : pos + len(scores)])
      )
    except (KeyError, TypeError, ValueError):
      ok = False
    if not ok:
      break
    good.append({"start": start, "digest": e["digest"], "scores": scores})
    pos += len(scores)
  return good


def _open_progress(path: Path, settings: dict, keys: list[str], resume: bool, primary: bool):
  """(chunks to reuse, AppendLog or None). Process 0 repairs / rewrites the log; the others read it
  after it has (a shared filesystem, like the input and output)."""
  good: list[dict] = []
  progress = None
  if primary:
    if resume and path.exists():
      progress = AppendLog(path)  # drops a torn last line
      good = _valid_prefix(progress.records, settings, keys)
      if len(good) + 1 != len(progress.records):
        progress.close()
        progress = None
        log.warning(
          "%s: %s",
          path,
          f"only the first {len(good)} chunks match this run; rescoring the rest"
          if good
          else "written for other settings or records; starting over",
        )
      elif good:
        log.info("%s: resuming after %d records", path, sum(len(e["scores"]) for e in good))
    if progress is None:
      with atomic_open(path) as f:
        f.write("".join(dumps(r) + "\n" for r in [{"settings": settings}] + good))
      progress = AppendLog(path)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("mrm-jax score: progress log ready")
    if not primary:
      good = _valid_prefix(read_append_log(path), settings, keys) if resume else []
    done = sum(len(e["scores"]) for e in good)
    seen = multihost_utils.process_allgather(np.asarray([done], np.int64)).ravel()
    if len(set(seen.tolist())) != 1:
      raise UserError(
        f"{path}: processes see different progress ({seen.tolist()}); the output folder must be "
        f"on a filesystem all processes share"
      )
  return good, progress


def score_file(
  input_path,
  output,
  model_path,
  *,
  image_root=None,
  batch_size: int = 8,
  dtype: str = "float32",
  max_len: int = 4096,
  max_pixels: int | None = None,
  chunk_size: int | None = None,
  resume: bool = True,
  image_preprocess: str | None = None,
  template: str | None = None,
) -> int:
  """Scores every record of `input_path` into `output`; returns how many (0 on processes > 0)."""
  out = Path(output)
  path = out.with_name(out.name + PROGRESS_SUFFIX)
  check_distinct_paths({"--output": out, "--output's progress log": path}, {"--input": input_path})
  inp = Path(input_path)
  if not inp.is_file():
    raise UserError(f"{inp}: no such file")
  if image_root is not None and not Path(image_root).is_dir():
    raise UserError(f"--image-root {image_root}: no such directory")
  raw, records, lines = read_scoring_file(inp)
  root = Path(image_root) if image_root else inp.parent
  model, processor = load_model(
    model_path,
    dtype=dtype,
    max_pixels=max_pixels,
    image_preprocess=image_preprocess,
    template=template,
  )

  mesh = scoring_mesh(devices=jax.devices())  # every device of every process
  rows, _ = step_rows(batch_size, mesh)
  chunk = chunk_size or 32 * rows
  keys = [scoring_key(r) for r in records]
  settings = {
    "model": str(Path(model_path).resolve()),
    "files": _model_fingerprint(Path(model_path)),
    "dtype": dtype,
    "max_len": max_len,
    "max_pixels": max_pixels,
    "image_root": str(root.resolve()),
    "image_preprocess": processor.image_preprocess,
    "template": processor.template,
  }
  primary = jax.process_index() == 0
  good, progress = _open_progress(path, settings, keys, resume, primary)
  scores: list[float] = [s for e in good for s in e["scores"]]
  start = len(scores)
  known = dict(zip(keys, scores))
  check_fault = faults.stop_after(FAULT_ENV, "chunks")
  try:
    for n, (c0, got) in enumerate(
      iter_score_chunks(
        model,
        processor,
        records,
        root,
        batch_size,
        start=start,
        known=known,
        max_len=max_len,
        chunk=chunk,
        mesh=mesh,
        where=lambda i: f"{inp}:{lines[i]}",
      ),
      1,
    ):
      scores.extend(got)
      if progress is not None:
        progress.append({"start": c0, "digest": _digest(keys[c0 : c0 + len(got)]), "scores": got})
      check_fault(n)
    written = 0
    if primary:
      written = write_jsonl(out, ({**r, "score": s} for r, s in zip(raw, scores)))
      print(f"scored {written} records -> {out}")
  except BaseException:
    if (
      progress is not None and len(progress.records) <= 1
    ):  # nothing scored yet: leave no log behind
      progress.close()
      path.unlink(missing_ok=True)
    raise
  finally:
    if progress is not None:
      progress.close()
  if primary:
    path.unlink(missing_ok=True)
  return written
