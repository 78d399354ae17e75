"""Scoring the answers of a pair set (DESIGN §9 steps 1 and 4), resumable and split over
processes: every unique (images, question, answer) once, into a curation score file."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
from tqdm import tqdm

from mrm_jax.data.records import score_key
from mrm_jax.errors import UserError
from mrm_jax.evaluate.scoring import score_records
from mrm_jax.io import AppendLog, iter_jsonl, write_jsonl
from mrm_jax.loading import load_model
from mrm_jax.stages import StageRunner


@dataclasses.dataclass(frozen=True)
class ScoreSettings:
  """How answers are scored (curate.score, data.*): part of every score stage's key except the
  paths, which are where things are, not what is computed."""

  batch_size: int
  dtype: str
  max_len: int
  min_pixels: int
  max_pixels: int
  image_root: Path
  processor_dir: str  # the HF directory whose tokenizer / processor every scorer uses

  def key(self) -> dict:
    return {
      "batch_size": self.batch_size,
      "dtype": self.dtype,
      "max_len": self.max_len,
      "max_pixels": self.max_pixels,
      "min_pixels": self.min_pixels,
    }


def score_settings(cfg, image_root: Path, processor_dir: str) -> ScoreSettings:
  cc = cfg.curate
  return ScoreSettings(
    batch_size=int(cc.score.batch_size),
    dtype=cc.score.dtype,
    max_len=int(cc.score.max_len) or int(cfg.data.max_seq_len),
    min_pixels=int(cfg.data.min_pixels),
    max_pixels=int(cfg.data.max_pixels),
    image_root=image_root,
    processor_dir=processor_dir,
  )


def answer_records(pairs: list[dict]) -> tuple[list[dict], list[tuple]]:
  """One scoring record per unique answer of `pairs`, in pair order, and their score keys."""
  records, keys, seen = [], [], set()
  for p in pairs:
    for answer in (p["chosen"], p["rejected"]):
      key = score_key(p.get("images"), p["question"], answer)
      if key in seen:
        continue
      seen.add(key)
      keys.append(key)
      rec = {
        "id": f"{p.get('id', '')}:{len(records)}",
        "images": list(p.get("images") or []),
        "question": p["question"],
        "answer": answer,
      }
      if p.get("system") is not None:
        rec["system"] = p["system"]
      records.append(rec)
  return records, keys


def unique_answers(pairs: list[dict]) -> int:
  return len(
    {
      score_key(p.get("images"), p["question"], a)
      for p in pairs
      for a in (p["chosen"], p["rejected"])
    }
  )


class PairScorer:
  """Scores pair sets with given models on this process's first local device."""

  def __init__(self, runner: StageRunner, settings: ScoreSettings, *, progress: bool):
    self.runner, self.settings, self.progress = runner, settings, progress

  def load(self, path: str):
    """(model, processor) of a training workdir (latest checkpoint) or an HF directory."""
    s = self.settings
    return load_model(
      path,
      dtype=s.dtype,
      devices=jax.local_devices()[:1],
      min_pixels=s.min_pixels,
      max_pixels=s.max_pixels,
      processor_dir=s.processor_dir,
    )

  def score(
    self, d: Path, name: str, stage: str, pairs: list[dict], scorer: str, known: dict | None = None
  ) -> tuple[Path, int]:
    """Scores every unique answer of `pairs` with `scorer` into d/NAME.jsonl (curation score
    format); returns (that path, the number of answers scored here).

    Answers in `known` (score_key → score by the same model) are not scored again. The rest go in
    batches of curate.score.batch_size; each finished batch is one line of a per-process log
    (d/NAME.log[.pK].jsonl), so a killed stage resumes after its last finished batch. Process k
    of N scores batches k, k+N, ...; batch contents never depend on where a run resumed, so the
    scores do not either."""
    records, keys = answer_records(pairs)
    known = known or {}
    todo = [i for i, k in enumerate(keys) if k not in known]
    bs = self.settings.batch_size
    blocks = [todo[b : b + bs] for b in range(0, len(todo), bs)]
    nproc = self.runner.nproc
    logs = [d / (f"{name}.log.jsonl" if k == 0 else f"{name}.log.p{k}.jsonl") for k in range(nproc)]
    mine = [b for b in range(len(blocks)) if b % nproc == self.runner.rank]
    self._score_blocks(logs[self.runner.rank], stage, scorer, records, blocks, mine)
    self.runner.sync(f"{stage}:{name}:scored")
    out = d / f"{name}.jsonl"
    if self.runner.primary:
      scores = [known.get(k) for k in keys]
      for idx, got in zip(blocks, _logged_blocks(logs, blocks, d)):
        for i, score in zip(idx, got):
          scores[i] = score
      write_jsonl(
        out,
        (
          {"images": r["images"], "question": r["question"], "answer": r["answer"], "score": s}
          for r, s in zip(records, scores)
        ),
      )
    return out, len(todo)

  def _score_blocks(
    self,
    log_path: Path,
    stage: str,
    scorer: str,
    records: list[dict],
    blocks: list[list[int]],
    mine: list[int],
  ) -> None:
    """Scores this process's batches not yet in its log, one log line per batch."""
    s = self.settings
    with AppendLog(log_path) as log:
      done = {int(r["block"]) for r in log.records if "block" in r}
      left = [b for b in mine if b not in done]
      if not left:
        return
      model, processor = self.load(scorer)
      bar = tqdm(
        total=len(mine),
        initial=len(mine) - len(left),
        desc=f"score {stage}",
        unit="batch",
        disable=not (self.progress and self.runner.primary),
        dynamic_ncols=True,
        leave=False,
      )
      for b in left:
        batch = [records[i] for i in blocks[b]]
        scores = score_records(
          model,
          processor,
          batch,
          s.image_root,
          s.batch_size,
          max_len=s.max_len,
          progress=False,
          where=_answer_where(stage, batch),
        )
        log.append({"block": b, "scores": scores})
        bar.update(1)
        self.runner.faults.tick(stage)
      bar.close()


def _answer_where(stage: str, batch: list[dict]) -> Callable[[int], str]:
  """Where the j-th record of a batch came from, for error messages."""
  return lambda j: f"{stage}: answer of pair {batch[j]['id']}"


def _logged_blocks(logs: list[Path], blocks: list[list[int]], d: Path) -> list[list]:
  """The scores of every batch, from every process's log; each must be there, whole."""
  by_block: dict[int, list] = {}
  for path in logs:
    for _, r in iter_jsonl(path):
      by_block[int(r["block"])] = r["scores"]
  for b, idx in enumerate(blocks):
    got = by_block.get(b)
    if got is None or len(got) != len(idx):
      raise UserError(
        f"{logs[0]}: batch {b} of the score log is missing or has the wrong size; "
        f"delete {d} to rescore"
      )
  return [by_block[b] for b in range(len(blocks))]
