"""Who re-annotates the queue (DESIGN §9 step 5): the `PairJudge` interface and the library's two
judges, an OpenAI-compatible one and stored judgments.

A judge asks about every queued pair (`curate filter --inconsistent` format: chosen / rejected
as labelled) in both presentation orders and writes pairwise judgment records (DESIGN §3.2:
responses stored as [chosen, rejected], `order == [0, 1]` = the original chosen shown first).
The simulated judge of the embedded world implements the same interface in mrm_jax.demo.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from mrm_jax.curate.config import split_files
from mrm_jax.data.records import iter_pairs
from mrm_jax.errors import UserError
from mrm_jax.io import iter_jsonl, write_jsonl
from mrm_jax.judge.client import ChatClient, RetryPolicy, run_jobs
from mrm_jax.judge.jobs import Job, plan_jobs, read_items
from mrm_jax.stages import file_sha256


class PairJudge(Protocol):
  """Judges a round's re-annotation queue into a judgments file."""

  def fingerprint(self, round_index: int) -> tuple[dict, dict]:
    """(inputs, settings) that decide this judge's answers for the round: the judge stage's key,
    so a changed judge reruns the stage. Inputs are content hashes (files it reads)."""

  def judge(self, queue: Path, out: Path, round_index: int, tick: Callable[[], None]) -> None:
    """Appends to `out` the judgments of every queued pair in both orders that `out` does not
    hold yet (a killed stage resumes), calling `tick()` after each one (the fault hook). Raises
    when some pair got no answer: the stage is then not done and a rerun asks again."""


def common_settings(jc) -> dict:
  """The settings every judge stage is keyed on (curate.judge)."""
  return {"kind": jc.kind, "repeats": int(jc.repeats), "seed": int(jc.seed)}


def plan_pairwise(queue: Path, image_root: Path, repeats: int, seed: int) -> list[Job]:
  """The judge jobs of a queue: `repeats` presentations per pair, orders as `mrm-jax judge`."""
  jobs, _ = plan_jobs(read_items(queue, image_root), "pairwise", repeats, seed)
  return jobs


class OpenAIPairJudge:
  """An OpenAI-compatible chat endpoint (curate.judge.base_url, judge_model, api_key_env, ...)."""

  def __init__(self, jc, image_root: Path, *, progress: bool = True):
    if not jc.base_url.startswith(("http://", "https://")) or not jc.judge_model:
      raise UserError(
        "curate.judge.kind 'openai' needs curate.judge.base_url (http[s]://...) "
        "and curate.judge.judge_model"
      )
    self.jc, self.image_root, self.progress = jc, image_root, progress

  def fingerprint(self, round_index: int) -> tuple[dict, dict]:
    jc = self.jc
    return {}, {
      **common_settings(jc),
      "base_url": jc.base_url,
      "judge_model": jc.judge_model,
      "temperature": float(jc.temperature),
    }

  def _client(self) -> ChatClient:
    jc, key = self.jc, None
    if jc.api_key_env:
      key = os.environ.get(jc.api_key_env)
      if not key:
        raise UserError(
          f"environment variable {jc.api_key_env} (curate.judge.api_key_env) is not set or empty"
        )
    return ChatClient(
      jc.base_url, jc.judge_model, key, timeout=float(jc.timeout), temperature=float(jc.temperature)
    )

  def judge(self, queue: Path, out: Path, round_index: int, tick: Callable[[], None]) -> None:
    jc, client = self.jc, self._client()
    jobs = plan_pairwise(queue, self.image_root, int(jc.repeats), int(jc.seed))
    summary = run_jobs(
      client,
      jobs,
      out,
      "pairwise",
      RetryPolicy(int(jc.max_retries)),
      concurrency=int(jc.concurrency),
      progress=self.progress,
    )
    if summary.not_reached or summary.unfinished:
      raise UserError(
        f"{summary.not_reached + summary.unfinished} pairwise job(s) got no answer "
        f"from the judge at {client.url} (first error: {summary.first_error}); "
        "run again to resume"
      )


class StoredPairJudge:
  """Pairwise judgments already made (curate.judge.files; "{round}" = the round index): the
  queued pairs' judgments are taken from them."""

  def __init__(self, jc):
    if not split_files(jc.files):
      raise UserError(
        "curate.judge.kind 'stored' needs curate.judge.files (pairwise judgment files)"
      )
    self.jc = jc

  def files(self, round_index: int) -> list[Path]:
    files = [Path(f.replace("{round}", str(round_index))) for f in split_files(self.jc.files)]
    for f in files:
      if not f.is_file():
        raise UserError(f"{f}: no such file (curate.judge.files)")
    return files

  def fingerprint(self, round_index: int) -> tuple[dict, dict]:
    return (
      {"files": {str(f): file_sha256(f) for f in self.files(round_index)}},
      common_settings(self.jc),
    )

  def judge(self, queue: Path, out: Path, round_index: int, tick: Callable[[], None]) -> None:
    ids = {str(p["id"]) for _, p in iter_pairs(queue)}
    write_jsonl(
      out,
      [
        j
        for f in self.files(round_index)
        for _, j in iter_jsonl(f)
        if str(j.get("id")) in ids and j.get("mode", "pairwise") == "pairwise"
      ],
    )


def judge_from_config(jc, image_root: Path, *, progress: bool = True) -> PairJudge:
  """The judge curate.judge names (kinds 'openai' and 'stored'; 'simulated' is the embedded
  world's, built by mrm_jax.demo)."""
  if jc.kind == "openai":
    return OpenAIPairJudge(jc, image_root, progress=progress)
  if jc.kind == "stored":
    return StoredPairJudge(jc)
  raise UserError(
    f"curate.judge.kind '{jc.kind}' is the embedded world's judge: it needs the "
    "world (curate.world_dir, or a `world` section; `mrm-jax curate run` and "
    "`mrm-jax demo` provide it)"
  )
