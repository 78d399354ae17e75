"""The whole pipeline on the embedded world (DESIGN §3.1c, §11): what `mrm-jax demo` runs.

    summary = run_demo(workdir, size="full", seed=None, overrides=())

A thin orchestration over the resumable curation loop (mrm_jax/curate/loop.py, on the world's
inputs and simulated judge: mrm_jax/demo/curation.py), which does the work in WORKDIR itself:
  world      WORKDIR/world: generated (or reused when its seed and settings match)
  prepare    debiased pairs from the world's stored judge outputs (`construct`) + T2I pairs (`t2i`)
  base       round-0 training on debiased + T2I pairs (M_0)
  round_r    score → flip → retrain (M_{r+1}) → filter → re-annotate (the simulated judge answers
             from the world's ground truth, with some errors) → vote → merge, `curate.rounds` times
then, here:
  heldout    every trained model (M_0 .. M_R) scores the world's heldout_pairs.jsonl and is
             evaluated as `mrm-jax evaluate --benchmark pairs` would: WORKDIR/heldout/round_T.json
             ({n, accuracy} and the model it came from) and round_T.scores.jsonl (one
             {"chosen", "rejected"} line per held-out pair, the `evaluate --scores` format)
  summary    WORKDIR/summary.json, PNG plots beside it, and a table on stdout.

Training round T is the model trained T-th: round 0 is M_0 (before curation), round T ≥ 1 the model
retrained in the loop's round_{T-1} directory. summary.json holds `round0_heldout_accuracy` (M_0),
`heldout_accuracy` (M_R, after the last round), `noise_precision` / `noise_recall` (of the pairs
whose label curation changed, the share that were mislabelled / of the mislabelled pairs, the share
whose label curation changed; `null` when undefined, e.g. nothing changed), `seconds` (this
invocation),
`compute_seconds` (the times the finished stages recorded, summed: a resumed stage counts its last
attempt), and the details (per-round accuracies and counts, label accuracy before and after, paths
relative to WORKDIR). Every number except `seconds` is a function of the config and seed: a rerun of
a finished demo rescores nothing and writes the same summary.

Resumable: the loop's stages resume where a killed run stopped; a held-out evaluation is redone only
when its model or the held-out file changed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
from matplotlib.figure import Figure

from mrm_jax.curate.config import split_files
from mrm_jax.curate.training import enable_compilation_cache
from mrm_jax.demo.config import load_demo_config
from mrm_jax.demo.curation import run_curation
from mrm_jax.demo.world import resolve_counts
from mrm_jax.errors import UserError
from mrm_jax.evaluate import benchmarks, metrics
from mrm_jax.evaluate.scoring import score_records
from mrm_jax.io import atomic_open, check_writable_dir, write_json, write_jsonl
from mrm_jax.loading import load_model
from mrm_jax.stages import digest, file_sha256, model_fingerprint

SUMMARY = "summary.json"
ACCURACY_PLOT = "heldout_accuracy.png"


def _rel(path, root: Path) -> str:
  return os.path.relpath(Path(path).resolve(), root.resolve())


# -- held-out evaluation ---------------------------------------------------------------------------


def _load_model(path: str, cfg, world: Path):
  """(model, processor) of a training workdir or an HF directory, on one device."""
  return load_model(
    path,
    devices=jax.local_devices()[:1],
    min_pixels=int(cfg.data.min_pixels),
    max_pixels=int(cfg.data.max_pixels),
    processor_dir=world / "model",
  )


def evaluate_heldout(
  model_path: str,
  heldout: Path,
  image_root: Path,
  out_dir: Path,
  name: str,
  cfg,
  world: Path,
  *,
  progress: bool = True,
) -> tuple[dict, bool]:
  """`evaluate --benchmark pairs` of one model on the held-out file: OUT_DIR/NAME.json
  ({n, accuracy}, the model, a key and the seconds it took) and OUT_DIR/NAME.scores.jsonl. Returns
  (report, reused): an earlier evaluation is reused when its key (model + held-out file + settings)
  matches."""
  key = digest(
    {
      "model": model_fingerprint(Path(model_path)),
      "heldout": file_sha256(heldout),
      "max_len": int(cfg.data.max_seq_len),
      "max_pixels": int(cfg.data.max_pixels),
      "min_pixels": int(cfg.data.min_pixels),
    }
  )
  report_path = out_dir / f"{name}.json"
  scores_path = out_dir / f"{name}.scores.jsonl"
  try:
    done = json.loads(report_path.read_text(encoding="utf-8"))
  except (OSError, json.JSONDecodeError):
    done = None
  if done is not None and done.get("key") == key and scores_path.is_file():
    return done, True
  t0 = time.time()
  items = benchmarks.load("pairs", heldout)
  if not items:
    raise UserError(
      f"{heldout}: the held-out split is empty (the demo evaluates on it; set world.n_heldout > 0)"
    )
  model, processor = _load_model(model_path, cfg, world)
  recs = [r for item in items for r in benchmarks.scoring_records(item, image_root)]
  sides = ("chosen", "rejected")
  scores = score_records(
    model,
    processor,
    recs,
    image_root,
    int(cfg.curate.score.batch_size),
    max_len=int(cfg.data.max_seq_len),
    progress=progress,
    where=lambda i: f"{items[i // 2].where} ({sides[i % 2]})",
  )
  pairs = list(zip(scores[0::2], scores[1::2]))
  write_jsonl(
    scores_path, ({"id": item.id, "chosen": c, "rejected": r} for item, (c, r) in zip(items, pairs))
  )
  rep = {
    **metrics.report("pairs", items, pairs),
    "model": str(model_path),
    "key": key,
    "seconds": round(time.time() - t0, 3),
  }
  write_json(report_path, rep)
  return rep, False


# -- summary, plots, table -------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> None:
  tmp = dst.with_name(f".{dst.name}.tmp")
  shutil.copyfile(src, tmp)
  os.replace(tmp, dst)


def plot_accuracy(path: Path, summary: dict) -> None:
  """Held-out accuracy per training round (chance at 0.5), and the label accuracy of the pair set
  each
  curation round starts from, with the final curated set."""
  rounds = summary["rounds"]
  fig = Figure(figsize=(9, 3.5), dpi=100)
  ax, bx = fig.subplots(1, 2)
  xs = [r["round"] for r in rounds]
  ys = [r["heldout_accuracy"] for r in rounds]
  ax.plot(xs, ys, marker="o", color="tab:blue", label="held-out accuracy")
  ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
  for x, y in zip(xs, ys):
    ax.annotate(
      f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8
    )
  ax.set_xticks(xs)
  ax.set_xlim(min(xs) - 0.4, max(xs) + 0.4)
  ax.set_xlabel("training round (0 = before curation)")
  ax.set_ylabel("accuracy")
  ax.set_ylim(0, 1.05)
  ax.set_title(f"held-out pairs (n = {summary['heldout_pairs']})")
  ax.legend(loc="lower right", fontsize=8)
  labels = [r["label_accuracy_in"] for r in rounds[1:]] + [summary["curated_label_accuracy"]]
  lx = list(range(len(labels)))
  bars = bx.bar(lx, [v or 0.0 for v in labels], color="tab:green")
  bx.bar_label(bars, labels=[_fmt(v) for v in labels], fontsize=8)
  bx.set_xticks(lx)
  bx.set_xticklabels(
    [f"round {i} input" for i in range(len(labels) - 1)] + ["curated"], rotation=15
  )
  bx.set_ylim(0, 1.05)
  bx.set_ylabel("share of labels right")
  bx.set_title("noisy pair labels vs. truth")
  fig.tight_layout()
  with atomic_open(path, "wb") as f:
    fig.savefig(f, format="png")


def _fmt(x) -> str:
  return "-" if x is None else f"{x:.3f}"


def summary_table(summary: dict) -> str:
  """The closing table of `mrm-jax demo`."""
  rows = [("held-out pairs", str(summary["heldout_pairs"]), "world/heldout_pairs.jsonl")]
  for r in summary["rounds"]:
    what = (
      "trained on the debiased + T2I pairs (before curation)"
      if r["round"] == 0
      else "retrained on debiased + T2I + the flipped noisy pairs of curation round "
      f"{r['round'] - 1}"
    )
    rows.append((f"held-out accuracy, round {r['round']}", _fmt(r["heldout_accuracy"]), what))
  rows += [
    (
      "noisy labels right",
      _fmt(summary["noisy_label_accuracy"]),
      f"→ {_fmt(summary['curated_label_accuracy'])} in the curated set ({summary['curated_pairs']} "
      "pairs)",
    ),
    (
      "noise precision",
      _fmt(summary["noise_precision"]),
      f"{summary['found_mislabelled']} of {summary['found']} relabelled pairs were mislabelled",
    ),
    (
      "noise recall",
      _fmt(summary["noise_recall"]),
      f"{summary['found_mislabelled']} of {summary['mislabelled']} mislabelled pairs relabelled "
      f"({summary['dropped']} pairs dropped)",
    ),
    ("seconds", f"{summary['seconds']:.1f}", "this invocation"),
    ("plots", str(len(summary["plots"])), ", ".join(summary["plots"])),
  ]
  w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
  return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows)


# -- the demo --------------------------------------------------------------------------------------


def run_demo(
  workdir,
  *,
  size: str | None = "full",
  seed: int | None = None,
  overrides: Sequence[str] = (),
  config: str = "curate_demo",
  progress: bool = True,
  devices=None,
  out: Callable[[str], None] = print,
) -> dict:
  """Runs (or resumes) the demo in `workdir`; returns the summary (also WORKDIR/summary.json).

  `config` is a config file with the demo's training settings (default configs/curate_demo.py; a
  `world` and a `curate` section are added when missing), `size` the world size (None: the
  config's),
  `overrides` `--config.KEY=VALUE` items applied last. `devices` restricts training (tests)."""
  t0 = time.time()
  cfg = load_demo_config(config, list(overrides), seed, size)
  if cfg.curate.noisy:
    raise UserError(
      "curate.noisy is set: the demo curates the embedded world's noisy pairs (use "
      "`mrm-jax curate run` for other data)"
    )
  if not cfg.curate.world_dir and resolve_counts(cfg.world)["heldout"] < 1:
    raise UserError(
      "world.n_heldout must be at least 1: the demo evaluates every model on the held-out split"
    )
  workdir = check_writable_dir(workdir).resolve()
  if cfg.curate.compilation_cache:
    enable_compilation_cache(workdir / "jax_cache")  # before anything compiles
  report = run_curation(cfg, workdir, progress=progress, devices=devices, out=out)
  world = Path(cfg.curate.world_dir).resolve() if cfg.curate.world_dir else workdir / "world"
  rounds = heldout_rounds(cfg, workdir, world, report, progress=progress, out=out)
  plots = write_plots(workdir, rounds, report)
  summary = demo_summary(workdir, world, rounds, report, plots)
  summary["seconds"] = round(max(time.time() - t0, 1e-3), 3)
  write_json(workdir / SUMMARY, summary)
  out("")
  out(f"mrm-jax demo: {workdir / SUMMARY}")
  out(summary_table(summary))
  return summary


def _trained_models(cfg, report: dict) -> list[tuple[str, dict | None]]:
  """(model, training summary) of every training round: M_0, then each curation round's."""
  if report["base"] is not None:
    models = [(report["base"]["model"], report["base"]["train"])]
  else:  # M_0 given (curate.initial_models): its first scorer
    models = [(split_files(cfg.curate.initial_models)[0], None)]
  return models + [(rr["model"], rr["train"]) for rr in report["rounds"]]


def heldout_rounds(
  cfg, workdir: Path, world: Path, report: dict, *, progress: bool, out: Callable[[str], None]
) -> list[dict]:
  """Every trained model evaluated on the world's held-out pairs: summary.json's `rounds`."""
  heldout = world / "heldout_pairs.jsonl"
  if not heldout.is_file():
    raise UserError(f"{heldout}: no such file (the world's held-out split)")
  image_root = Path(cfg.curate.image_root or cfg.data.image_root or world).resolve()
  rounds = []
  for t, (model, train) in enumerate(_trained_models(cfg, report)):
    ev, reused = evaluate_heldout(
      model, heldout, image_root, workdir / "heldout", f"round_{t}", cfg, world, progress=progress
    )
    how = "done earlier" if reused else f"{ev['seconds']:.1f} s"
    out(
      f"[heldout/round_{t}] model {_rel(model, workdir)}: accuracy {_fmt(ev['accuracy'])} on "
      f"{ev['n']} pairs ({how})"
    )
    rr = report["rounds"][t - 1] if t else None
    rounds.append(
      {
        "round": t,
        "model": _rel(model, workdir),
        "heldout_accuracy": ev["accuracy"],
        "heldout_pairs": ev["n"],
        "heldout_scores": _rel(workdir / "heldout" / f"round_{t}.scores.jsonl", workdir),
        "train_steps": (train or {}).get("steps"),
        "training_eval_accuracy": ((train or {}).get("eval") or {}).get("accuracy"),
        # the pairs this model's curation round started from, and what it made of them
        "label_accuracy_in": (rr.get("truth") or {}).get("input_accuracy") if rr else None,
        "counts": rr["counts"] if rr else None,
      }
    )
  return rounds


def write_plots(workdir: Path, rounds: list[dict], report: dict) -> list[str]:
  """The held-out accuracy plot and copies of the loop's plots (curation counts, strength
  histograms) beside summary.json; their names."""
  truth = report["truth"] or {}
  plot_accuracy(
    workdir / ACCURACY_PLOT,
    {
      "rounds": rounds,
      "heldout_pairs": rounds[0]["heldout_pairs"],
      "curated_label_accuracy": truth.get("curated_accuracy"),
    },
  )
  plots = [ACCURACY_PLOT]
  for p in report.get("plots") or []:
    src = Path(p)
    name = "curation_counts.png" if src.name == "counts.png" else src.name
    _copy(src, workdir / name)
    plots.append(name)
  return plots


def demo_summary(
  workdir: Path, world: Path, rounds: list[dict], report: dict, plots: list[str]
) -> dict:
  """summary.json (its `seconds` is the caller's to fill in)."""
  truth = report["truth"] or {}
  wstats = json.loads((world / "world.json").read_text(encoding="utf-8"))
  return {
    "round0_heldout_accuracy": rounds[0]["heldout_accuracy"],
    "heldout_accuracy": rounds[-1]["heldout_accuracy"],
    "noise_precision": truth.get("noise_precision"),
    "noise_recall": truth.get("noise_recall"),
    "seconds": None,  # this invocation (a rerun of a finished demo: seconds)
    # what the whole pipeline took, summed over its stages (stable across resumes)
    "compute_seconds": _compute_seconds(workdir),
    "heldout_pairs": rounds[0]["heldout_pairs"],
    "heldout_accuracy_per_round": [r["heldout_accuracy"] for r in rounds],
    "noisy_pairs": wstats["noisy"]["n"],
    "mislabelled": truth.get("mislabelled"),
    "found": truth.get("found"),
    "found_mislabelled": truth.get("found_mislabelled"),
    "dropped": truth.get("dropped"),
    "noise_removed_recall": truth.get("noise_removed_recall"),
    "noisy_label_accuracy": truth.get("noisy_accuracy"),
    "curated_label_accuracy": truth.get("curated_accuracy"),
    "curated_pairs": report["final"]["n_curated"],
    "curation_rounds": len(report["rounds"]),
    "rounds": rounds,
    "world": {
      "seed": wstats["seed"],
      "size": wstats["config"]["size"],
      "path": _rel(world, workdir),
    },
    "curated": _rel(report["final"]["curated"], workdir),
    "report": "report.json",
    "plots": plots,
  }


def _compute_seconds(workdir: Path) -> float:
  """The seconds every finished stage recorded (curation stage manifests, held-out evaluations)."""
  total = 0.0
  for path in [*workdir.rglob("manifest.json"), *(workdir / "heldout").glob("round_*.json")]:
    try:
      rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
      continue
    if isinstance(rec, dict) and ("stage" in rec or path.parent.name == "heldout"):
      total += float(rec.get("seconds") or 0.0)
  return round(total, 3)
