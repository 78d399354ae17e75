"""What to ask the judge: items, presentation orders, and the job plan (DESIGN §3.2, §7.1).

A job is one presentation of one item: (item id, repeat index) for listwise and pairwise,
(item id, response index, repeat index) for pointwise. Its order is a pure function of
(seed, id, repeat), so a restarted run plans exactly the same jobs and can tell from the
judgments already written which ones are missing.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import math
import mimetypes
import os
import random
from pathlib import Path

from mrm_jax.data.records import normalize_pair, resolve_image
from mrm_jax.errors import UserError, at
from mrm_jax.io import iter_jsonl, read_json_or_jsonl
from mrm_jax.judge.parse import MODES

REMOTE_PREFIXES = ("http://", "https://", "data:")


@dataclasses.dataclass(frozen=True)
class Item:
  """A candidate set (or a queued pair, responses = [chosen, rejected]) to be judged."""

  id: str
  question: str
  responses: tuple[str, ...]
  images: tuple[str, ...]  # resolved local paths, or URLs passed through unchanged
  reference: str | None = None
  where: str = ""


@dataclasses.dataclass(frozen=True)
class Job:
  item: Item
  repeat: int
  order: tuple[int, ...]

  @property
  def key(self) -> tuple:
    return (self.item.id, tuple(self.order))


def candidate_fields(record: dict, where: str) -> dict:
  """A candidate set (DESIGN §3.2) checked and normalised: {id, images, question, reference,
  responses, models?}."""
  responses = record.get("responses")
  if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
    raise UserError(f"{where}: field 'responses' should be a list of strings")
  question = record.get("question")
  if not isinstance(question, str):
    raise UserError(
      f"{where}: "
      + ("missing field 'question'" if question is None else "field 'question' should be a string")
    )
  images = record.get("images", [])
  if isinstance(images, str):
    images = [images]
  if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
    raise UserError(f"{where}: field 'images' should be a list of paths")
  reference = record.get("reference")
  if reference is not None and not isinstance(reference, str):
    raise UserError(f"{where}: field 'reference' should be a string")
  models = record.get("models")
  if models is not None and (
    not isinstance(models, list)
    or len(models) != len(responses)
    or not all(isinstance(m, str) for m in models)
  ):
    raise UserError(f"{where}: field 'models' should list one model name (a string) per response")
  return {
    "id": _item_id(record, where),
    "images": images,
    "question": question,
    "reference": reference,
    "responses": responses,
    "models": models,
  }


def _item_id(record: dict, where: str) -> str:
  item_id = record.get("id")
  if not isinstance(item_id, (str, int)) or isinstance(item_id, bool) or item_id == "":
    raise UserError(f"{where}: missing field 'id' (judgments are matched to items by id)")
  return str(item_id)


def _item_from_record(record: dict, where: str, image_root: Path) -> Item:
  if "responses" in record:
    c = candidate_fields(record, where)
    question, images, reference, responses = (
      c["question"],
      c["images"],
      c["reference"],
      c["responses"],
    )
  else:  # a preference pair (re-annotation queue): stored responses are [chosen, rejected]
    pair = normalize_pair(record, where)
    question, images, reference = pair["question"], pair["images"], None
    responses = [pair["chosen"], pair["rejected"]]
  item_id = _item_id(record, where)
  resolved = []
  for p in images:
    if p.startswith(REMOTE_PREFIXES):
      resolved.append(p)
      continue
    full = resolve_image(p, image_root, where)
    if not full.is_file():
      raise UserError(f"{where}: image '{p}' not found under {image_root}")
    resolved.append(str(full))
  return Item(item_id, question, tuple(responses), tuple(resolved), reference, where)


def read_items(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[Item]:
  """Reads candidate sets (or pairs) and checks ids are unique and images exist."""
  path = Path(path)
  root = Path(image_root) if image_root is not None else path.parent
  items, seen = [], {}
  for lineno, record in read_json_or_jsonl(path):
    where = at(path, lineno)
    item = _item_from_record(record, where, root)
    if item.id in seen:
      raise UserError(f"{where}: duplicate id '{item.id}' (first at line {seen[item.id]})")
    seen[item.id] = lineno
    items.append(item)
  return items


def _rng(seed: int, item_id: str) -> random.Random:
  digest = hashlib.sha256(f"{seed}\x00{item_id}".encode()).digest()
  return random.Random(int.from_bytes(digest[:8], "big"))


def presentation_orders(
  mode: str, n: int, seed: int, item_id: str, repeats: int
) -> list[tuple[int, ...]]:
  """The orders of stored indices shown to the judge in repeats 0..repeats-1.

  listwise: seeded random permutations that differ from the stored order and, while there
  are unused ones, from each other; pairwise: [0, 1] on even repeats, [1, 0] on odd ones,
  so K = 2 asks both orders. A pure function of (seed, id): repeat r gets the same order
  however many repeats are asked for.
  """
  if mode == "pairwise":
    return [(0, 1) if r % 2 == 0 else (1, 0) for r in range(repeats)]
  identity = tuple(range(n))
  if n < 2:
    return [identity] * repeats
  rng = _rng(seed, item_id)
  n_other = math.factorial(n) - 1 if n <= 8 else None
  orders, used = [], set()
  order = list(identity)
  for _ in range(repeats):
    if n_other is not None and len(used) == n_other:
      used.clear()  # every other order has been shown: start another round
    while tuple(order) == identity or tuple(order) in used:
      rng.shuffle(order)
    orders.append(tuple(order))
    used.add(tuple(order))
  return orders


def presentation_order(mode: str, n: int, seed: int, item_id: str, repeat: int) -> tuple[int, ...]:
  return presentation_orders(mode, n, seed, item_id, repeat + 1)[repeat]


def plan_jobs(
  items: list[Item], mode: str, repeats: int, seed: int
) -> tuple[list[Job], list[Item]]:
  """All jobs of a run, and the items skipped (fewer than two distinct responses)."""
  jobs, skipped = [], []
  for item in items:
    n = len(item.responses)
    if mode == "pairwise" and n != 2:
      raise UserError(f"{item.where}: pairwise judging needs exactly 2 responses, got {n}")
    if mode != "pairwise" and len(set(item.responses)) < 2:
      skipped.append(item)
      continue
    if mode == "pointwise":
      jobs.extend(Job(item, r, (i,)) for r in range(repeats) for i in range(n))
    else:
      orders = presentation_orders(mode, n, seed, item.id, repeats)
      jobs.extend(Job(item, r, order) for r, order in enumerate(orders))
  return jobs, skipped


def missing_jobs(
  jobs: list[Job], done: list[dict], mode: str, retry_failed: bool = False
) -> list[Job]:
  """The jobs not yet covered by the judgments in `done`.

  Judgment records carry no repeat index, so they are matched as a multiset on
  (id, order): two repeats with the same order need two records. Failed judgments count
  as done unless `retry_failed`.
  """
  counts: collections.Counter = collections.Counter()
  for r in done:
    if r.get("mode") != mode or not isinstance(r.get("order"), list):
      continue
    if retry_failed and r.get("scores") is None:
      continue
    counts[(str(r.get("id")), tuple(r["order"]))] += 1
  todo = []
  for job in jobs:
    if counts[job.key] > 0:
      counts[job.key] -= 1
    else:
      todo.append(job)
  return todo


def check_done(path: str | os.PathLike) -> None:
  """Checks the judgments already in `path` (a run being resumed) have the fields resuming reads.

  A torn or unparsable tail is AppendLog's to repair before this runs; a complete line of the
  wrong shape is the user's to fix (a file that is not this command's output, or edited by hand).
  """
  if not Path(path).is_file():
    return
  for lineno, r in iter_jsonl(path):
    problem = _judgment_problem(r)
    if problem:
      raise UserError(f"{at(path, lineno)}: not a judgment record: {problem} (DESIGN §3.2)")


def _judgment_problem(r: dict) -> str | None:
  if not isinstance(r.get("id"), (str, int)) or isinstance(r.get("id"), bool):
    return "field 'id' should be a string"
  if r.get("mode") not in MODES:
    return f"field 'mode' should be one of {', '.join(MODES)}"
  order = r.get("order")
  if not isinstance(order, list) or not all(
    isinstance(i, int) and not isinstance(i, bool) for i in order
  ):
    return "field 'order' should be a list of response indices"
  scores = r.get("scores")
  if scores is not None and (
    not isinstance(scores, list)
    or not all(
      isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in scores
    )
  ):
    return "field 'scores' should be null or a list of finite numbers"
  for key in ("raw", "error", "judge"):
    if r.get(key) is not None and not isinstance(r[key], str):
      return f"field '{key}' should be a string or null"
  return None


def image_url(path: str) -> str:
  """A local image as a base64 data URL (remote URLs pass through)."""
  if path.startswith(REMOTE_PREFIXES):
    return path
  mime = mimetypes.guess_type(path)[0] or "image/png"
  with open(path, "rb") as f:
    data = base64.b64encode(f.read()).decode("ascii")
  return f"data:{mime};base64,{data}"
