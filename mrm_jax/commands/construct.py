"""`mrm-jax construct`: debiased preference pairs from judged candidate sets (DESIGN §3.2b, §7)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mrm_jax.cli_types import nonnegative_float
from mrm_jax.construct import pairs as construct_pairs
from mrm_jax.construct import style
from mrm_jax.construct.convert import OUTPUT_FORMATS, write_pairs
from mrm_jax.io import atomic_outputs, check_distinct_paths, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.description = (
    "Build preference pairs from candidate sets and judge scores: per response the mean of its "
    "valid "
    "listwise/pointwise scores; every pair of different responses whose judgments agree on the "
    "direction and whose mean gap is at least --min-gap becomes a pair (chosen = higher mean, "
    "strength = gap, id '{candidate id}:{i}-{j}'). Prints a style-bias report: the share of pairs "
    "whose chosen answer is longer and the cross-validated accuracy of a style-only probe."
  )
  p.add_argument(
    "--candidates",
    required=True,
    help="candidate sets JSONL {id, images, question, reference?, responses}",
  )
  p.add_argument(
    "--judgments",
    required=True,
    help="judgments JSONL from `mrm-jax judge` (listwise and/or pointwise)",
  )
  p.add_argument("--output", required=True, help="pair file to write")
  p.add_argument(
    "--min-gap",
    type=nonnegative_float,
    default=0.5,
    help="minimum mean score gap for a pair (default 0.5)",
  )
  p.add_argument(
    "--balance-length",
    action="store_true",
    help="downsample so the longer answer is chosen in exactly half of the pairs whose lengths "
    "differ",
  )
  p.add_argument(
    "--seed", type=int, default=0, help="seed of the balancing and the probe's folds (default 0)"
  )
  p.add_argument(
    "--report", default=None, help="write the construction and style-bias report here (JSON)"
  )
  p.add_argument(
    "--format",
    choices=OUTPUT_FORMATS,
    default="canonical",
    help="output record format (default canonical)",
  )
  p.add_argument(
    "--reparse",
    action="store_true",
    help="recompute scores from each judgment's raw text with the current parser instead of "
    "trusting the stored scores",
  )


def _style_line(name: str, s: dict) -> str:
  share = "n/a" if s["chosen_longer_share"] is None else f"{s['chosen_longer_share']:.3f}"
  acc = "n/a (too few pairs)" if s["probe_accuracy"] is None else f"{s['probe_accuracy']:.3f}"
  return (
    f"  {name}: {s['n_pairs']} pairs, chosen longer in {share} "
    f"({s['chosen_longer']} longer / {s['chosen_shorter']} shorter / {s['equal_length']} equal); "
    f"style-probe accuracy {acc}"
  )


def run(args) -> int:
  check_distinct_paths(
    {"--output": args.output, "--report": args.report},
    {"--candidates": args.candidates, "--judgments": args.judgments},
  )
  pairs, stats = construct_pairs.construct_files(
    args.candidates, args.judgments, args.min_gap, args.reparse
  )
  report = stats.report()
  report["min_gap"] = args.min_gap
  report["style"] = style.style_report(pairs, args.seed)
  if args.balance_length:
    balanced = style.balance_length(pairs, args.seed)
    report["balanced"] = {
      **style.style_report(balanced, args.seed),
      "removed": len(pairs) - len(balanced),
    }
    pairs = balanced
  report["n_written"] = len(pairs)
  with atomic_outputs():  # the pairs and their report are replaced together or not at all
    write_pairs(args.output, pairs, args.format, source_root=Path(args.candidates).parent)
    if args.report:
      write_json(args.report, report)

  j, d = report["judgments"], report["dropped"]
  print(
    f"construct: {report['n_candidates']} candidate sets, {j['valid']}/{j['n']} valid judgments "
    f"({j['invalid']} invalid, {j['ignored_mode']} other modes, {j['unknown_id']} unknown ids)"
  )
  print(
    f"  {stats.pairs} pairs; dropped {d['disagreement']} disagreeing, {d['small_gap']} with gap < "
    f"{args.min_gap:g}, {d['not_covered']} never judged together, {d['identical_text']} identical"
  )
  print(_style_line("style", report["style"]))
  if args.balance_length:
    print(_style_line("balanced", report["balanced"]))
  print(f"  wrote {len(pairs)} {args.format} pairs -> {args.output}")
  if j["unknown_id"]:
    print(
      f"construct: warning: {j['unknown_id']} judgments name no candidate set in {args.candidates}",
      file=sys.stderr,
    )
  return 0
