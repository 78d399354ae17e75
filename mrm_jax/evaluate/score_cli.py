"""`mrm-jax score`: reward of every record of a JSONL file (DESIGN §3.1/§3.2).

Output: one line per input line, same order, the input record plus `"score": float`, written
atomically at the end. A missing image or one outside the image root stops the run with an error
naming the record (file:line).

Scoring is sharded over all devices of all processes (every process reads the whole input and
scores the same global batches; see mrm_jax.evaluate.scoring); identical records (same images,
system, question and answer) are scored once. Scores are streamed, in input
order, to a progress log `OUTPUT.progress` one chunk at a time (each line fsynced); a killed run
started again with the same command resumes after the last finished chunk and writes an output
identical to an uninterrupted run's. The log starts with the settings that determine the scores
(model, dtype, max length, pixels, image root); a log written with other settings, or for other
records, is not reused. It is deleted once the output is written.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
from pathlib import Path

from mrm_jax.cli_types import positive_int

log = logging.getLogger(__name__)

PROGRESS_SUFFIX = ".progress"
# tests: raise after this many chunks were logged (the log then looks like a killed run's)
FAULT_ENV = "MRM_JAX_FAULT_SCORE_STOP_AFTER_CHUNKS"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.description = "Reward of every record of a JSONL file. " + " ".join(__doc__.split("\n\n", 1)[1].split())
  parser.add_argument("--model", required=True, help="HF-format model directory (config.json, safetensors, "
                      "tokenizer, optional value_head.safetensors) or a training workdir checkpoint")
  parser.add_argument("--input", required=True, help="scoring records, JSONL: {id, images, question, answer, system?}")
  parser.add_argument("--output", required=True, help="output JSONL: each input record plus \"score\"")
  parser.add_argument("--batch-size", type=positive_int, default=8,
                      help="records per forward pass over all devices "
                      "(default 8; rounded up to a multiple of the device count, padding rows are discarded)")
  parser.add_argument("--image-root", default=None, help="folder image paths are relative to (default: the input "
                      "file's folder); paths escaping it are refused")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                      help="compute dtype (parameters are loaded in float32)")
  parser.add_argument("--max-len", type=positive_int, default=4096,
                      help="maximum tokens per record; longer prompts are cut (never the answer's end)")
  parser.add_argument("--max-pixels", type=positive_int, default=None,
                      help="override the processor's max_pixels per image")
  parser.add_argument("--chunk-size", type=positive_int, default=None, metavar="N",
                      help="records encoded and scored together and saved to OUTPUT.progress as one unit "
                      "(default 32 batches); resuming needs the same value and device count for bit-identical "
                      "scores")
  parser.add_argument("--no-resume", action="store_true",
                      help="ignore an existing OUTPUT.progress and score every record again")
  from mrm_jax import distributed
  distributed.add_arguments(parser)


def load_model_for_scoring(path: str, dtype: str = "float32", max_pixels: int | None = None):
  """(model, processor) from an HF directory (the training code may extend this to workdir checkpoints)."""
  from mrm_jax.models import load_reward_model
  return load_reward_model(path, dtype=dtype, max_pixels=max_pixels)


def _model_fingerprint(path: Path) -> list:
  """Name, size and modification time of the model directory's files: a model rewritten in place
  does not reuse the scores of the old one."""
  if not path.is_dir():
    return []
  return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(path.iterdir()) if f.is_file()]


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
      ok = start == pos and 0 < len(scores) and pos + len(scores) <= len(keys) and \
          e["digest"] == _digest(keys[pos:pos + len(scores)])
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
  import jax

  from mrm_jax.io import AppendLog, atomic_open, dumps, read_append_log
  good: list[dict] = []
  progress = None
  if primary:
    if resume and path.exists():
      progress = AppendLog(path)  # drops a torn last line
      good = _valid_prefix(progress.records, settings, keys)
      if len(good) + 1 != len(progress.records):
        progress.close()
        progress = None
        log.warning("%s: %s", path, f"only the first {len(good)} chunks match this run; rescoring the rest" if good
                    else "written for other settings or records; starting over")
      elif good:
        log.info("%s: resuming after %d records", path, sum(len(e["scores"]) for e in good))
    if progress is None:
      with atomic_open(path) as f:
        f.write("".join(dumps(r) + "\n" for r in [{"settings": settings}] + good))
      progress = AppendLog(path)
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("mrm-jax score: progress log ready")
    if not primary:
      good = _valid_prefix(read_append_log(path), settings, keys) if resume else []
    done = sum(len(e["scores"]) for e in good)
    seen = multihost_utils.process_allgather(np.asarray([done], np.int64)).ravel()
    if len(set(seen.tolist())) != 1:
      from mrm_jax.errors import UserError
      raise UserError(f"{path}: processes see different progress ({seen.tolist()}); the output folder must be "
                      f"on a filesystem all processes share")
  return good, progress


def run(args) -> int:
  import jax

  from mrm_jax import distributed
  from mrm_jax.errors import UserError
  from mrm_jax.evaluate.scoring import iter_score_chunks, read_scoring_file, scoring_key, scoring_mesh, step_rows
  from mrm_jax.io import check_distinct_paths, write_jsonl

  out = Path(args.output)
  path = out.with_name(out.name + PROGRESS_SUFFIX)
  check_distinct_paths({"--output": out, "--output's progress log": path}, {"--input": args.input})
  distributed.initialize(args)
  inp = Path(args.input)
  if not inp.is_file():
    raise UserError(f"{inp}: no such file")
  if args.image_root is not None and not Path(args.image_root).is_dir():
    raise UserError(f"--image-root {args.image_root}: no such directory")
  raw, records, lines = read_scoring_file(inp)
  root = Path(args.image_root) if args.image_root else inp.parent
  model, processor = load_model_for_scoring(args.model, args.dtype, args.max_pixels)

  mesh = scoring_mesh(devices=jax.devices())  # every device of every process
  rows, _ = step_rows(args.batch_size, mesh)
  chunk = args.chunk_size or 32 * rows
  keys = [scoring_key(r) for r in records]
  settings = {"model": str(Path(args.model).resolve()), "files": _model_fingerprint(Path(args.model)),
              "dtype": args.dtype, "max_len": args.max_len, "max_pixels": args.max_pixels,
              "image_root": str(root.resolve())}
  primary = jax.process_index() == 0
  good, progress = _open_progress(path, settings, keys, not args.no_resume, primary)
  scores: list[float] = [s for e in good for s in e["scores"]]
  start = len(scores)
  known = dict(zip(keys, scores))
  stop_after = int(os.environ.get(FAULT_ENV, "0") or 0)
  try:
    for n, (c0, got) in enumerate(iter_score_chunks(model, processor, records, root, args.batch_size, start=start,
                                                    known=known, max_len=args.max_len, chunk=chunk, mesh=mesh,
                                                    where=lambda i: f"{inp}:{lines[i]}"), 1):
      scores.extend(got)
      if progress is not None:
        progress.append({"start": c0, "digest": _digest(keys[c0:c0 + len(got)]), "scores": got})
      if stop_after and n == stop_after:
        raise RuntimeError(f"{FAULT_ENV}={stop_after}: stopped after {n} chunks")
    if primary:
      n = write_jsonl(out, ({**r, "score": s} for r, s in zip(raw, scores)))
      print(f"scored {n} records -> {out}")
  except BaseException:
    if progress is not None and len(progress.records) <= 1:  # nothing scored yet: leave no log behind
      progress.close()
      path.unlink(missing_ok=True)
    raise
  finally:
    if progress is not None:
      progress.close()
  if primary:
    path.unlink(missing_ok=True)
  return 0
