"""The pure data steps of iterative curation (DESIGN §3.2b, §9): flip, filter, vote.

Each step is a function from records in memory to records (plus what it left out), so the
resumable loop (`curate run`) and the `curate flip|filter|vote` commands share one
implementation, and the tests can check the exact semantics on hand-computed fixtures.

Score files (one per scorer) are JSONL `{"images" | "image_path", "question", "answer", "score"}`,
matched to pairs on `records.score_key` (images, question without `<image>`, answer).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from fractions import Fraction

from mrm_jax.data.records import is_finite_number, score_key
from mrm_jax.errors import UserError, at
from mrm_jax.io import iter_jsonl

ScoreTable = dict  # score_key → float


def read_score_file(path: str | os.PathLike) -> ScoreTable:
  """score_key → score. A key scored more than once (the same answer in several pairs) gets the
  mean of its scores, so a file written without deduplication still means one score per key."""
  sums: dict[tuple, list] = {}
  for lineno, rec in iter_jsonl(path):
    where = at(path, lineno)
    images = rec.get("images", rec.get("image_path"))
    if images is None:
      images = []
    if isinstance(images, str):
      images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
      raise UserError(f"{where}: 'images' should be a list of paths")
    for key in ("question", "answer"):
      if not isinstance(rec.get(key), str):
        missing = rec.get(key) is None
        problem = f"missing field '{key}'" if missing else f"'{key}' should be a string"
        raise UserError(f"{where}: {problem}")
    score = rec.get("score")
    if not is_finite_number(score):
      raise UserError(f"{where}: 'score' should be a finite number, got {score!r:.40}")
    acc = sums.setdefault(score_key(images, rec["question"], rec["answer"]), [0.0, 0])
    acc[0] += float(score)
    acc[1] += 1
  return {k: total / count for k, (total, count) in sums.items()}


def pair_scores(pair: dict, table: ScoreTable) -> tuple[float, float] | None:
  """(score(chosen), score(rejected)) of a pair from one scorer, or None if either is missing."""
  c = table.get(score_key(pair.get("images"), pair["question"], pair["chosen"]))
  r = table.get(score_key(pair.get("images"), pair["question"], pair["rejected"]))
  return None if c is None or r is None else (c, r)


@dataclasses.dataclass
class Missing:
  """A pair left out for lack of a score: its position in the input and the score files without
  it."""

  index: int
  pair_id: str
  files: list[int]


def _collect(pairs: Sequence[dict], tables: Sequence[ScoreTable]):
  """Per pair: the per-scorer (chosen, rejected) scores, or a Missing entry."""
  scored, missing = [], []
  for i, pair in enumerate(pairs):
    per = [pair_scores(pair, t) for t in tables]
    absent = [k for k, s in enumerate(per) if s is None]
    if absent:
      missing.append(Missing(i, str(pair.get("id", "")), absent))
    else:
      scored.append((i, per))
  return scored, missing


def swap(pair: dict) -> dict:
  return {**pair, "chosen": pair["rejected"], "rejected": pair["chosen"]}


def flip(
  pairs: Sequence[dict], tables: Sequence[ScoreTable], fraction: float = 0.5
) -> tuple[list[dict], list[Missing]]:
  """Curation step 1. strength = mean over scorers of score(chosen) − score(rejected). Among the
  pairs with strength < 0, sorted ascending (stable: ties keep input order), the first
  ⌊fraction · n_negative⌋ get chosen and rejected swapped and `"flipped": true`.

  Returns every scored pair in input order, each with `strength` measured for the labels it is
  written with (a flipped pair's strength is therefore positive), and the pairs left out for a
  missing score.
  """
  if not tables:
    raise UserError("flip needs at least one score file")
  if not 0 <= fraction <= 1:
    raise UserError(f"--flip-fraction must be within [0, 1], got {fraction}")
  scored, missing = _collect(pairs, tables)
  strength = {i: sum(c - r for c, r in per) / len(per) for i, per in scored}
  for i, value in strength.items():
    if not math.isfinite(value):  # finite scores whose difference overflows: not writable as JSON
      raise UserError(
        f"pair {i + 1} (id {pairs[i].get('id')!r}): its scores are too large to "
        f"subtract (strength {value})"
      )
  negative = sorted((i for i, _ in scored if strength[i] < 0), key=lambda i: strength[i])
  n_flip = math.floor(Fraction(repr(float(fraction))) * len(negative))  # exact: 0.29 · 100 = 29
  to_flip = set(negative[:n_flip])
  out = []
  for i, _ in scored:
    if i in to_flip:
      out.append({**swap(pairs[i]), "strength": -strength[i], "flipped": True})
    else:
      out.append({**pairs[i], "strength": strength[i]})
  return out, missing


def filter_consistent(
  pairs: Sequence[dict], tables: Sequence[ScoreTable]
) -> tuple[list[dict], list[dict], list[Missing]]:
  """Curation step 2: (kept, queue, missing). A pair is kept when the mean over scorers of
  score(chosen) is strictly greater than that of score(rejected); the others (ties included)
  go to the re-annotation queue, labelled as they came."""
  if not tables:
    raise UserError("filter needs at least one score file")
  scored, missing = _collect(pairs, tables)
  kept, queue = [], []
  for i, per in scored:
    mean_c = sum(c for c, _ in per) / len(per)
    mean_r = sum(r for _, r in per) / len(per)
    (kept if mean_c > mean_r else queue).append(pairs[i])
  return kept, queue, missing


def judgment_vote(judgment: dict) -> tuple[float, float] | None:
  """(votes for stored response 0 = chosen, votes for 1 = rejected) of one pairwise judgment, or
  None when it is invalid. Valid: `scores` a list of finite numbers as long as `order`, and
  `order` a permutation of [0, 1]. The vote goes to `order[argmax(scores)]`; equal scores give
  half a vote to each side."""
  order, scores = judgment.get("order"), judgment.get("scores")
  if judgment.get("mode", "pairwise") != "pairwise":
    return None
  if not isinstance(order, list) or not isinstance(scores, list) or len(scores) != len(order):
    return None
  if not all(is_finite_number(s) for s in scores):
    return None
  indices = sorted(o for o in order if isinstance(o, int) and not isinstance(o, bool))
  if indices != [0, 1] or len(order) != 2:
    return None
  if scores[0] == scores[1]:
    return 0.5, 0.5
  winner = order[0] if scores[0] > scores[1] else order[1]
  return (1.0, 0.0) if winner == 0 else (0.0, 1.0)


@dataclasses.dataclass
class VoteResult:
  kept: list[dict]
  no_quorum: list[str]  # ids with fewer than min_votes valid judgments
  tied: list[str]  # ids whose votes split evenly
  invalid: int  # invalid judgments (not counted)
  unknown: list[str]  # judgment ids not in the queue


def vote(queue: Sequence[dict], judgments: Sequence[dict], min_votes: int = 2) -> VoteResult:
  """Curation step 3. Each valid pairwise judgment of a queued pair (matched on the pair's `id`;
  stored responses are [chosen, rejected]) is a vote. A pair is kept with at least `min_votes`
  valid judgments and a strict majority, chosen = the majority side (the labels may swap).
  Kept pairs record the tally in `meta.vote`."""
  if min_votes < 1:
    raise UserError(f"--min-votes must be at least 1, got {min_votes}")
  ids = [str(p.get("id", "")) for p in queue]
  check_unique_ids([(f"queued pair {k + 1}", p) for k, p in enumerate(queue)])
  # per pair: votes for chosen, for rejected, valid judgments
  tally: dict[str, list[float]] = {pid: [0.0, 0.0, 0] for pid in ids}
  invalid, unknown = 0, []
  for j in judgments:
    jid = str(j.get("id", ""))
    if jid not in tally:
      unknown.append(jid)
      continue
    v = judgment_vote(j)
    if v is None:
      invalid += 1
      continue
    t = tally[jid]
    t[0] += v[0]
    t[1] += v[1]
    t[2] += 1
  kept, no_quorum, tied = [], [], []
  for pid, pair in zip(ids, queue):
    vc, vr, n = tally[pid]
    if n < min_votes:
      no_quorum.append(pid)
    elif vc == vr:
      tied.append(pid)
    else:
      out = dict(pair) if vc > vr else swap(pair)
      meta = dict(out.get("meta") or {})
      meta["vote"] = {"votes": [max(vc, vr), min(vc, vr)], "judgments": n, "swapped": vr > vc}
      out["meta"] = meta
      kept.append(out)
  return VoteResult(kept, no_quorum, tied, invalid, unknown)


def check_unique_ids(pairs: Sequence[tuple[str, dict]]) -> None:
  """Votes are matched on the pair id, so queued ids must be present and unique."""
  seen: dict[str, str] = {}
  for where, pair in pairs:
    pid = str(pair.get("id", ""))
    if not pid:
      raise UserError(f"{where}: queued pair has no 'id' (judgments are matched on it)")
    if pid in seen:
      raise UserError(f"{where}: duplicate pair id '{pid}' (first at {seen[pid]})")
    seen[pid] = where
