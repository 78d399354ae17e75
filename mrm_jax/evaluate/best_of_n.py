"""Best-of-n selection: the highest-reward response of each candidate set (inference-time scaling,
DESIGN §10; the `mrm-jax best-of-n` command).

Input: candidate records `{"id", "images", "question", "responses": [str, ...], "system"?, ...}`.
Output: each record unchanged plus `"scores"` (one reward per response, in order), `"best"`
(the index of the highest reward; the first one on a tie) and `"best_response"`.

    mrm-jax best-of-n --model MODEL_DIR --input CANDIDATES.jsonl --output OUT.jsonl
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

from mrm_jax.data import records
from mrm_jax.errors import UserError, at
from mrm_jax.io import iter_jsonl

log = logging.getLogger(__name__)

MAX_NAMED_MISSING = 5


def read_candidates(path: str | os.PathLike) -> list[tuple[str, dict]]:
  """(file:line, candidate record) with `images` normalised; a record without a non-empty list of
  string responses is a UserError naming its line."""
  out = []
  for n, rec in iter_jsonl(path):
    where = at(path, n)
    responses = rec.get("responses")
    if (
      not isinstance(responses, list)
      or not responses
      or not all(isinstance(r, str) for r in responses)
    ):
      raise UserError(f"{where}: 'responses' should be a non-empty list of strings")
    if not isinstance(rec.get("question"), str):
      raise UserError(f"{where}: missing field 'question'")
    rec = records.normalize_scoring({**rec, "answer": ""}, where)
    del rec["answer"]
    out.append((where, rec))
  return out


def candidate_records(cand: dict) -> list[dict]:
  """One scoring record per response. The reward-model system prompt is used unless the record
  brings its own `system`."""
  base = {
    "images": cand["images"],
    "question": cand["question"],
    "system": cand.get("system") or records.REWARD_SYSTEM_PROMPT,
  }
  cid = cand.get("id", "")
  return [{"id": f"{cid}:{k}", **base, "answer": r} for k, r in enumerate(cand["responses"])]


def select(cands: Sequence[dict], score_fn: Callable[[list[dict]], Sequence[float]]) -> list[dict]:
  """Scores every response (one `score_fn` call over all of them, so it can batch) and picks the
  best per candidate set."""
  recs = [r for c in cands for r in candidate_records(c)]
  scores = [float(s) for s in score_fn(recs)]
  if len(scores) != len(recs):
    raise RuntimeError(f"scorer returned {len(scores)} scores for {len(recs)} records")
  out, pos = [], 0
  for c in cands:
    s = scores[pos : pos + len(c["responses"])]
    pos += len(s)
    best = max(range(len(s)), key=lambda k: (s[k], -k))  # the first of equal maxima
    out.append({**c, "scores": s, "best": best, "best_response": c["responses"][best]})
  return out


def check_images(cands: Sequence[tuple[str, dict]], image_root) -> None:
  missing = [
    f"{where}: {p}"
    for where, c in cands
    for p in c["images"]
    if not records.resolve_image(p, image_root, where).is_file()
  ]
  if missing:
    named = "; ".join(missing[:MAX_NAMED_MISSING])
    more = (
      f" (and {len(missing) - MAX_NAMED_MISSING} more)" if len(missing) > MAX_NAMED_MISSING else ""
    )
    raise UserError(f"{len(missing)} image files missing under {image_root}: {named}{more}")
