"""The iterative curation loop (DESIGN §9), resumable at any stage.

    report = run_curation(cfg, workdir, inputs, judge, progress=True, devices=None)

Inputs. `cfg` is a training config (`base_config()` layered: model, data, train, mesh, loss,
seed) plus a `curate` section made by `curate_config()` (mrm_jax/curate/config.py holds every
key; config files import it from here). `inputs` (`CurationInputs`, mrm_jax/curate/inputs.py)
names the noisy pairs, the base training data (debiased + T2I pairs), the image root, the model
directory, the eval split and an optional ground truth; `inputs_from_config(cfg)` takes them from
the `curate` section.
`judge` is a `PairJudge` (mrm_jax/curate/judges.py; `judge_from_config`). `devices` restricts
training to some devices (tests); scoring runs on one local device per process.

Rounds. M_0 is `curate.initial_models` or a model trained on the base data (WORKDIR/base/train);
P_0 the noisy pairs. Round r (WORKDIR/round_r/):
  score   every unique (images, question, answer) of P_r by M_r (and `curate.extra_scorers`)
  flip    flip/flipped.jsonl: the most negative `flip_fraction` of the negative-strength pairs
          swapped (`steps.flip`)
  train   M_{r+1} on base + flipped (a training workdir in round_r/train/run)
  filter  M_{r+1} scores the flipped pairs: kept.jsonl (chosen > rejected) and queue.jsonl
  judge   judgments.jsonl: the judge asked about every queued pair in both orders
  merge   vote (`steps.vote`, `min_votes`) → reannotated.jsonl; curated.jsonl = kept +
          reannotated, in input order: P_{r+1}
Each stage directory holds its outputs and `manifest.json` (mrm_jax/stages.py). A rerun skips
every stage whose manifest matches, resumes the first unfinished one (scoring streams one line
per batch to a log, the judge appends each judgment, training restarts from its last
checkpoint) and wipes a stage whose inputs changed: a kill loses at most the work in flight.

Outputs. WORKDIR/curated.jsonl (the final curated set), WORKDIR/round_r/report.json, PNG plots in
WORKDIR/plots/ and WORKDIR/report.json, the returned report (mrm_jax/curate/report.py, `report`).

Tests inject failures with MRM_JAX_CURATE_FAULT="STAGE[@N][:kill]" (mrm_jax/faults.py; e.g.
"round_0/score@2:kill"): the units of a stage are its scored batches, training batches or
judgments, then its end (the unit after its last one, just before the manifest).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from mrm_jax.curate import report as rep
from mrm_jax.curate import steps
from mrm_jax.curate.config import check_curate_config, curate_config, split_files  # noqa: F401
from mrm_jax.curate.inputs import CurationInputs, check_not_run_outputs
from mrm_jax.curate.judges import PairJudge
from mrm_jax.curate.scoring import PairScorer, score_settings, unique_answers
from mrm_jax.curate.training import fault_data_factory, stage_settings, train_config
from mrm_jax.data.records import iter_pairs
from mrm_jax.errors import UserError
from mrm_jax.faults import Faults
from mrm_jax.io import check_writable_dir, iter_jsonl, write_json, write_jsonl
from mrm_jax.stages import StageResult, StageRunner, file_sha256, model_fingerprint
from mrm_jax.train.loop import train

ROUND_STAGES = ("score", "flip", "train", "filter", "judge", "merge")


def run_curation(
  cfg,
  workdir,
  inputs: CurationInputs,
  judge: PairJudge,
  *,
  progress: bool = True,
  devices=None,
  out: Callable[[str], None] = print,
) -> dict:
  """Runs (or resumes) the iterative curation of `inputs` in `workdir` and returns the report
  (also WORKDIR/report.json). `out` receives the progress lines and the summary table (process 0
  only)."""
  check_curate_config(cfg)
  workdir = check_writable_dir(workdir).resolve()
  check_not_run_outputs(cfg.curate, workdir)
  if not inputs.model and not split_files(cfg.curate.initial_models):
    raise UserError(
      "model.path is not set: training and scoring need the model's HF directory "
      "(config.json and the tokenizer)"
    )
  runner = StageRunner(Faults.from_env(), out)
  return _Curation(cfg, workdir, inputs, judge, runner, progress=progress, devices=devices).run()


def _read_pairs(path: Path) -> list[dict]:
  return [p for _, p in iter_pairs(path)]


def _output(directory: Path, man: dict, name: str) -> Path:
  return directory / man["outputs"][name]["path"]


@dataclasses.dataclass
class Scorer:
  """A model that scores a round: its path, and the manifest of the stage that trained it
  (None for a given model)."""

  path: str
  trained_by: dict | None = None

  def fingerprint(self) -> str:
    if self.trained_by is not None:
      return self.trained_by["key"]
    return model_fingerprint(Path(self.path))


class _Curation:
  def __init__(
    self,
    cfg,
    workdir: Path,
    inputs: CurationInputs,
    judge: PairJudge,
    runner: StageRunner,
    *,
    progress: bool,
    devices,
  ):
    self.cfg, self.cc = cfg, cfg.curate
    self.workdir, self.inputs, self.judge, self.runner = workdir, inputs, judge, runner
    self.progress, self.devices = progress, devices
    self.scorer = PairScorer(
      runner, score_settings(cfg, inputs.image_root, inputs.model), progress=progress
    )
    self.t0 = time.time()

  def run(self) -> dict:
    inputs, say = self.inputs, self.runner.say
    say(f"curate run: {int(self.cc.rounds)} round(s) in {self.workdir}")
    say(
      f"noisy pairs: {inputs.noisy}; base training data: "
      f"{', '.join(str(f) for f in inputs.base_train) or '-'}"
    )
    base_man, current = self.initial_scorers()
    extra = [Scorer(m) for m in split_files(self.cc.extra_scorers)]
    pairs_path, known, rounds = inputs.noisy, None, []
    for r in range(int(self.cc.rounds)):
      files = self.run_round(r, pairs_path, current + extra, known)
      rounds.append(files)
      pairs_path, known = files.curated, files.filter_scores
      current = [Scorer(files.train["model"], files.train)]
    return rep.write_report(
      self.workdir,
      inputs,
      base_man,
      rounds,
      t0=self.t0,
      plots=bool(self.cc.plots),
      primary=self.runner.primary,
      say=say,
    )

  def initial_scorers(self) -> tuple[dict | None, list[Scorer]]:
    """M_0: the given models, or one trained on the base data (and that stage's manifest)."""
    given = split_files(self.cc.initial_models)
    if given:
      return None, [Scorer(m) for m in given]
    if not self.inputs.base_train:
      raise UserError(
        "curate.base_train is empty and curate.initial_models is not set: "
        "there is nothing to train the first scoring model on"
      )
    man = self.train_stage(
      self.workdir / "base" / "train", "base/train", list(self.inputs.base_train)
    )
    return man, [Scorer(man["model"], man)]

  def run_round(
    self, r: int, pairs_path: Path, scorers: list[Scorer], known: Path | None
  ) -> rep.RoundFiles:
    rd = self.workdir / f"round_{r}"
    pairs = _read_pairs(pairs_path)
    score_man, score_files = self.score_stage(r, rd / "score", pairs_path, pairs, scorers, known)
    flip_man, flipped = self.flip_stage(r, rd / "flip", pairs_path, pairs, score_files)
    train_man = self.train_stage(
      rd / "train", f"round_{r}/train", [*self.inputs.base_train, flipped]
    )
    filter_man = self.filter_stage(r, rd / "filter", flipped, train_man)
    queue = _output(rd / "filter", filter_man, "queue")
    judge_man = self.judge_stage(r, rd / "judge", queue)
    judgments = _output(rd / "judge", judge_man, "judgments")
    kept = _output(rd / "filter", filter_man, "kept")
    merge_man = self.merge_stage(r, rd / "merge", flipped, kept, queue, judgments)
    return rep.RoundFiles(
      round=r,
      dir=rd,
      input=pairs_path,
      score=score_man,
      flip=flip_man,
      train=train_man,
      filter=filter_man,
      judge=judge_man,
      merge=merge_man,
      flipped=flipped,
      kept=kept,
      queue=queue,
      judgments=judgments,
      reannotated=_output(rd / "merge", merge_man, "reannotated"),
      curated=_output(rd / "merge", merge_man, "curated"),
      filter_scores=_output(rd / "filter", filter_man, "scores"),
    )

  # ---- the stages, in the order a round runs them

  def train_stage(self, directory: Path, name: str, data_files: list[Path]) -> dict:
    inputs = self.inputs
    tcfg = train_config(
      self.cfg,
      model=inputs.model,
      data_files=data_files,
      eval_spec=inputs.eval,
      image_root=inputs.image_root,
    )
    stage_inputs = {
      "data": [file_sha256(f) for f in data_files],
      "eval": [file_sha256(Path(f)) for f in split_files(inputs.eval)],
    }

    def body(d: Path) -> StageResult:
      summary = train(
        tcfg,
        d / "run",
        progress=self.progress,
        devices=self.devices,
        data_factory=fault_data_factory(self.runner.faults, name),
      )
      summary = {k: summary.get(k) for k in ("steps", "resumed_from", "loss", "accuracy", "eval")}
      marker = d / "trained.json"  # a small output whose hash the manifest records
      if self.runner.primary:
        write_json(marker, {"steps": summary["steps"], "data": stage_inputs})
      return StageResult(
        {"trained": marker},
        {"pairs_files": len(data_files), "steps": summary["steps"]},
        {"train": summary, "model": "run"},
      )

    man = self.runner.run(directory, name, stage_inputs, stage_settings(tcfg), body, everyone=True)
    return {**man, "model": str(directory / man["model"])}

  def score_stage(
    self,
    r: int,
    directory: Path,
    pairs_path: Path,
    pairs: list[dict],
    scorers: list[Scorer],
    known: Path | None,
  ) -> tuple[dict, list[Path]]:
    """Every scorer's scores of the round's pairs; the first scorer reuses `known`, the scores
    the previous round's filter stage gave by the same model."""
    name = f"round_{r}/score"
    inputs = {"pairs": file_sha256(pairs_path), "scorers": [s.fingerprint() for s in scorers]}
    if known is not None:
      inputs["reused_scores"] = file_sha256(known)

    def body(d: Path) -> StageResult:
      outputs, scored = {}, 0
      for k, scorer in enumerate(scorers):
        reused = steps.read_score_file(known) if (known is not None and k == 0) else None
        outputs[f"scores_{k}"], n = self.scorer.score(
          d, f"scores_{k}", name, pairs, scorer.path, reused
        )
        scored += n
      return StageResult(
        outputs,
        {
          "pairs": len(pairs),
          "answers": unique_answers(pairs),
          "scorers": len(scorers),
          "scored": scored,
        },
      )

    man = self.runner.run(directory, name, inputs, self.scorer.settings.key(), body, everyone=True)
    return man, [_output(directory, man, f"scores_{k}") for k in range(len(scorers))]

  def flip_stage(
    self, r: int, directory: Path, pairs_path: Path, pairs: list[dict], score_files: list[Path]
  ) -> tuple[dict, Path]:
    def body(d: Path) -> StageResult:
      out, missing = steps.flip(
        pairs, [steps.read_score_file(s) for s in score_files], float(self.cc.flip_fraction)
      )
      if missing:
        raise UserError(
          f"{pairs_path}: {len(missing)} pair(s) have no score (first: {missing[0].pair_id!r})"
        )
      write_jsonl(d / "flipped.jsonl", out)
      n_flip = sum(1 for p in out if p.get("flipped"))
      n_neg = sum(1 for p in out if p["strength"] < 0) + n_flip
      return StageResult(
        {"flipped": d / "flipped.jsonl"}, {"pairs": len(out), "negative": n_neg, "flipped": n_flip}
      )

    inputs = {"pairs": file_sha256(pairs_path), "scores": [file_sha256(s) for s in score_files]}
    man = self.runner.run(
      directory, f"round_{r}/flip", inputs, {"flip_fraction": float(self.cc.flip_fraction)}, body
    )
    return man, _output(directory, man, "flipped")

  def filter_stage(self, r: int, directory: Path, flipped_path: Path, train_man: dict) -> dict:
    name = f"round_{r}/filter"
    flipped = _read_pairs(flipped_path)

    def body(d: Path) -> StageResult:
      scores, _ = self.scorer.score(d, "scores", name, flipped, train_man["model"])
      counts = {}
      if self.runner.primary:
        kept, queue, missing = steps.filter_consistent(flipped, [steps.read_score_file(scores)])
        assert not missing, missing
        write_jsonl(d / "kept.jsonl", kept)
        write_jsonl(d / "queue.jsonl", queue)
        counts = {"pairs": len(flipped), "kept": len(kept), "queued": len(queue)}
      return StageResult(
        {"scores": scores, "kept": d / "kept.jsonl", "queue": d / "queue.jsonl"}, counts
      )

    inputs = {"flipped": file_sha256(flipped_path), "model": train_man["key"]}
    return self.runner.run(directory, name, inputs, self.scorer.settings.key(), body, everyone=True)

  def judge_stage(self, r: int, directory: Path, queue_path: Path) -> dict:
    name = f"round_{r}/judge"
    judge_inputs, settings = self.judge.fingerprint(r)

    def body(d: Path) -> StageResult:
      out = d / "judgments.jsonl"
      self.judge.judge(queue_path, out, r, lambda: self.runner.faults.tick(name))
      judgments = [j for _, j in iter_jsonl(out)]
      valid = sum(steps.judgment_vote(j) is not None for j in judgments)
      return StageResult(
        {"judgments": out},
        {"queued": len(_read_pairs(queue_path)), "judgments": len(judgments), "valid": valid},
      )

    return self.runner.run(
      directory, name, {"queue": file_sha256(queue_path), **judge_inputs}, settings, body
    )

  def merge_stage(
    self,
    r: int,
    directory: Path,
    flipped_path: Path,
    kept_path: Path,
    queue_path: Path,
    judgments_path: Path,
  ) -> dict:
    def body(d: Path) -> StageResult:
      queue = _read_pairs(queue_path)
      vote = steps.vote(queue, [j for _, j in iter_jsonl(judgments_path)], int(self.cc.min_votes))
      write_jsonl(d / "reannotated.jsonl", vote.kept)
      outcome = {str(p["id"]): ("kept", p) for p in _read_pairs(kept_path)}
      outcome.update({str(p["id"]): ("reannotated", p) for p in vote.kept})
      curated = [
        curated_pair(outcome[str(p["id"])][1], r, outcome[str(p["id"])][0], bool(p.get("flipped")))
        for p in _read_pairs(flipped_path)
        if str(p["id"]) in outcome
      ]
      write_jsonl(d / "curated.jsonl", curated)
      relabelled = sum(1 for p in vote.kept if p["meta"]["vote"]["swapped"])
      dropped = len(vote.no_quorum) + len(vote.tied)
      return StageResult(
        {"reannotated": d / "reannotated.jsonl", "curated": d / "curated.jsonl"},
        {
          "queued": len(queue),
          "reannotated": len(vote.kept),
          "relabelled": relabelled,
          "no_quorum": len(vote.no_quorum),
          "tied": len(vote.tied),
          "dropped": dropped,
          "invalid_judgments": vote.invalid,
          "unknown_judgments": len(vote.unknown),
          "curated": len(curated),
        },
      )

    inputs = {
      "flipped": file_sha256(flipped_path),
      "kept": file_sha256(kept_path),
      "queue": file_sha256(queue_path),
      "judgments": file_sha256(judgments_path),
    }
    return self.runner.run(
      directory, f"round_{r}/merge", inputs, {"min_votes": int(self.cc.min_votes)}, body
    )


def curated_pair(pair: dict, r: int, outcome: str, flipped: bool) -> dict:
  """A pair of the curated set: the round's bookkeeping (strength, flipped, the vote) moves into
  `meta.curation`, one entry per round, so the next round starts from plain labelled pairs."""
  out = {k: v for k, v in pair.items() if k not in ("strength", "flipped")}
  meta = dict(out.get("meta") or {})
  entry = {"round": r, "flipped": flipped, "outcome": outcome}
  vote = meta.pop("vote", None)
  if vote is not None:
    entry["vote"] = vote
  meta["curation"] = [*meta.get("curation", []), entry]
  out["meta"] = meta
  return out
