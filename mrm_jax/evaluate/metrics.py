"""Benchmark metrics from (chosen, rejected) scores: the report of DESIGN §3.1c.

A pair is right only when score(chosen) > score(rejected) strictly: a tie (or a NaN) is
wrong, so a constant scorer gets 0, not 50%. Reports hold fractions in [0, 1]; a category
with no items reports `null` rather than a made-up number.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence

from mrm_jax.data.records import is_finite_number, record_id
from mrm_jax.errors import UserError, at
from mrm_jax.evaluate.benchmarks import (
  MM_RLHF_CATEGORIES,
  VL_REWARDBENCH_CATEGORIES,
  BenchItem,
  check_name,
)
from mrm_jax.io import iter_jsonl


def is_right(chosen: float, rejected: float) -> bool:
  return chosen > rejected


def _fraction(right: int, n: int) -> float | None:
  return right / n if n else None


def _mean(values: Sequence[float | None]) -> float | None:
  values = [v for v in values if v is not None]
  return sum(values) / len(values) if values else None


def vl_rewardbench(items: Sequence[BenchItem], right: Sequence[bool]) -> dict:
  """Overall (per pair) and macro (mean of general, hallucination, reasoning) accuracy."""
  n, k = defaultdict(int), defaultdict(int)
  for item, ok in zip(items, right):
    n[item.category] += 1
    k[item.category] += ok
  per = {c: _fraction(k[c], n[c]) for c in VL_REWARDBENCH_CATEGORIES}
  return {
    "n": len(items),
    "overall": _fraction(sum(right), len(items)),
    "macro": _mean(list(per.values())),
    **per,
  }


def multimodal_rewardbench(items: Sequence[BenchItem], right: Sequence[bool]) -> dict:
  """Accuracy per category (safety → bias/toxicity, reasoning → math/coding), overall and
  overall without the safety categories (both per pair)."""
  n, k = defaultdict(int), defaultdict(int)
  for item, ok in zip(items, right):
    n[item.category] += 1
    k[item.category] += ok
  no_safety = [(i, ok) for i, ok in zip(items, right) if not i.category.startswith("safety")]
  return {
    "n": len(items),
    "overall": _fraction(sum(right), len(items)),
    "overall_without_safety": _fraction(sum(ok for _, ok in no_safety), len(no_safety)),
    "categories": {c: {"n": n[c], "accuracy": _fraction(k[c], n[c])} for c in sorted(n)},
  }


def mm_rlhf_rewardbench(items: Sequence[BenchItem], right: Sequence[bool]) -> dict:
  """Acc per pair; Acc+ per id (an id counts only when all of its pairs are right), overall and
  per category (an id's pairs in that category)."""
  groups: dict[tuple[str, str], list[bool]] = defaultdict(list)
  by_id: dict[str, list[bool]] = defaultdict(list)
  for item, ok in zip(items, right):
    groups[(item.category, item.id)].append(ok)
    by_id[item.id].append(ok)
  categories = [c for c in MM_RLHF_CATEGORIES if any(i.category == c for i in items)]
  categories += sorted({i.category for i in items} - set(categories))
  per = {}
  for c in categories:
    flags = [ok for i, ok in zip(items, right) if i.category == c]
    ids = [g for (cat, _), g in groups.items() if cat == c]
    per[c] = {
      "n": len(flags),
      "acc": _fraction(sum(flags), len(flags)),
      "acc_plus": _fraction(sum(all(g) for g in ids), len(ids)),
    }
  return {
    "n": len(items),
    "acc": _fraction(sum(right), len(items)),
    "acc_plus": _fraction(sum(all(g) for g in by_id.values()), len(by_id)),
    "categories": per,
  }


def pairs(items: Sequence[BenchItem], right: Sequence[bool]) -> dict:
  return {"n": len(items), "accuracy": _fraction(sum(right), len(items))}


REPORTS = {
  "vl_rewardbench": vl_rewardbench,
  "multimodal_rewardbench": multimodal_rewardbench,
  "mm_rlhf_rewardbench": mm_rlhf_rewardbench,
  "pairs": pairs,
}


def report(name: str, items: Sequence[BenchItem], scores: Sequence[tuple[float, float]]) -> dict:
  """The benchmark's report from per-item (chosen, rejected) scores."""
  check_name(name)
  if len(items) != len(scores):
    raise ValueError(f"{len(items)} items but {len(scores)} scores")
  return REPORTS[name](items, [is_right(c, r) for c, r in scores])


def _number(value, key: str, where: str) -> float:
  if not is_finite_number(value):
    raise UserError(f"{where}: '{key}' should be a finite number, got {value!r:.40}")
  return float(value)


def read_scores(
  path: str | os.PathLike, items: Sequence[BenchItem], data_path: str | os.PathLike
) -> list[tuple[float, float]]:
  """A benchmark score file: one `{"chosen": float, "rejected": float}` line per benchmark record,
  same order; an `id`, when present, must match the record's."""
  scores = []
  for lineno, record in iter_jsonl(path):
    where = at(path, lineno)
    if len(scores) >= len(items):
      raise UserError(f"{where}: more score lines than the {len(items)} records of {data_path}")
    item = items[len(scores)]
    if "chosen" not in record or "rejected" not in record:
      raise UserError(f"{where}: a score line needs 'chosen' and 'rejected' numbers")
    if record.get("id") is not None and record_id(record, where) != item.id:
      raise UserError(
        f"{where}: id '{record['id']}' does not match record {len(scores) + 1} "
        f"('{item.id}' at {item.where})"
      )
    scores.append(
      (_number(record["chosen"], "chosen", where), _number(record["rejected"], "rejected", where))
    )
  if len(scores) != len(items):
    raise UserError(f"{path}: {len(scores)} score lines but {data_path} has {len(items)} records")
  return scores


def _pct(value) -> str:
  return "   -  " if value is None else f"{100 * value:6.2f}"


def format_table(name: str, rep: dict) -> str:
  """A readable table of a report (percentages)."""
  lines = [f"{name}  (n = {rep['n']})"]
  if name == "vl_rewardbench":
    rows = [(k, None, rep[k]) for k in ("overall", "macro", *VL_REWARDBENCH_CATEGORIES)]
    lines += [f"  {k:<24} {_pct(v)}" for k, _, v in rows]
  elif name == "multimodal_rewardbench":
    lines.append(f"  {'category':<36} {'n':>6} {'acc%':>7}")
    for c, v in rep["categories"].items():
      lines.append(f"  {c:<36} {v['n']:>6} {_pct(v['accuracy']):>7}")
    lines.append(f"  {'overall':<36} {rep['n']:>6} {_pct(rep['overall']):>7}")
    n_ns = sum(v["n"] for c, v in rep["categories"].items() if not c.startswith("safety"))
    lines.append(
      f"  {'overall without safety':<36} {n_ns:>6} {_pct(rep['overall_without_safety']):>7}"
    )
  elif name == "mm_rlhf_rewardbench":
    lines.append(f"  {'category':<12} {'n':>6} {'acc%':>7} {'acc+%':>7}")
    for c, v in rep["categories"].items():
      lines.append(f"  {c:<12} {v['n']:>6} {_pct(v['acc']):>7} {_pct(v['acc_plus']):>7}")
    lines.append(
      f"  {'overall':<12} {rep['n']:>6} {_pct(rep['acc']):>7} {_pct(rep['acc_plus']):>7}"
    )
  else:
    lines.append(f"  {'accuracy':<24} {_pct(rep['accuracy'])}")
  if rep.get("skipped"):
    skipped = rep["skipped"]
    per = ", ".join(f"{c} {k}" for c, k in skipped["categories"].items())
    lines.append(f"  skipped (missing images): {skipped['n']} items ({per})")
  return "\n".join(lines)
