"""`curate run` of a config (what the command and `mrm-jax demo` call), with the embedded world:

    report = run_curation(cfg, workdir, progress=True, devices=None)

The library's loop (mrm_jax/curate/loop.py) takes its inputs and its judge ready-made; this
resolves them from the config. A config names the embedded world by `curate.world_dir` (an
existing world) or by a `world` section without `curate.noisy` (the world is generated into
WORKDIR/world). Then a `prepare` stage builds the debiased pairs (`construct`) and the T2I pairs
(`t2i`) from it, and the world supplies the noisy pairs, the model directory, the held-out eval
split, the ground truth and the truth the simulated judge answers from, wherever the config
leaves them empty. Otherwise the inputs are the files the `curate` section names
(`inputs_from_config`). `curate.judge.kind = "simulated"` is the world's judge
(`SimulatedPairJudge`); the other kinds are the library's (`judge_from_config`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mrm_jax import faults
from mrm_jax.curate import loop
from mrm_jax.curate.config import check_curate_config
from mrm_jax.curate.inputs import CurationInputs, inputs_from_config
from mrm_jax.curate.judges import PairJudge, common_settings, judge_from_config, plan_pairwise
from mrm_jax.curate.report import answer_truth
from mrm_jax.data.records import iter_pairs, score_key
from mrm_jax.demo import simjudge
from mrm_jax.demo.training import write_world_pairs
from mrm_jax.demo.world import ensure_world
from mrm_jax.errors import UserError
from mrm_jax.io import AppendLog, check_writable_dir
from mrm_jax.judge.jobs import Job, missing_jobs
from mrm_jax.judge.parse import parse_scores
from mrm_jax.stages import StageResult, StageRunner, file_sha256

# What callers use besides run_curation: the stage names and the fault hook's names (tests).
ROUND_STAGES = loop.ROUND_STAGES
FAULT_ENV = faults.FAULT_ENV
InjectedFault = faults.InjectedFault

WORLD_FILES = ("candidates.jsonl", "judgments.jsonl", "t2i.jsonl")  # what `prepare` reads


def run_curation(
  cfg, workdir, *, progress: bool = True, devices=None, out: Callable[[str], None] = print
) -> dict:
  """Runs (or resumes) the curation `cfg` describes in `workdir`; returns the report (also
  WORKDIR/report.json, see mrm_jax/curate/loop.py). `out` receives the progress lines."""
  check_curate_config(cfg)
  workdir = check_writable_dir(workdir).resolve()
  runner = StageRunner(faults.Faults.from_env(), out)
  world = resolve_world(cfg, workdir, runner)
  if world is not None:
    inputs = world_inputs(cfg, world, prepare_stage(cfg.curate, world, workdir, runner))
  else:
    inputs = inputs_from_config(cfg)
  judge = curation_judge(cfg, inputs, world, progress=progress)
  return loop.run_curation(cfg, workdir, inputs, judge, progress=progress, devices=devices, out=out)


def resolve_world(cfg, workdir: Path, runner: StageRunner) -> Path | None:
  """The embedded world the config names (generated into WORKDIR/world if need be), or None."""
  cc = cfg.curate
  if cc.world_dir:
    world = Path(cc.world_dir).resolve()
    if not (world / "world.json").is_file():
      raise UserError(f"curate.world_dir {world}: not an embedded world (no world.json)")
    return world
  if cc.noisy or "world" not in cfg:
    return None
  if runner.primary:
    ensure_world(workdir, cfg)
  runner.sync("world")
  return workdir / "world"


def prepare_stage(cc, world: Path, workdir: Path, runner: StageRunner) -> list[Path]:
  """WORKDIR/prepare: the world's debiased and T2I pairs (the base training data)."""

  def body(d: Path) -> StageResult:
    made = write_world_pairs(
      world,
      d,
      float(cc.min_gap),
      int(cc.t2i_seed),
      after_debiased=lambda: runner.faults.tick("prepare"),
    )
    return StageResult(made.files, made.counts, {"construct": made.construct})

  prep = workdir / "prepare"
  man = runner.run(
    prep,
    "prepare",
    {n: file_sha256(world / n) for n in WORLD_FILES},
    {"min_gap": float(cc.min_gap), "t2i_seed": int(cc.t2i_seed)},
    body,
  )
  return [prep / man["outputs"][name]["path"] for name in ("debiased", "t2i")]


def world_inputs(cfg, world: Path, base_train: list[Path]) -> CurationInputs:
  """The world's files, where the config leaves them empty."""
  cc = cfg.curate
  held = world / "heldout_pairs.jsonl"
  has_heldout = held.is_file() and held.stat().st_size > 0
  return CurationInputs(
    noisy=Path(cc.noisy).resolve() if cc.noisy else world / "noisy_pairs.jsonl",
    base_train=tuple(base_train),
    image_root=Path(cc.image_root or cfg.data.image_root or world).resolve(),
    model=cfg.model.path or str(world / "model"),
    eval=cfg.data.eval or (str(held) if has_heldout else ""),
    truth=cc.truth or str(world / "noisy_truth.json"),
  )


def curation_judge(cfg, inputs: CurationInputs, world: Path | None, *, progress: bool) -> PairJudge:
  jc = cfg.curate.judge
  if jc.kind != "simulated":
    return judge_from_config(jc, inputs.image_root, progress=progress)
  truth = jc.truth or (str(world / "world_truth.jsonl") if world is not None else "")
  if not truth:
    raise UserError(
      "curate.judge.kind 'simulated' needs curate.judge.truth (the world's world_truth.jsonl)"
    )
  return SimulatedPairJudge(jc, Path(truth), inputs.image_root, progress=progress)


class SimulatedPairJudge:
  """The world's simulated judge (simjudge) asked pairwise, answering from the world's truth
  (world_truth.jsonl), in the judge client's record format and through the same parser and
  retry rule. Each job's randomness is a function of (seed, id, order, attempt), and jobs run in
  plan order, appended one by one to a resumable log."""

  def __init__(self, jc, truth: Path, image_root: Path, *, progress: bool = True):
    self.jc, self.truth, self.image_root, self.progress = jc, truth, image_root, progress

  def fingerprint(self, round_index: int) -> tuple[dict, dict]:
    return (
      {"truth": file_sha256(self.truth)},
      {**common_settings(self.jc), "max_retries": int(self.jc.max_retries)},
    )

  def judge(self, queue: Path, out: Path, round_index: int, tick: Callable[[], None]) -> None:
    jobs = plan_pairwise(queue, self.image_root, int(self.jc.repeats), int(self.jc.seed))
    pairs = {str(p["id"]): p for _, p in iter_pairs(queue)}
    truth = answer_truth(self.truth)
    with AppendLog(out) as log:
      todo = missing_jobs(jobs, log.records, "pairwise")
      for job in tqdm(
        todo, desc="judge (simulated)", unit="job", disable=not self.progress, leave=False
      ):
        log.append(self.judgment(job, _correct(job, pairs[job.item.id], truth)))
        tick()

  def judgment(self, job: Job, correct: list[bool]) -> dict:
    """One judgment record: the simulated judge's raw output, retried while it does not parse."""
    responses = job.item.responses
    right = next((a for a, c in zip(responses, correct) if c), responses[0])
    shown = [
      {
        "correct": correct[i],
        "words": len(responses[i].split()),
        "partly": False,
        "claim": responses[i],
        "truth": right,
      }
      for i in job.order
    ]
    reference = {"correct": True, "claim": right, "truth": right}
    raw, scores, error = "", None, None
    for attempt in range(int(self.jc.max_retries) + 1):
      rng = _job_rng(int(self.jc.seed), job, attempt)
      raw, _, _ = simjudge.listwise_output(rng, shown, reference, simjudge.pick_kind(rng))
      parsed = parse_scores(raw, len(job.order), "pairwise")
      if parsed.ok:
        scores, error = parsed.scores, None
        break
      error = f"unusable answer: {parsed.error} (after {attempt + 1} attempt{'s' * (attempt > 0)})"
    return {
      "id": job.item.id,
      "mode": "pairwise",
      "order": list(job.order),
      "raw": raw,
      "scores": scores,
      "error": error,
      "judge": simjudge.JUDGE_NAME,
    }


def _correct(job: Job, pair: dict, truth: dict) -> list[bool]:
  """Whether each response of a queued pair is right, by the world's truth."""
  correct = []
  for answer in job.item.responses:
    key = score_key(pair.get("images"), pair["question"], answer)
    if key not in truth:
      raise UserError(
        f"simulated judge: no ground truth for an answer of pair {job.item.id!r} "
        "(curate.judge.truth must cover the noisy pairs)"
      )
    correct.append(truth[key])
  return correct


def _job_rng(seed: int, job: Job, attempt: int) -> np.random.Generator:
  key = hashlib.sha256(f"{seed}\x00{job.item.id}\x00{list(job.order)}\x00{attempt}".encode())
  return np.random.default_rng(int.from_bytes(key.digest()[:8], "little"))
