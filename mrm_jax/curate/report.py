"""What `curate run` reports: per-round counts, agreement with ground truth, plots, a summary table.

Everything here is computed from the files the stages leave (pairs and their manifests), never
from in-memory state, so a resumed run reports exactly what an uninterrupted one does.

Ground truth (optional) comes in either of the embedded world's formats:
- a JSON object with `"correct_answer": {pair id: the correct chosen answer}` (`noisy_truth.json`);
- JSONL `{"images", "question", "answer", "correct": bool}` for every answer (`world_truth.jsonl`).
A pair's label is right when its chosen answer is the correct one (JSONL: chosen correct and
rejected not); pairs the truth does not cover are left out of the fractions.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mrm_jax.data.records import iter_pairs, score_key
from mrm_jax.errors import UserError, at
from mrm_jax.io import atomic_open, iter_jsonl, read_json_object, write_json

LabelTruth = Callable[[dict], "bool | None"]

# Per-round counts, in the order the summary table and the count plot show them.
COUNT_KEYS = (
  "input",
  "negative",
  "flipped",
  "kept",
  "queued",
  "judgments",
  "reannotated",
  "relabelled",
  "dropped",
  "curated",
)


def load_truth(path: str | os.PathLike) -> LabelTruth:
  """`label_right(pair) -> True | False | None` from a truth file (see the module docstring)."""
  path = Path(path)
  if not path.is_file():
    raise UserError(f"{path}: no such file (curate.truth)")
  try:  # one JSON object (noisy_truth.json), or else JSON Lines (whose reader names a bad line)
    obj = read_json_object(path)
  except UserError:
    obj = None
  if isinstance(obj, dict) and "answer" not in obj:
    correct = obj.get("correct_answer")
    if not isinstance(correct, dict) or not all(isinstance(a, str) for a in correct.values()):
      raise UserError(
        f"{path}: a JSON truth file needs 'correct_answer': {{pair id: answer string}}"
      )
    return lambda pair: (
      None if str(pair.get("id")) not in correct else pair["chosen"] == correct[str(pair.get("id"))]
    )
  answers = answer_truth(path)

  def label_right(pair: dict):
    c = answers.get(score_key(pair.get("images"), pair["question"], pair["chosen"]))
    r = answers.get(score_key(pair.get("images"), pair["question"], pair["rejected"]))
    return None if c is None or r is None else (c and not r)

  return label_right


def answer_truth(path: str | os.PathLike) -> dict[tuple, bool]:
  """score_key → correct, from a JSONL truth file (the simulated judge needs per-answer truth)."""
  out = {}
  for lineno, rec in iter_jsonl(path):
    if not isinstance(rec.get("correct"), bool) or not isinstance(rec.get("answer"), str):
      raise UserError(
        f"{at(path, lineno)}: a truth record needs 'answer' (string) and 'correct' (true/false)"
      )
    images = rec.get("images")
    if not (
      images is None
      or isinstance(images, str)
      or (isinstance(images, list) and all(isinstance(p, str) for p in images))
    ):
      raise UserError(f"{at(path, lineno)}: field 'images' should be a list of paths")
    out[score_key(rec.get("images"), str(rec.get("question", "")), rec["answer"])] = rec["correct"]
  return out


def _share(flags: Sequence[bool | None]) -> float | None:
  known = [f for f in flags if f is not None]
  return round(sum(known) / len(known), 4) if known else None


def _ratio(a: int, b: int) -> float | None:
  return round(a / b, 4) if b else None


def round_truth(
  truth: LabelTruth,
  inputs: list[dict],
  flipped: list[dict],
  kept: list[dict],
  queue: list[dict],
  reannotated: list[dict],
  curated: list[dict],
) -> dict:
  """Agreement of one round's pair sets with the truth: label accuracy of each set, and how well the
  flip step found the wrong labels of its input (precision: flipped pairs that were wrong; recall:
  wrong pairs that got flipped)."""
  by_id = {str(p.get("id")): p for p in inputs}
  wrong_before = {pid for pid, p in by_id.items() if truth(p) is False}
  flipped_ids = {str(p.get("id")) for p in flipped if p.get("flipped")}
  hit = len(flipped_ids & wrong_before)
  return {
    "input_accuracy": _share([truth(p) for p in inputs]),
    "flipped_accuracy": _share([truth(p) for p in flipped]),
    "kept_accuracy": _share([truth(p) for p in kept]),
    "queued_accuracy": _share([truth(p) for p in queue]),
    "reannotated_accuracy": _share([truth(p) for p in reannotated]),
    "curated_accuracy": _share([truth(p) for p in curated]),
    "input_wrong": len(wrong_before),
    "flip_precision": _ratio(hit, len(flipped_ids)),
    "flip_recall": _ratio(hit, len(wrong_before)),
  }


def overall_truth(truth: LabelTruth, noisy: list[dict], curated: list[dict]) -> dict:
  """The whole curation against the original noisy labels: a pair counts as *found* when its final
  label differs from the one it came with. noise_precision = found pairs that were mislabelled;
  noise_recall = mislabelled pairs found (dropped ones are not found; `noise_removed_recall` counts
  them as removed)."""
  final = {str(p.get("id")): p for p in curated}
  wrong = {str(p.get("id")) for p in noisy if truth(p) is False}
  known = {str(p.get("id")) for p in noisy if truth(p) is not None}
  found = {
    str(p.get("id"))
    for p in noisy
    if str(p.get("id")) in final and final[str(p.get("id"))]["chosen"] != p["chosen"]
  }
  dropped = {str(p.get("id")) for p in noisy} - set(final)
  return {
    "noisy_accuracy": _share([truth(p) for p in noisy]),
    "curated_accuracy": _share([truth(p) for p in curated]),
    "mislabelled": len(wrong),
    "found": len(found),
    "found_mislabelled": len(found & wrong),
    "dropped": len(dropped),
    "dropped_mislabelled": len(dropped & wrong),
    "noise_precision": _ratio(len(found & wrong & known), len(found & known)),
    "noise_recall": _ratio(len(found & wrong), len(wrong)),
    "noise_removed_recall": _ratio(len((found | dropped) & wrong), len(wrong)),
  }


def summary_table(report: dict) -> str:
  """A readable per-round table (stdout of `curate run`)."""
  head = ["round", *COUNT_KEYS, "label acc in→out", "eval acc"]
  rows = [head]
  for rr in report["rounds"]:
    c = rr["counts"]
    t = rr.get("truth") or {}
    known = t.get("input_accuracy") is not None and t.get("curated_accuracy") is not None
    acc = f"{t['input_accuracy']:.3f}→{t['curated_accuracy']:.3f}" if known else "-"
    ev = ((rr.get("train") or {}).get("eval") or {}).get("accuracy")
    rows.append(
      [
        str(rr["round"]),
        *(str(c.get(k, "-")) for k in COUNT_KEYS),
        acc,
        f"{ev:.3f}" if isinstance(ev, float) else "-",
      ]
    )
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
  out = "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
  base_eval = (((report.get("base") or {}).get("train") or {}).get("eval") or {}).get("accuracy")
  if isinstance(base_eval, float):
    out += f"\nbase model (before curation): eval accuracy {base_eval:.3f}"
  tt = report.get("truth")
  if tt:

    def f(x):
      return "-" if x is None else f"{x:.3f}"

    out += (
      f"\nvs. truth: noisy label accuracy {f(tt['noisy_accuracy'])} → curated "
      f"{f(tt['curated_accuracy'])}; mislabelled pairs found: precision "
      f"{f(tt['noise_precision'])}, recall {f(tt['noise_recall'])} "
      f"({tt['found_mislabelled']}/{tt['mislabelled']}; {tt['dropped']} dropped, "
      f"{tt['dropped_mislabelled']} of them mislabelled)"
    )
  return out


def plot_strengths(
  path: str | os.PathLike, flipped: list[dict], truth: LabelTruth | None, round_index: int
) -> None:
  """Histogram of the flip strength (mean score(chosen) − score(rejected) for the labels as they
  came), split by true label when a truth is given, with the flip threshold."""
  original = []
  for p in flipped:  # the flip step stores strength for the labels written: undo it when flipped
    s = float(p["strength"])
    original.append((-s if p.get("flipped") else s, p))
  fig = Figure(figsize=(6, 3.5), dpi=100)
  ax = fig.subplots()
  values = [s for s, _ in original]
  bins = 30 if values else 1
  if truth is not None and values:
    right = [s for s, p in original if truth({**p, **_as_came(p)}) is True]
    wrong = [s for s, p in original if truth({**p, **_as_came(p)}) is False]
    ax.hist(
      [right, wrong],
      bins=bins,
      stacked=True,
      label=["label right", "label wrong"],
      color=["tab:blue", "tab:red"],
    )
    ax.legend(loc="upper left")
  else:
    ax.hist(values, bins=bins, color="tab:blue")
  cut = [s for s, p in original if p.get("flipped")]
  if cut:
    ax.axvline(max(cut), color="k", linestyle="--", linewidth=1)
    ax.text(max(cut), ax.get_ylim()[1] * 0.95, f" flipped ≤ {max(cut):.2f}", va="top", fontsize=8)
  ax.set_xlabel("strength = score(chosen) − score(rejected), labels as they came")
  ax.set_ylabel("pairs")
  ax.set_title(f"round {round_index}: {len(cut)} of {len(values)} pairs flipped")
  fig.tight_layout()
  with atomic_open(path, "wb") as f:
    fig.savefig(f, format="png")


def _as_came(p: dict) -> dict:
  return {"chosen": p["rejected"], "rejected": p["chosen"]} if p.get("flipped") else {}


def plot_counts(path: str | os.PathLike, report: dict) -> None:
  """Grouped bars of the per-round counts."""
  keys = [k for k in COUNT_KEYS if k not in ("judgments",)]
  rounds = report["rounds"]
  fig = Figure(figsize=(max(6.0, 0.95 * len(keys)), 3.8), dpi=100)
  ax = fig.subplots()
  width = 0.8 / max(1, len(rounds))
  x = np.arange(len(keys))
  for i, rr in enumerate(rounds):
    ax.bar(
      x + i * width, [rr["counts"].get(k, 0) for k in keys], width, label=f"round {rr['round']}"
    )
  ax.set_xticks(x + width * (len(rounds) - 1) / 2)
  ax.set_xticklabels(keys, rotation=20)
  ax.set_ylabel("pairs")
  ax.set_title("curation counts per round")
  ax.legend()
  fig.tight_layout()
  with atomic_open(path, "wb") as f:
    fig.savefig(f, format="png")


# -- the run's report ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RoundFiles:
  """One finished round: its stage manifests and the pair files they point at."""

  round: int
  dir: Path
  input: Path
  score: dict
  flip: dict
  train: dict
  filter: dict
  judge: dict
  merge: dict
  flipped: Path
  kept: Path
  queue: Path
  judgments: Path
  reannotated: Path
  curated: Path
  filter_scores: Path


def _pairs(path: Path) -> list[dict]:
  return [p for _, p in iter_pairs(path)]


def round_counts(rf: RoundFiles) -> dict:
  """A round's counts, from its stage manifests."""
  s, f, fl, j, m = (
    rf.score["counts"],
    rf.flip["counts"],
    rf.filter["counts"],
    rf.judge["counts"],
    rf.merge["counts"],
  )
  return {
    "input": s["pairs"],
    "negative": f["negative"],
    "flipped": f["flipped"],
    "kept": fl["kept"],
    "queued": fl["queued"],
    "judgments": j["judgments"],
    **{
      k: m[k]
      for k in (
        "reannotated",
        "relabelled",
        "dropped",
        "curated",
        "no_quorum",
        "tied",
        "invalid_judgments",
      )
    },
    "answers_scored": s["scored"],
  }


def round_report(rf: RoundFiles, truth: LabelTruth | None) -> dict:
  """WORKDIR/round_r/report.json: counts, M_{r+1}'s training summary and model, the curated
  set, seconds per stage, and agreement with the truth when one is known."""
  seconds = {k: getattr(rf, k)["seconds"] for k in ("score", "flip", "filter", "judge", "merge")}
  entry = {
    "round": rf.round,
    "counts": round_counts(rf),
    "train": rf.train["train"],
    "model": rf.train["model"],
    "curated": str(rf.curated),
    "seconds": seconds | {"train": rf.train["seconds"]},
  }
  if truth is not None:
    entry["truth"] = round_truth(
      truth,
      *(_pairs(p) for p in (rf.input, rf.flipped, rf.kept, rf.queue, rf.reannotated, rf.curated)),
    )
  return entry


def write_report(
  workdir: Path,
  inputs,
  base_man: dict | None,
  rounds: list[RoundFiles],
  *,
  t0: float,
  plots: bool,
  primary: bool,
  say: Callable[[str], None],
) -> dict:
  """The run's report (WORKDIR/report.json, written by process 0 with the per-round reports,
  WORKDIR/curated.jsonl and the plots):
    base      {model, train} of M_0 when it was trained here (else None); `train` is the
              training summary {steps, loss, accuracy, eval | None, resumed_from}
    rounds    per round: `round_report`
    truth     the whole run against the noisy labels (`overall_truth`), or None
    final     {curated, model, n_curated}; also workdir, noisy, base_train, plots, seconds
  Counts satisfy kept + queued = input, reannotated + dropped = queued, curated = kept +
  reannotated, judgments = repeats · queued (a live judge may record failures among them)."""
  truth = load_truth(inputs.truth) if inputs.truth else None
  entries = [round_report(rf, truth) for rf in rounds]
  last, final_curated = rounds[-1], workdir / "curated.jsonl"
  report = {
    "workdir": str(workdir),
    "noisy": str(inputs.noisy),
    "base_train": [str(f) for f in inputs.base_train],
    "base": {"model": base_man["model"], "train": base_man["train"]} if base_man else None,
    "rounds": entries,
    "final": {
      "curated": str(final_curated),
      "model": last.train["model"],
      "n_curated": last.merge["counts"]["curated"],
    },
    "truth": (
      overall_truth(truth, _pairs(inputs.noisy), _pairs(last.curated))
      if truth is not None
      else None
    ),
    "seconds": round(time.time() - t0, 3),
  }
  if not primary:
    return report
  for rf, entry in zip(rounds, entries):
    write_json(rf.dir / "report.json", entry)
  tmp = final_curated.with_name(".curated.jsonl.tmp")
  shutil.copyfile(last.curated, tmp)
  os.replace(tmp, final_curated)
  if plots:
    report["plots"] = _plot_run(workdir / "plots", rounds, truth, report)
  write_json(workdir / "report.json", report)
  say(summary_table(report))
  say(
    f"curated set: {final_curated} ({report['final']['n_curated']} pairs); final model: "
    f"{report['final']['model']}; report: {workdir / 'report.json'}"
  )
  return report


def _plot_run(
  plots: Path, rounds: list[RoundFiles], truth: LabelTruth | None, report: dict
) -> list[str]:
  paths = []
  for rf in rounds:
    p = plots / f"strength_round_{rf.round}.png"
    plot_strengths(p, _pairs(rf.flipped), truth, rf.round)
    paths.append(str(p))
  plot_counts(plots / "counts.png", report)
  return [*paths, str(plots / "counts.png")]
