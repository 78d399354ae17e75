"""`mrm-jax best-of-n`: pick the highest-reward response of each candidate set
(inference-time scaling, DESIGN §10).

Input: candidate records `{"id", "images", "question", "responses": [str, ...], "system"?, ...}`.
Output: each record unchanged plus `"scores"` (one reward per response, in order), `"best"`
(the index of the highest reward; the first one on a tie) and `"best_response"`.

    mrm-jax best-of-n --model MODEL_DIR --input CANDIDATES.jsonl --output OUT.jsonl
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

from mrm_jax.cli_types import positive_int
from mrm_jax.data import records
from mrm_jax.errors import UserError, at
from mrm_jax.io import check_distinct_paths, iter_jsonl, write_jsonl

log = logging.getLogger(__name__)

MAX_NAMED_MISSING = 5


def read_candidates(path: str | os.PathLike) -> list[tuple[str, dict]]:
  """(file:line, candidate record) with `images` normalised; a record without a non-empty list of
  string responses is a UserError naming its line."""
  out = []
  for n, rec in iter_jsonl(path):
    where = at(path, n)
    responses = rec.get("responses")
    if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
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
  base = {"images": cand["images"], "question": cand["question"],
          "system": cand.get("system") or records.REWARD_SYSTEM_PROMPT}
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
    s = scores[pos:pos + len(c["responses"])]
    pos += len(s)
    best = max(range(len(s)), key=lambda k: (s[k], -k))  # the first of equal maxima
    out.append({**c, "scores": s, "best": best, "best_response": c["responses"][best]})
  return out


def check_images(cands: Sequence[tuple[str, dict]], image_root) -> None:
  missing = [f"{where}: {p}" for where, c in cands for p in c["images"]
             if not records.resolve_image(p, image_root, where).is_file()]
  if missing:
    named = "; ".join(missing[:MAX_NAMED_MISSING])
    more = f" (and {len(missing) - MAX_NAMED_MISSING} more)" if len(missing) > MAX_NAMED_MISSING else ""
    raise UserError(f"{len(missing)} image files missing under {image_root}: {named}{more}")


def add_arguments(parser) -> None:
  parser.add_argument("--model", required=True, metavar="DIR", help="reward model (HF-format directory)")
  parser.add_argument("--input", required=True, metavar="CANDIDATES.jsonl",
                      help='candidate sets: {"id", "images", "question", "responses": [...]}')
  parser.add_argument("--output", required=True, metavar="OUT.jsonl",
                      help='each candidate set plus "scores", "best" (index) and "best_response"')
  parser.add_argument("--image-root", metavar="DIR", help="folder image paths are relative to (default: the input's folder)")
  parser.add_argument("--batch-size", type=positive_int, default=8,
                      help="scoring records per batch (default 8)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype (default float32; parameters load in float32)")


def run(args) -> int:
  check_distinct_paths({"--output": args.output}, {"--input": args.input})
  cands = read_candidates(args.input)
  if not cands:
    raise UserError(f"{args.input}: no candidate sets")
  image_root = Path(args.image_root) if args.image_root else Path(args.input).resolve().parent
  check_images(cands, image_root)

  from mrm_jax.evaluate.score_cli import load_model_for_scoring
  from mrm_jax.evaluate.scoring import score_records

  model, processor = load_model_for_scoring(args.model, dtype=args.dtype)
  # record k of the flattened list belongs to the candidate set at `owner[k]`, for error messages
  owner = [where for where, c in cands for _ in c["responses"]]
  out = select([c for _, c in cands],
               lambda recs: score_records(model, processor, recs, image_root, args.batch_size,
                                          where=lambda i: f"{owner[i]} (response {recs[i]['id'].rsplit(':', 1)[-1]})"))
  write_jsonl(args.output, out)
  n_resp = sum(len(c["responses"]) for c in out)
  print(f"best-of-n: scored {n_resp} responses of {len(out)} candidate sets; wrote {args.output}")
  return 0
