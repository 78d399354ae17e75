"""Debiased preference construction from judged candidate sets (DESIGN §3.2b, §7.3-7.6).

Per response, its score is the mean of its valid listwise (and pointwise) scores, each
judgment's scores mapped back through `order` to stored indices. Every unordered pair of
responses with differing text becomes a pair unless the judgments disagree on its
direction (an unreliable signal: the judge flipped with the presentation order), its mean
gap is below `min_gap`, or no valid judgment saw both. Chosen = higher mean; strength = gap.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from pathlib import Path

from mrm_jax.data import records
from mrm_jax.data.records import REWARD_SYSTEM_PROMPT
from mrm_jax.errors import UserError, at
from mrm_jax.io import read_json_or_jsonl
from mrm_jax.judge.jobs import candidate_fields
from mrm_jax.judge.parse import reparse

SCORING_MODES = ("listwise", "pointwise")


@dataclasses.dataclass
class Stats:
  candidates: int = 0
  judgments: int = 0
  valid: int = 0
  invalid: int = 0
  ignored_mode: int = 0
  unknown_id: int = 0
  pairs: int = 0
  identical_text: int = 0
  not_covered: int = 0
  disagreement: int = 0
  small_gap: int = 0

  def report(self) -> dict:
    return {
      "n_candidates": self.candidates,
      "n_pairs": self.pairs,
      "judgments": {
        "n": self.judgments,
        "valid": self.valid,
        "invalid": self.invalid,
        "ignored_mode": self.ignored_mode,
        "unknown_id": self.unknown_id,
      },
      "dropped": {
        "identical_text": self.identical_text,
        "not_covered": self.not_covered,
        "disagreement": self.disagreement,
        "small_gap": self.small_gap,
      },
    }


def read_candidates(path: str | os.PathLike) -> list[dict]:
  """Candidate sets (DESIGN §3.2), checked; ids must be unique."""
  out, seen = [], {}
  for lineno, record in read_json_or_jsonl(path):
    where = at(path, lineno)
    c = candidate_fields(record, where)
    if c["id"] in seen:
      raise UserError(f"{where}: duplicate id '{c['id']}' (first at line {seen[c['id']]})")
    seen[c["id"]] = lineno
    c["where"] = where
    out.append(c)
  return out


def read_judgments(path: str | os.PathLike) -> list[dict]:
  """Judgment records with `where` attached (`records.read_judgments`); `order` is checked in
  `construct`."""
  return records.read_judgments(path)


def is_valid(judgment: dict) -> bool:
  """DESIGN §3.2b: `scores` is a list of numbers as long as `order`."""
  scores, order = judgment.get("scores"), judgment.get("order")
  return (
    isinstance(scores, list)
    and isinstance(order, list)
    and len(scores) == len(order)
    and all(records.is_finite_number(s) for s in scores)
  )


def _check_order(judgment: dict, n: int) -> list[int]:
  where = judgment.get("where", "judgment")
  order = judgment.get("order")
  if (
    not isinstance(order, list)
    or not all(isinstance(i, int) and not isinstance(i, bool) for i in order)
    or len(set(order)) != len(order)
    or not all(0 <= i < n for i in order)
  ):
    raise UserError(
      f"{where}: 'order' must list distinct response indices in 0..{n - 1}, got {order!r:.60}"
    )
  return order


def construct(
  candidates: list[dict], judgments: list[dict], min_gap: float = 0.5, reparse_raw: bool = False
) -> tuple[list[dict], Stats]:
  """Canonical pairs, in candidate order and (i, j) order within a candidate set."""
  stats = Stats(candidates=len(candidates))
  by_id = {c["id"]: c for c in candidates}
  per_item: dict[str, list[dict[int, float]]] = collections.defaultdict(list)
  for j in judgments:
    stats.judgments += 1
    if j.get("mode") not in SCORING_MODES:
      stats.ignored_mode += 1
      continue
    cand = by_id.get(str(j.get("id")))
    if cand is None:
      stats.unknown_id += 1
      continue
    order = _check_order(j, len(cand["responses"]))
    if reparse_raw:
      j = reparse(j)
    if not is_valid(j):
      stats.invalid += 1
      continue
    stats.valid += 1
    per_item[cand["id"]].append({i: float(s) for i, s in zip(order, j["scores"])})

  pairs = []
  for cand in candidates:
    seen = per_item.get(cand["id"], [])
    responses = cand["responses"]
    n = len(responses)
    sums, counts = [0.0] * n, [0] * n
    for scores in seen:
      for i, s in scores.items():
        sums[i] += s
        counts[i] += 1
    means = [sums[i] / counts[i] if counts[i] else None for i in range(n)]
    for i in range(n):
      for j in range(i + 1, n):
        if responses[i] == responses[j]:
          stats.identical_text += 1
          continue
        covering = [s for s in seen if i in s and j in s]
        if not covering:
          stats.not_covered += 1
          continue
        prefers = {("i" if s[i] > s[j] else "j") for s in covering if s[i] != s[j]}
        if len(prefers) > 1:
          stats.disagreement += 1
          continue
        gap = means[i] - means[j]
        if not math.isfinite(
          gap
        ):  # finite scores whose sums overflow: the strength would be Infinity
          raise UserError(
            f"{cand['where']}: the judgments' scores of responses {i} and {j} are too large "
            f"to average (the mean gap is {gap})"
          )
        if abs(gap) < min_gap or gap == 0:
          stats.small_gap += 1
          continue
        c, r = (i, j) if gap > 0 else (j, i)
        pairs.append(_pair(cand, i, j, c, r, abs(gap), means, len(covering)))
  stats.pairs = len(pairs)
  return pairs, stats


def _pair(
  cand: dict, i: int, j: int, c: int, r: int, strength: float, means: list, n_covering: int
) -> dict:
  meta = {
    "candidate_id": cand["id"],
    "chosen_index": c,
    "rejected_index": r,
    "chosen_mean": means[c],
    "rejected_mean": means[r],
    "n_judgments": n_covering,
  }
  if cand.get("models"):
    meta["chosen_model"], meta["rejected_model"] = cand["models"][c], cand["models"][r]
  return {
    "id": f"{cand['id']}:{i}-{j}",
    "images": list(cand["images"]),
    "system": REWARD_SYSTEM_PROMPT,
    "question": cand["question"],
    "chosen": cand["responses"][c],
    "rejected": cand["responses"][r],
    "strength": strength,
    "source": "construct",
    "meta": meta,
  }


def construct_files(
  candidates_path: str | Path,
  judgments_path: str | Path,
  min_gap: float = 0.5,
  reparse_raw: bool = False,
) -> tuple[list[dict], Stats]:
  return construct(
    read_candidates(candidates_path), read_judgments(judgments_path), min_gap, reparse_raw
  )
