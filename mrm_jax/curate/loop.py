"""`mrm-jax curate run`: the iterative curation loop (DESIGN §9), resumable at any stage.

Library entry point (the command and `mrm_jax.demo` call it):

    report = run_curation(cfg, workdir, progress=True, devices=None)

Inputs. `cfg` is a training config (`base_config()` layered: model, data, train, mesh, loss, seed)
plus a `curate` section made by `curate_config()` (see there for every key). Either
`curate.noisy` (the noisy pair file) and `curate.base_train` (the debiased + T2I pair files) are
given, or the run is on the embedded world: `curate.world_dir` (an existing world) or a `world`
section in cfg (the world is generated into WORKDIR/world), from which a `prepare` stage builds
the debiased pairs (`construct`) and the T2I pairs (`t2i`) and takes the noisy pairs, the model
directory, the held-out eval split and the ground truth. Image paths of every pair file are
relative to one image root (`curate.image_root`, else `data.image_root`, else the noisy file's
folder). `devices` restricts training to some devices (tests); scoring runs on one local device
per process.

Rounds. M_0 is `curate.initial_models` or a model trained on the base data (WORKDIR/base/train);
P_0 the noisy pairs. Round r (WORKDIR/round_r/):
  score   every unique (images, question, answer) of P_r by M_r (and `curate.extra_scorers`)
  flip    DIR/round_r/flip/flipped.jsonl: the most negative `flip_fraction` of the negative-strength
          pairs swapped (`steps.flip`)
  train   M_{r+1} on base + flipped (a training workdir in round_r/train/run, orbax checkpoints)
  filter  M_{r+1} scores the flipped pairs: kept.jsonl (chosen > rejected) and queue.jsonl
  judge   judgments.jsonl: the judge asked about every queued pair in both orders (resumable log)
  merge   vote (`steps.vote`, `min_votes`) → reannotated.jsonl; curated.jsonl = kept + reannotated,
          in input order: P_{r+1}
Each stage directory holds its outputs (written atomically) and `manifest.json` (the fingerprint of
its inputs and settings, output hashes, counts, seconds), written last. A rerun skips every stage
whose manifest matches, resumes the first unfinished one (scoring streams one line per batch to a
log, the judge appends each judgment, training restarts from its last checkpoint) and wipes a
stage whose inputs changed. A kill therefore loses at most the batch (or judgment, or the training
steps since the last checkpoint) in flight.

Outputs. WORKDIR/curated.jsonl (the final curated set), WORKDIR/round_r/report.json, PNG plots in
WORKDIR/plots/ (strength histogram per round, counts per round) and WORKDIR/report.json, the
returned report:
  base      {model, train} of M_0 when it was trained here (else None); `train` is the training
            summary {steps, loss, accuracy, eval: {loss, accuracy, count, ...} | None, resumed_from}
  rounds    per round: round, counts {input, negative, flipped, kept, queued, judgments,
            reannotated, relabelled, dropped, curated, no_quorum, tied, invalid_judgments,
            answers_scored}, train (M_{r+1}'s summary: eval = the data.eval split, e.g. the world's
            held-out pairs), model (its training workdir), curated (path), seconds per stage, and
            truth (label accuracy of each pair set, flip precision / recall) when a truth is known
  truth     the whole run against the noisy labels (report.overall_truth: noise_precision,
            noise_recall, ...), or None
  final     {curated, model, n_curated}; also workdir, noisy, base_train, plots, seconds
Counts satisfy kept + queued = input, reannotated + dropped = queued, curated = kept + reannotated,
judgments = repeats · queued (a live judge may record failures among them).

Tests inject failures with MRM_JAX_CURATE_FAULT="STAGE[@N][:kill]" (e.g. "round_0/score@2:kill"):
at the N-th unit of work of that stage (a scored batch, a training batch, a judgment, or the stage's
end, the unit after its last one, just before the manifest; N = 1 by default) raise
`InjectedFault`, or SIGKILL the process with ":kill".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import ml_collections

from mrm_jax.curate import report as rep
from mrm_jax.curate import steps
from mrm_jax.data.records import iter_pairs, score_key
from mrm_jax.errors import UserError, at
from mrm_jax.io import (AppendLog, atomic_open, check_writable_dir, iter_jsonl, read_json_object, same_file,
                        write_json, write_jsonl)

FAULT_ENV = "MRM_JAX_CURATE_FAULT"
JUDGE_KINDS = ("simulated", "openai", "stored")
ROUND_STAGES = ("score", "flip", "train", "filter", "judge", "merge")


def curate_config() -> ml_collections.ConfigDict:
  """The `curate` section of a config (config files: `c.curate = curate_config()`)."""
  c = ml_collections.ConfigDict()
  c.rounds = 2
  c.noisy = ""                # noisy pair file to curate
  c.base_train = ""           # comma-separated pair files always trained on (debiased + T2I)
  c.image_root = ""           # root of every image path; default data.image_root, else the noisy file's folder
  c.world_dir = ""            # an embedded world (mrm_jax.demo): noisy pairs, base data, truth and model from it
  c.truth = ""                # optional ground truth: noisy_truth.json or world_truth.jsonl (report only)
  c.min_gap = 2.0             # `construct --min-gap` for the world's debiased pairs: right vs wrong
                              # answers differ by ~5.5 judge points, two wrong ones by noise only
  c.t2i_seed = 42             # `t2i --seed` for the world's T2I pairs
  c.flip_fraction = 0.5
  c.min_votes = 2
  c.initial_models = ""       # comma-separated M_0 scorers (HF dirs or training workdirs); empty = train on base
  c.extra_scorers = ""        # comma-separated fixed scorers added to every round's score stage
  c.compilation_cache = True  # `curate run` keeps JAX's compilation cache in WORKDIR/jax_cache
  c.plots = True
  c.score = ml_collections.ConfigDict()
  c.score.batch_size = 8      # records per forward pass = per line of the resumable score log
  c.score.dtype = "float32"
  c.score.max_len = 0         # 0 = data.max_seq_len
  c.judge = ml_collections.ConfigDict()
  c.judge.kind = "simulated"  # simulated (the world's judge) | openai | stored
  c.judge.base_url = ""       # openai: e.g. http://localhost:8000/v1
  c.judge.judge_model = ""
  c.judge.api_key_env = ""    # name of the variable holding the key (never the key itself)
  c.judge.repeats = 2         # presentations per queued pair: [0,1] and [1,0]
  c.judge.concurrency = 8
  c.judge.max_retries = 5
  c.judge.timeout = 120.0
  c.judge.temperature = 0.0
  c.judge.seed = 0
  c.judge.files = ""          # stored: comma-separated pairwise judgment files; "{round}" = the round index
  c.judge.truth = ""          # simulated: world_truth.jsonl (default: the world's)
  return c


class InjectedFault(RuntimeError):
  """Raised by the test fault hook (MRM_JAX_CURATE_FAULT)."""


class _Faults:
  def __init__(self, spec: str):
    self.rules: dict[str, tuple[int, bool]] = {}
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
      kill = item.endswith(":kill")
      item = item[:-5] if kill else item
      name, _, n = item.partition("@")
      self.rules[name] = (int(n or 1), kill)
    self.counts: dict[str, int] = {}

  def active(self, stage: str) -> bool:
    return stage in self.rules

  def tick(self, stage: str) -> None:
    if stage not in self.rules:
      return
    self.counts[stage] = self.counts.get(stage, 0) + 1
    n, kill = self.rules[stage]
    if self.counts[stage] == n:
      if kill:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
      raise InjectedFault(f"injected fault in {stage} at unit {n}")


def digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
  from mrm_jax.train.manifest import sha256_file
  return sha256_file(path)


def split_files(spec: str) -> list[str]:
  return [s.strip() for s in str(spec or "").split(",") if s.strip()]


def _read_pairs(path: Path) -> list[dict]:
  return [p for _, p in iter_pairs(path)]


# -- multi-process helpers ------------------------------------------------------------------------------


def _process() -> tuple[int, int]:
  import jax
  return jax.process_index(), jax.process_count()


def _barrier(name: str) -> None:
  from mrm_jax.distributed import barrier
  barrier(f"curate:{name}")


# -- stages ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StageResult:
  outputs: dict[str, Path]
  counts: dict
  extra: dict = dataclasses.field(default_factory=dict)


class _Stage:
  """A stage directory. Done when manifest.json names the current key (inputs + settings) and every
  output still has its recorded hash. `.started` holds the key of the attempt in progress: a
  different key (changed inputs) wipes the directory, the same key keeps partial work to resume."""

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
    man = {"stage": self.name, "key": self.key, "inputs": self.inputs,
           "outputs": {k: {"path": os.path.relpath(p, self.dir), "sha256": file_sha256(p)} for k, p in result.outputs.items()},
           "counts": result.counts, "seconds": round(seconds, 3), **result.extra}
    write_json(self.manifest_path, man)
    return man


def read_stage_manifest(path: Path) -> dict:
  """A stage's manifest.json; a malformed one (edited, or damaged on disk: the run writes it atomically)
  is a UserError naming it rather than a silently redone stage."""
  man = read_json_object(path)
  outputs = man.get("outputs")
  ok = isinstance(man.get("key"), str) and isinstance(outputs, dict) and all(
      isinstance(r, dict) and isinstance(r.get("path"), str) and isinstance(r.get("sha256"), str)
      for r in outputs.values())
  if not ok:
    raise UserError(f"{path}: not a stage manifest (needs 'key' and 'outputs' {{name: {{path, sha256}}}}); "
                    "delete it to redo the stage")
  return man


class _Curation:
  def __init__(self, cfg, workdir, *, progress: bool, devices, out: Callable[[str], None]):
    self.cfg = cfg
    self.cc = cfg.curate
    self._validate()
    self.workdir = check_writable_dir(workdir).resolve()
    self.progress = progress
    self.devices = devices
    self.faults = _Faults(os.environ.get(FAULT_ENV, ""))
    self.rank, self.nproc = _process()
    self.primary = self.rank == 0
    self._out = out
    self.t0 = time.time()

  def say(self, text: str) -> None:
    if self.primary:
      self._out(text)

  def _validate(self) -> None:
    cc = self.cc
    if int(cc.rounds) < 1:
      raise UserError(f"curate.rounds must be at least 1, got {cc.rounds}")
    if not 0 <= float(cc.flip_fraction) <= 1:
      raise UserError(f"curate.flip_fraction must be within [0, 1], got {cc.flip_fraction}")
    if int(cc.min_votes) < 1:
      raise UserError(f"curate.min_votes must be at least 1, got {cc.min_votes}")
    if cc.judge.kind not in JUDGE_KINDS:
      raise UserError(f"curate.judge.kind must be one of {', '.join(JUDGE_KINDS)}, got '{cc.judge.kind}'")
    if int(cc.judge.repeats) < 1:
      raise UserError(f"curate.judge.repeats must be at least 1, got {cc.judge.repeats}")
    if int(cc.score.batch_size) < 1:
      raise UserError(f"curate.score.batch_size must be at least 1, got {cc.score.batch_size}")

  # ---- the stage runner

  def stage(self, directory: Path, name: str, inputs: dict, settings: dict, body: Callable[[Path], StageResult],
            *, everyone: bool = False) -> dict:
    """Runs `body(directory)` unless the stage is done. `everyone`: all processes run the body (training,
    scoring); otherwise only process 0 does and the others wait."""
    st = _Stage(directory, name, inputs, settings)
    man = st.finished()
    _barrier(f"{name}:check")
    if man is not None:
      self.say(f"[{name}] done earlier ({_counts_line(man['counts'])})")
      return man
    if self.primary:
      st.begin()
    _barrier(f"{name}:begin")
    t = time.time()
    result = body(directory) if (everyone or self.primary) else None
    _barrier(f"{name}:body")
    if self.primary:
      self.faults.tick(name)  # the end of a stage is its last unit of work
      man = st.finish(result, time.time() - t)
      self.say(f"[{name}] {_counts_line(man['counts'])} ({man['seconds']:.1f} s)")
    _barrier(f"{name}:finish")
    return read_stage_manifest(st.manifest_path)

  # ---- inputs

  def resolve_inputs(self) -> None:
    cc, cfg = self.cc, self.cfg
    self.model_path = cfg.model.path
    self.truth_path = cc.truth
    self.judge_truth = cc.judge.truth
    self.eval_spec = cfg.data.eval
    world = None
    if cc.world_dir:
      world = Path(cc.world_dir).resolve()
      if not (world / "world.json").is_file():
        raise UserError(f"curate.world_dir {world}: not an embedded world (no world.json)")
    elif not cc.noisy and "world" in cfg:
      from mrm_jax.demo.world import ensure_world
      if self.primary:
        ensure_world(self.workdir, cfg)
      _barrier("world")
      world = self.workdir / "world"
    if world is not None:
      self.world = world
      man = self.stage(self.workdir / "prepare", "prepare",
                       {n: file_sha256(world / n) for n in ("candidates.jsonl", "judgments.jsonl", "t2i.jsonl")},
                       {"min_gap": float(cc.min_gap), "t2i_seed": int(cc.t2i_seed)}, self._prepare)
      prep = self.workdir / "prepare"
      self.base_files = [prep / man["outputs"]["debiased"]["path"], prep / man["outputs"]["t2i"]["path"]]
      self.noisy = Path(cc.noisy).resolve() if cc.noisy else world / "noisy_pairs.jsonl"
      self.image_root = Path(cc.image_root or cfg.data.image_root or world).resolve()
      self.model_path = self.model_path or str(world / "model")
      self.truth_path = self.truth_path or str(world / "noisy_truth.json")
      self.judge_truth = self.judge_truth or str(world / "world_truth.jsonl")
      held = world / "heldout_pairs.jsonl"
      if not self.eval_spec and held.is_file() and held.stat().st_size:
        self.eval_spec = str(held)
    else:
      if not cc.noisy:
        raise UserError("curate.noisy is not set (the noisy pair file to curate), and no embedded world "
                        "(curate.world_dir) was given")
      self.noisy = Path(cc.noisy).resolve()
      self.base_files = [Path(f).resolve() for f in split_files(cc.base_train)]
      self.image_root = Path(cc.image_root or cfg.data.image_root or self.noisy.parent).resolve()
    for f in [self.noisy, *self.base_files]:
      if not f.is_file():
        raise UserError(f"{f}: no such file")
    self._check_inputs_not_outputs()
    if not self.model_path and not split_files(cc.initial_models):
      raise UserError("model.path is not set: training and scoring need the model's HF directory "
                      "(config.json and the tokenizer)")
    pairs = list(iter_pairs(self.noisy))
    steps.check_unique_ids([(at(self.noisy, n), p) for n, p in pairs])  # votes are matched on the id
    if self.judge_kind == "simulated" and not self.judge_truth:
      raise UserError("curate.judge.kind 'simulated' needs curate.judge.truth (the world's world_truth.jsonl)")

  def _check_inputs_not_outputs(self) -> None:
    """The user's input files must not be files this run rewrites or wipes: the final outputs, or
    anything in a stage directory (a stage whose inputs changed is deleted and redone)."""
    cc = self.cc
    given = [("curate.noisy", cc.noisy), ("curate.truth", cc.truth),
             *(("curate.base_train", f) for f in split_files(cc.base_train))]
    finals = [self.workdir / "curated.jsonl", self.workdir / "report.json"]
    stage_dir = re.compile(r"(round_\d+|base|prepare|plots)$")
    for key, f in given:
      if not f:
        continue
      f = Path(f).resolve()
      inside = [p for p in f.parents if p.parent == self.workdir and stage_dir.match(p.name)]
      if any(same_file(f, o) for o in finals) or inside:
        raise UserError(f"{key} {f} is one of the files `curate run` writes in {self.workdir}; "
                        "move it out of the workdir's outputs")

  @property
  def judge_kind(self) -> str:
    return self.cc.judge.kind

  def _prepare(self, d: Path) -> StageResult:
    from mrm_jax.construct.pairs import construct_files
    from mrm_jax.construct.t2i import read_generic, reformulate
    w = self.world
    pairs, stats = construct_files(w / "candidates.jsonl", w / "judgments.jsonl", float(self.cc.min_gap))
    write_jsonl(d / "debiased.jsonl", pairs)
    self.faults.tick("prepare")
    records, wheres = read_generic(w / "t2i.jsonl")
    t2i = reformulate(records, int(self.cc.t2i_seed), wheres)
    write_jsonl(d / "t2i.jsonl", t2i)
    return StageResult({"debiased": d / "debiased.jsonl", "t2i": d / "t2i.jsonl"},
                       {"debiased": len(pairs), "t2i": len(t2i)}, {"construct": stats.report()})

  # ---- training

  def train_cfg(self, data_files: list[Path]):
    t = ml_collections.ConfigDict(self.cfg.to_dict())
    for k in ("curate", "world"):
      if k in t:
        del t[k]
    t.model.path = self.model_path
    t.data.train = ",".join(str(f) for f in data_files)
    t.data.eval = self.eval_spec
    t.data.image_root = str(self.image_root)
    return t

  def train_stage(self, directory: Path, name: str, data_files: list[Path]) -> dict:
    tcfg = self.train_cfg(data_files)
    # content hashes, not paths: a copied or moved workdir keeps its finished stages
    inputs = {"data": [file_sha256(f) for f in data_files], "eval": [file_sha256(Path(f)) for f in split_files(self.eval_spec)]}
    settings = tcfg.to_dict()
    settings["data"] = {k: v for k, v in settings["data"].items() if k not in ("train", "eval")}

    def body(d: Path) -> StageResult:
      from mrm_jax.train.loop import train
      factory = None
      if self.faults.active(name):
        from mrm_jax.train.data import default_data_factory

        def factory(c, split, path):
          data = default_data_factory(c, split, path)
          return _TickingData(data, lambda: self.faults.tick(name)) if split == "train" else data
      summary = train(tcfg, d / "run", progress=self.progress, devices=self.devices, data_factory=factory)
      summary = {k: summary.get(k) for k in ("steps", "resumed_from", "loss", "accuracy", "eval")}
      marker = d / "trained.json"  # a small output whose hash the manifest records
      if self.primary:
        write_json(marker, {"steps": summary["steps"], "data": inputs})
      return StageResult({"trained": marker}, {"pairs_files": len(data_files), "steps": summary["steps"]},
                         {"train": summary, "model": "run"})
    man = self.stage(directory, name, inputs, settings, body, everyone=True)
    return {**man, "model": str(directory / man["model"])}

  # ---- scoring

  def load_scorer(self, path: str):
    """(model, processor) of a training workdir (latest checkpoint) or an HF directory, on this
    process's first local device."""
    import jax

    from mrm_jax.loading import load_model
    return load_model(path, dtype=self.cc.score.dtype, devices=jax.local_devices()[:1],
                      min_pixels=int(self.cfg.data.min_pixels), max_pixels=int(self.cfg.data.max_pixels),
                      processor_dir=self.model_path)

  def score_pairs(self, d: Path, name: str, stage: str, pairs: list[dict], scorer: str,
                  known: dict | None = None) -> tuple[Path, int]:
    """Scores every unique answer of `pairs` with `scorer` into d/NAME.jsonl (curation score format).

    Answers found in `known` (score_key → score by the same model) are not scored again. The rest go
    in batches of curate.score.batch_size; each finished batch is one line of a per-process log
    (d/NAME.log[.pK].jsonl), so a killed stage resumes after its last finished batch. Process k of N
    scores batches k, k+N, ...; batch contents never depend on where a run resumed, so the scores
    do not either. Returns (path, number of answers scored here)."""
    records, keys, seen = [], [], set()
    for p in pairs:
      for answer in (p["chosen"], p["rejected"]):
        key = score_key(p.get("images"), p["question"], answer)
        if key in seen:
          continue
        seen.add(key)
        keys.append(key)
        rec = {"id": f"{p.get('id', '')}:{len(records)}", "images": list(p.get("images") or []),
               "question": p["question"], "answer": answer}
        if p.get("system") is not None:
          rec["system"] = p["system"]
        records.append(rec)
    known = known or {}
    todo = [i for i, k in enumerate(keys) if k not in known]
    bs = int(self.cc.score.batch_size)
    blocks = [todo[b:b + bs] for b in range(0, len(todo), bs)]
    logs = [d / (f"{name}.log.jsonl" if k == 0 else f"{name}.log.p{k}.jsonl") for k in range(self.nproc)]
    mine = [b for b in range(len(blocks)) if b % self.nproc == self.rank]
    with AppendLog(logs[self.rank]) as log:
      done = {int(r["block"]) for r in log.records if "block" in r}
      left = [b for b in mine if b not in done]
      if left:
        from tqdm import tqdm

        from mrm_jax.evaluate.scoring import score_records
        model, processor = self.load_scorer(scorer)
        max_len = int(self.cc.score.max_len) or int(self.cfg.data.max_seq_len)
        bar = tqdm(total=len(mine), initial=len(mine) - len(left), desc=f"score {stage}", unit="batch",
                   disable=not (self.progress and self.primary), dynamic_ncols=True, leave=False)
        for b in left:
          batch = [records[i] for i in blocks[b]]
          scores = score_records(model, processor, batch, self.image_root, bs, max_len=max_len, progress=False,
                                 where=lambda j, batch=batch: f"{stage}: answer of pair {batch[j]['id']}")
          log.append({"block": b, "scores": scores})
          bar.update(1)
          self.faults.tick(stage)
        bar.close()
        del model
    _barrier(f"{stage}:{name}:scored")
    out = d / f"{name}.jsonl"
    if self.primary:
      by_block: dict[int, list] = {}
      for path in logs:
        for _, r in iter_jsonl(path):
          by_block[int(r["block"])] = r["scores"]
      scores = [None] * len(records)
      for i, k in enumerate(keys):
        if k in known:
          scores[i] = known[k]
      for b, idx in enumerate(blocks):
        got = by_block.get(b)
        if got is None or len(got) != len(idx):
          raise UserError(f"{logs[0]}: batch {b} of the score log is missing or has the wrong size; "
                          f"delete {d} to rescore")
        for i, s in zip(idx, got):
          scores[i] = s
      write_jsonl(out, ({"images": r["images"], "question": r["question"], "answer": r["answer"], "score": s}
                        for r, s in zip(records, scores)))
    return out, len(todo)

  def model_ref(self, path: str, stage_man: dict | None) -> str:
    """A fingerprint of a scorer: the key of the stage that trained it, or the files of a given model."""
    if stage_man is not None:
      return stage_man["key"]
    return model_fingerprint(Path(path))

  # ---- rounds

  def run(self) -> dict:
    cc = self.cc
    self.say(f"curate run: {int(cc.rounds)} round(s) in {self.workdir}")
    self.resolve_inputs()
    self.say(f"noisy pairs: {self.noisy}; base training data: {', '.join(str(f) for f in self.base_files) or '-'}")
    self.base_man = None
    if split_files(cc.initial_models):
      current = [(m, None) for m in split_files(cc.initial_models)]
    else:
      if not self.base_files:
        raise UserError("curate.base_train is empty and curate.initial_models is not set: "
                        "there is nothing to train the first scoring model on")
      self.base_man = self.train_stage(self.workdir / "base" / "train", "base/train", self.base_files)
      current = [(self.base_man["model"], self.base_man)]
    extra = [(m, None) for m in split_files(cc.extra_scorers)]
    pairs_path = self.noisy
    known = None  # the previous filter's scores by the current model: reused by the next score stage
    self.rounds = []
    for r in range(int(cc.rounds)):
      rd = self.workdir / f"round_{r}"
      info = self.run_round(r, rd, pairs_path, current + extra, known)
      self.rounds.append(info)
      pairs_path = info["curated"]
      current = [(info["train_man"]["model"], info["train_man"])]
      known = info["filter_scores"]
    return self.finish()

  def run_round(self, r: int, rd: Path, pairs_path: Path, scorers: list[tuple[str, dict | None]],
                known_path: Path | None) -> dict:
    cc = self.cc
    pairs = _read_pairs(pairs_path)
    settings_score = {"batch_size": int(cc.score.batch_size), "dtype": cc.score.dtype,
                      "max_len": int(cc.score.max_len) or int(self.cfg.data.max_seq_len),
                      "max_pixels": int(self.cfg.data.max_pixels), "min_pixels": int(self.cfg.data.min_pixels)}
    refs = [self.model_ref(p, m) for p, m in scorers]
    inputs = {"pairs": file_sha256(pairs_path), "scorers": refs}
    if known_path is not None:
      inputs["reused_scores"] = file_sha256(known_path)

    def score_body(d: Path) -> StageResult:
      outputs, scored = {}, 0
      for k, (path, _) in enumerate(scorers):
        known = steps.read_score_file(known_path) if (known_path is not None and k == 0) else None
        out, n = self.score_pairs(d, f"scores_{k}", f"round_{r}/score", pairs, path, known)
        outputs[f"scores_{k}"] = out
        scored += n
      n_answers = len({score_key(p.get("images"), p["question"], a)
                       for p in pairs for a in (p["chosen"], p["rejected"])})
      return StageResult(outputs, {"pairs": len(pairs), "answers": n_answers, "scorers": len(scorers),
                                   "scored": scored})
    score_man = self.stage(rd / "score", f"round_{r}/score", inputs, settings_score, score_body, everyone=True)
    score_files = [rd / "score" / score_man["outputs"][f"scores_{k}"]["path"] for k in range(len(scorers))]

    def flip_body(d: Path) -> StageResult:
      out, missing = steps.flip(pairs, [steps.read_score_file(s) for s in score_files], float(cc.flip_fraction))
      if missing:
        raise UserError(f"{pairs_path}: {len(missing)} pair(s) have no score (first: {missing[0].pair_id!r})")
      write_jsonl(d / "flipped.jsonl", out)
      n_flip = sum(1 for p in out if p.get("flipped"))
      n_neg = sum(1 for p in out if p["strength"] < 0) + n_flip
      return StageResult({"flipped": d / "flipped.jsonl"}, {"pairs": len(out), "negative": n_neg, "flipped": n_flip})
    flip_man = self.stage(rd / "flip", f"round_{r}/flip",
                          {"pairs": file_sha256(pairs_path), "scores": [file_sha256(s) for s in score_files]},
                          {"flip_fraction": float(cc.flip_fraction)}, flip_body)
    flipped_path = rd / "flip" / flip_man["outputs"]["flipped"]["path"]

    train_man = self.train_stage(rd / "train", f"round_{r}/train", [*self.base_files, flipped_path])

    flipped = _read_pairs(flipped_path)

    def filter_body(d: Path) -> StageResult:
      scores, _ = self.score_pairs(d, "scores", f"round_{r}/filter", flipped, train_man["model"])
      outputs = {"scores": scores}
      counts = {}
      if self.primary:
        kept, queue, missing = steps.filter_consistent(flipped, [steps.read_score_file(scores)])
        assert not missing, missing
        write_jsonl(d / "kept.jsonl", kept)
        write_jsonl(d / "queue.jsonl", queue)
        counts = {"pairs": len(flipped), "kept": len(kept), "queued": len(queue)}
      outputs.update({"kept": d / "kept.jsonl", "queue": d / "queue.jsonl"})
      return StageResult(outputs, counts)
    filter_man = self.stage(rd / "filter", f"round_{r}/filter",
                            {"flipped": file_sha256(flipped_path), "model": train_man["key"]}, settings_score,
                            filter_body, everyone=True)
    kept_path = rd / "filter" / filter_man["outputs"]["kept"]["path"]
    queue_path = rd / "filter" / filter_man["outputs"]["queue"]["path"]

    judge_man = self.judge_stage(r, rd / "judge", queue_path)
    judgments_path = rd / "judge" / judge_man["outputs"]["judgments"]["path"]

    def merge_body(d: Path) -> StageResult:
      kept = _read_pairs(kept_path)
      queue = _read_pairs(queue_path)
      judgments = [j for _, j in iter_jsonl(judgments_path)]
      vote = steps.vote(queue, judgments, int(cc.min_votes))
      write_jsonl(d / "reannotated.jsonl", vote.kept)
      outcome = {str(p["id"]): ("kept", p) for p in kept}
      outcome.update({str(p["id"]): ("reannotated", p) for p in vote.kept})
      curated = []
      for p in flipped:
        got = outcome.get(str(p["id"]))
        if got is not None:
          curated.append(_curated_pair(got[1], r, got[0], bool(p.get("flipped"))))
      write_jsonl(d / "curated.jsonl", curated)
      relabelled = sum(1 for p in vote.kept if p["meta"]["vote"]["swapped"])
      return StageResult({"reannotated": d / "reannotated.jsonl", "curated": d / "curated.jsonl"},
                         {"queued": len(queue), "reannotated": len(vote.kept), "relabelled": relabelled,
                          "no_quorum": len(vote.no_quorum), "tied": len(vote.tied),
                          "dropped": len(vote.no_quorum) + len(vote.tied), "invalid_judgments": vote.invalid,
                          "unknown_judgments": len(vote.unknown), "curated": len(curated)})
    merge_man = self.stage(rd / "merge", f"round_{r}/merge",
                           {"flipped": file_sha256(flipped_path), "kept": file_sha256(kept_path), "queue": file_sha256(queue_path),
                            "judgments": file_sha256(judgments_path)}, {"min_votes": int(cc.min_votes)}, merge_body)
    return {"round": r, "dir": rd, "input": pairs_path, "score": score_man, "flip": flip_man, "train_man": train_man,
            "filter": filter_man, "judge": judge_man, "merge": merge_man, "flipped": flipped_path,
            "kept": kept_path, "queue": queue_path, "judgments": judgments_path,
            "reannotated": rd / "merge" / merge_man["outputs"]["reannotated"]["path"],
            "curated": rd / "merge" / merge_man["outputs"]["curated"]["path"],
            "filter_scores": rd / "filter" / filter_man["outputs"]["scores"]["path"]}

  # ---- judging

  def judge_stage(self, r: int, d: Path, queue_path: Path) -> dict:
    jc = self.cc.judge
    name = f"round_{r}/judge"
    inputs = {"queue": file_sha256(queue_path)}
    settings = {"kind": jc.kind, "repeats": int(jc.repeats), "seed": int(jc.seed)}
    if jc.kind == "openai":
      settings.update(base_url=jc.base_url, judge_model=jc.judge_model, temperature=float(jc.temperature))
    elif jc.kind == "simulated":
      inputs["truth"] = file_sha256(Path(self.judge_truth))
      settings["max_retries"] = int(jc.max_retries)
    else:
      files = [Path(f.replace("{round}", str(r))) for f in split_files(jc.files)]
      if not files:
        raise UserError("curate.judge.kind 'stored' needs curate.judge.files (pairwise judgment files)")
      for f in files:
        if not f.is_file():
          raise UserError(f"{f}: no such file (curate.judge.files)")
      inputs["files"] = {str(f): file_sha256(f) for f in files}

    def body(dd: Path) -> StageResult:
      out = dd / "judgments.jsonl"
      queue = _read_pairs(queue_path)
      if jc.kind == "stored":
        ids = {str(p["id"]) for p in queue}
        kept = [j for f in inputs["files"] for _, j in iter_jsonl(f)
                if str(j.get("id")) in ids and j.get("mode", "pairwise") == "pairwise"]
        write_jsonl(out, kept)
        return StageResult({"judgments": out}, {"queued": len(queue), "judgments": len(kept),
                                                "valid": sum(steps.judgment_vote(j) is not None for j in kept)})
      from mrm_jax.judge.jobs import plan_jobs, read_items
      items = read_items(queue_path, self.image_root)
      jobs, _ = plan_jobs(items, "pairwise", int(jc.repeats), int(jc.seed))
      if jc.kind == "openai":
        self._openai_judge(jobs, out)
      else:
        _simulated_judge(jobs, {str(p["id"]): p for p in queue}, rep.answer_truth(self.judge_truth), out,
                         int(jc.seed), int(jc.max_retries), lambda: self.faults.tick(name),
                         self.progress and self.primary)
      judgments = [j for _, j in iter_jsonl(out)]
      return StageResult({"judgments": out}, {"queued": len(queue), "judgments": len(judgments),
                                              "valid": sum(steps.judgment_vote(j) is not None for j in judgments)})
    return self.stage(d, name, inputs, settings, body)

  def _openai_judge(self, jobs, out: Path) -> None:
    from mrm_jax.judge.client import ChatClient, RetryPolicy, run_jobs
    jc = self.cc.judge
    if not jc.base_url.startswith(("http://", "https://")) or not jc.judge_model:
      raise UserError("curate.judge.kind 'openai' needs curate.judge.base_url (http[s]://...) and "
                      "curate.judge.judge_model")
    key = None
    if jc.api_key_env:
      key = os.environ.get(jc.api_key_env)
      if not key:
        raise UserError(f"environment variable {jc.api_key_env} (curate.judge.api_key_env) is not set or empty")
    client = ChatClient(jc.base_url, jc.judge_model, key, timeout=float(jc.timeout),
                        temperature=float(jc.temperature))
    policy = RetryPolicy(int(jc.max_retries))
    summary = run_jobs(client, jobs, out, "pairwise", policy, concurrency=int(jc.concurrency),
                       progress=self.progress)
    if summary.not_reached or summary.unfinished:  # the stage is not done: a rerun asks them again
      raise UserError(f"{summary.not_reached + summary.unfinished} pairwise job(s) got no answer from the "
                      f"judge at {client.url} (first error: {summary.first_error}); run again to resume")

  # ---- report

  def finish(self) -> dict:
    cc = self.cc
    truth = rep.load_truth(self.truth_path) if self.truth_path else None
    rounds = []
    for info in self.rounds:
      s, f, fl, m = info["score"], info["flip"], info["filter"], info["merge"]
      j = info["judge"]
      counts = {"input": s["counts"]["pairs"], "negative": f["counts"]["negative"], "flipped": f["counts"]["flipped"],
                "kept": fl["counts"]["kept"], "queued": fl["counts"]["queued"], "judgments": j["counts"]["judgments"],
                "reannotated": m["counts"]["reannotated"], "relabelled": m["counts"]["relabelled"],
                "dropped": m["counts"]["dropped"], "curated": m["counts"]["curated"],
                "no_quorum": m["counts"]["no_quorum"], "tied": m["counts"]["tied"],
                "invalid_judgments": m["counts"]["invalid_judgments"], "answers_scored": s["counts"]["scored"]}
      entry = {"round": info["round"], "counts": counts, "train": info["train_man"]["train"],
               "model": info["train_man"]["model"], "curated": str(info["curated"]),
               "seconds": {k: info[k]["seconds"] for k in ("score", "flip", "filter", "judge", "merge")}
               | {"train": info["train_man"]["seconds"]}}
      if truth is not None:
        entry["truth"] = rep.round_truth(truth, _read_pairs(info["input"]), _read_pairs(info["flipped"]),
                                         _read_pairs(info["kept"]), _read_pairs(info["queue"]),
                                         _read_pairs(info["reannotated"]), _read_pairs(info["curated"]))
      rounds.append(entry)
      if self.primary:
        write_json(info["dir"] / "report.json", entry)
    last = self.rounds[-1]
    final_curated = self.workdir / "curated.jsonl"
    report = {
        "workdir": str(self.workdir),
        "noisy": str(self.noisy),
        "base_train": [str(f) for f in self.base_files],
        "base": ({"model": self.base_man["model"], "train": self.base_man["train"]} if self.base_man else None),
        "rounds": rounds,
        "final": {"curated": str(final_curated), "model": last["train_man"]["model"],
                  "n_curated": last["merge"]["counts"]["curated"]},
        "truth": (rep.overall_truth(truth, _read_pairs(self.noisy), _read_pairs(last["curated"]))
                  if truth is not None else None),
        "seconds": round(time.time() - self.t0, 3),
    }
    if self.primary:
      shutil.copyfile(last["curated"], final_curated.with_name(".curated.jsonl.tmp"))
      os.replace(final_curated.with_name(".curated.jsonl.tmp"), final_curated)
      if cc.plots:
        plots = self.workdir / "plots"
        report["plots"] = []
        for info in self.rounds:
          p = plots / f"strength_round_{info['round']}.png"
          rep.plot_strengths(p, _read_pairs(info["flipped"]), truth, info["round"])
          report["plots"].append(str(p))
        rep.plot_counts(plots / "counts.png", report)
        report["plots"].append(str(plots / "counts.png"))
      write_json(self.workdir / "report.json", report)
      self.say(rep.summary_table(report))
      self.say(f"curated set: {final_curated} ({report['final']['n_curated']} pairs); final model: "
               f"{report['final']['model']}; report: {self.workdir / 'report.json'}")
    return report


def _counts_line(counts: dict) -> str:
  return ", ".join(f"{k} {v}" for k, v in counts.items())


def _curated_pair(pair: dict, r: int, outcome: str, flipped: bool) -> dict:
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


def model_fingerprint(path: Path) -> str:
  """A given model's identity without hashing its weights: config + file names and sizes (an HF
  directory), or the manifest and the latest checkpoint step (a training workdir)."""
  if not path.exists():
    raise UserError(f"{path}: no such model directory")
  if (path / "manifest.json").is_file():
    from mrm_jax.train.checkpoint import Checkpointer
    ck = Checkpointer(path)
    step = ck.latest_step()
    ck.close()
    return digest({"manifest": file_sha256(path / "manifest.json"), "step": step})
  files = sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file())
  cfg = file_sha256(path / "config.json") if (path / "config.json").is_file() else None
  return digest({"config": cfg, "files": files})


class _TickingData:
  """A train data source whose iterator calls `tick()` per batch (the fault hook), else unchanged."""

  def __init__(self, inner, tick):
    self.inner, self.tick = inner, tick

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def __iter__(self):
    it = iter(self.inner)
    while True:
      try:
        batch = next(it)
      except StopIteration:
        return
      self.tick()
      yield batch


def _simulated_judge(jobs, pairs_by_id: dict, truth: dict, out: Path, seed: int, max_retries: int,
                     tick: Callable[[], None], progress: bool) -> None:
  """Pairwise judgments by the world's simulated judge (mrm_jax.demo.simjudge), in the judge client's
  record format and through the same parser and retry rule. Each job's randomness is a function of
  (seed, id, order, attempt), and jobs run in plan order, appended one by one to a resumable log."""
  import numpy as np
  from tqdm import tqdm

  from mrm_jax.demo import simjudge
  from mrm_jax.judge.jobs import missing_jobs
  from mrm_jax.judge.parse import parse_scores
  with AppendLog(out) as log:
    todo = missing_jobs(jobs, log.records, "pairwise")
    for job in tqdm(todo, desc="judge (simulated)", unit="job", disable=not progress, leave=False):
      pair = pairs_by_id[job.item.id]
      correct = []
      for answer in job.item.responses:
        key = score_key(pair.get("images"), pair["question"], answer)
        if key not in truth:
          raise UserError(f"simulated judge: no ground truth for an answer of pair {job.item.id!r} "
                          "(curate.judge.truth must cover the noisy pairs)")
        correct.append(truth[key])
      right = next((a for a, c in zip(job.item.responses, correct) if c), job.item.responses[0])
      shown = [{"correct": correct[i], "words": len(job.item.responses[i].split()), "partly": False,
                "claim": job.item.responses[i], "truth": right} for i in job.order]
      raw, scores, error = "", None, None
      for attempt in range(max_retries + 1):
        digest = hashlib.sha256(f"{seed}\x00{job.item.id}\x00{list(job.order)}\x00{attempt}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        kind = simjudge.pick_kind(rng)
        raw, _, _ = simjudge.listwise_output(rng, shown, {"correct": True, "claim": right, "truth": right}, kind)
        parsed = parse_scores(raw, len(job.order), "pairwise")
        if parsed.ok:
          scores, error = parsed.scores, None
          break
        error = f"unusable answer: {parsed.error} (after {attempt + 1} attempt{'s' * (attempt > 0)})"
      log.append({"id": job.item.id, "mode": "pairwise", "order": list(job.order), "raw": raw, "scores": scores,
                  "error": error, "judge": simjudge.JUDGE_NAME})
      tick()


def run_curation(cfg, workdir, *, progress: bool = True, devices=None,
                 out: Callable[[str], None] = print) -> dict:
  """Runs (or resumes) the iterative curation of `cfg` in `workdir` and returns the report (also
  written to WORKDIR/report.json). See the module docstring for inputs and outputs. `out` receives
  the human-readable progress lines and the summary table (process 0 only)."""
  if "curate" not in cfg:
    raise UserError("the config has no 'curate' section (add `c.curate = curate_config()` from "
                    "mrm_jax.curate.loop)")
  return _Curation(cfg, workdir, progress=progress, devices=devices, out=out).run()


# -- the command ------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
  p.description = (
      "The whole iterative curation (DESIGN §9): per round, score the pairs with the current reward model, "
      "flip the most confidently mislabelled ones, retrain on base + flipped data, keep the pairs the new "
      "model agrees with, have a judge re-annotate the rest in both orders, vote, and merge into the next "
      "round's pairs. Every stage leaves its outputs and a manifest under WORKDIR/round_R/STAGE/; rerunning "
      "the same command resumes at the first unfinished stage. Settings live in the config's `curate` "
      "section (override with --config.curate.KEY=VALUE).")
  p.add_argument("--config", required=True, metavar="CFG",
                 help="config file with a `curate` section (e.g. configs/curate_demo.py)")
  p.add_argument("--workdir", required=True, metavar="DIR", help="run directory (created if missing; resumed if not)")
  p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
  from mrm_jax import distributed
  distributed.add_arguments(p)


def run(args) -> int:
  import logging
  if not getattr(args, "verbose", False):
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO
  from mrm_jax.config import load_config
  cfg = load_config(args.config, getattr(args, "overrides", []))
  if "curate" not in cfg:
    raise UserError(f"{args.config}: the config has no 'curate' section (add `c.curate = curate_config()`)")
  from mrm_jax import distributed
  distributed.initialize(args)
  workdir = check_writable_dir(args.workdir)
  if cfg.curate.compilation_cache:
    enable_compilation_cache(workdir / "jax_cache")
  run_curation(cfg, workdir, progress=args.progress)
  return 0


def enable_compilation_cache(path: Path) -> None:
  """Each round retrains with the same shapes, but every `train()` call builds new jitted functions:
  JAX's persistent cache makes every compile after the first a disk read (also across restarts).
  JAX decides once per process whether the cache is on, so call this before anything compiles
  (`curate run` does; so should an in-process caller such as the demo). A cache the user configured
  wins."""
  import jax
  if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", str(path))
