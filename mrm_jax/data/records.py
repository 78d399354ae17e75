"""The record formats of DESIGN §3.2 and the conversions between them.

Canonical preference pair:
  {"id", "images", "system"?, "question", "chosen", "rejected", "strength"?, "source"?, "meta"?}
Scoring record:
  {"id", "images", "question", "answer", "system"?}
LLaMA-Factory sharegpt preference record:
  {"conversations": [{"from": "human", "value": ...}], "chosen": {"from": "gpt", "value": ...},
   "rejected": {...}, "images": [...], "system"?: ...}
Judgment (DESIGN §3.2):
  {"id", "mode", "order", "raw", "scores", "error", "judge"}

Validation lives here, one function per record type: every field any step reads is type-checked
when the record is read, so a wrong type is a UserError naming file:line (training counts it as a
skipped record) instead of a traceback deep inside a later step. Conventions: `id` is a string or
an integer and is normalised to a string (a missing id is ""); optional fields may be absent or
null; numbers that are used as floats (`strength`, scores) must be finite.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from mrm_jax.errors import UserError, at
from mrm_jax.io import iter_jsonl, json_type, read_json_or_jsonl

IMAGE_PLACEHOLDER = "<image>"
# LLaMA-Factory records keep the canonical fields it has no column for here (see to_llamafactory)
SIDE_FIELD = "mrm_jax"
# canonical fields with a LLaMA-Factory column (or dropped on purpose: an empty id)
_PREPENDED = "images_prepended"  # in SIDE_FIELD: how many `<image>` llamafactory_record put first
_LF_COLUMNS = ("id", "images", "question", "chosen", "rejected", "system", "meta", "videos")
VIDEO_PLACEHOLDER = "<video>"

# The reward-model system prompt attached to constructed pairs (DESIGN §7.6, §8).
REWARD_SYSTEM_PROMPT = (
  "You are a helpful assistant. Given an image (or images) and a question, answer accurately, "
  "faithfully to what the image shows, and helpfully."
)


_KINDS = {
  str: "a string",
  list: "a list",
  dict: "an object",
  bytes: "bytes",
  int: "an integer",
  float: "a number",
}


def describe_types(types) -> str:
  """'a string or an integer' for (str, int): what a field should be, in error messages."""
  types = types if isinstance(types, tuple) else (types,)
  return " or ".join(dict.fromkeys(_KINDS.get(t, t.__name__) for t in types))


def _require(record: dict, key: str, types, where: str):
  if key not in record or record[key] is None:
    raise UserError(f"{where}: missing field '{key}'")
  value = record[key]
  if not isinstance(value, types) or isinstance(value, bool):
    raise UserError(
      f"{where}: field '{key}' should be {describe_types(types)}, got {json_type(value)}"
    )
  return value


def _optional(record: dict, key: str, types, where: str):
  """The field's value when present and not null (then of `types`), else None."""
  return None if record.get(key) is None else _require(record, key, types, where)


def is_finite_number(value) -> bool:
  """A JSON number usable as a float: not true/false, NaN or infinite, nor an integer beyond float
  range."""
  return (
    isinstance(value, (int, float))
    and not isinstance(value, bool)
    and abs(value) <= sys.float_info.max
  )


def record_id(record: dict, where: str) -> str:
  """The record's `id` as a string: a string or an integer; absent or null gives ""."""
  value = record.get("id")
  if value is None:
    return ""
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise UserError(
      f"{where}: field 'id' should be a string (or an integer), got {json_type(value)}"
    )
  return str(value)


def _images(record: dict, where: str) -> list[str]:
  images = record.get("images")
  if images is None:
    single = record.get("image") or record.get("image_path")
    images = [] if single is None else [single]
  if isinstance(images, str):
    images = [images]
  if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
    raise UserError(f"{where}: field 'images' should be a list of paths")
  return list(images)


def _check_videos(record: dict, where: str) -> None:
  """`videos`: a list whose items are a frame folder (a path) or a list of frame paths."""
  videos = record.get("videos")
  if videos is None:
    return
  if not isinstance(videos, list) or not all(
    isinstance(v, str) or (isinstance(v, list) and all(isinstance(f, str) for f in v))
    for v in videos
  ):
    raise UserError(
      f"{where}: field 'videos' should be a list of frame folders or of lists of frame paths"
    )


def _check_common(record: dict, where: str) -> None:
  """The optional fields scoring records and pairs share."""
  _optional(record, "system", str, where)
  _check_videos(record, where)


def is_llamafactory(record: dict) -> bool:
  return "conversations" in record


def _turn(value, name: str, where: str) -> str:
  """A sharegpt turn {"from": str, "value": str} → its value."""
  if (
    not isinstance(value, dict)
    or not isinstance(value.get("value"), str)
    or not isinstance(value.get("from", ""), str)
  ):
    raise UserError(
      f"{where}: '{name}' should be an object with a string 'value' (and 'from'), "
      f"got {json_type(value)}" + (f" {value!r:.60}" if isinstance(value, dict) else "")
    )
  return value["value"]


def from_llamafactory(record: dict, where: str = "record") -> dict:
  """LLaMA-Factory sharegpt preference record → canonical pair (extra keys kept in meta)."""
  conv = _require(record, "conversations", list, where)
  for k, turn in enumerate(conv):
    _turn(turn, f"conversations[{k}]", where)
  if not conv or conv[-1].get("from") != "human":
    raise UserError(f"{where}: 'conversations' must end with a human turn")
  if len(conv) != 1:
    raise UserError(f"{where}: multi-turn conversations are not supported (got {len(conv)} turns)")
  pair = {
    "id": record_id(record, where),
    "images": _images(record, where),
    "question": conv[-1]["value"],
    "chosen": _turn(record.get("chosen"), "chosen", where),
    "rejected": _turn(record.get("rejected"), "rejected", where),
  }
  side = _side_fields(record, where)
  system = _optional(record, "system", str, where)
  if system or (system == "" and side.get("system") == ""):  # "" is how LLaMA-Factory says "none"
    pair["system"] = system
  side.pop("system", None)
  prepended = side.pop(_PREPENDED, 0)
  if (
    isinstance(prepended, int)
    and prepended > 0
    and pair["question"].startswith(IMAGE_PLACEHOLDER * prepended)
  ):
    pair["question"] = pair["question"][len(IMAGE_PLACEHOLDER) * prepended :]
  known = {"id", "images", "videos", "conversations", "chosen", "rejected", "system", SIDE_FIELD}
  extra = {k: v for k, v in record.items() if k not in known}
  has_meta = "meta" in side
  meta = side.pop("meta", None)
  if extra:
    meta, has_meta = {**(meta or {}), "llamafactory": extra}, True
  if _optional(record, "videos", list, where) is not None:
    _check_videos(record, where)
    pair["videos"] = list(record["videos"])
  pair.update(side)
  if has_meta:
    pair["meta"] = meta
  _check_pair_extras(pair, where)
  return pair


def _side_fields(record: dict, where: str) -> dict:
  """The canonical fields `to_llamafactory` kept in SIDE_FIELD (a JSON text)."""
  text = record.get(SIDE_FIELD)
  if text is None:
    return {}
  try:
    side = json.loads(text) if isinstance(text, str) else None
  except json.JSONDecodeError:
    side = None
  if not isinstance(side, dict):
    raise UserError(f"{where}: field '{SIDE_FIELD}' should be the JSON text of an object")
  return side


def to_llamafactory(pair: dict) -> dict:
  """Canonical pair → LLaMA-Factory record; exact inverse of from_llamafactory for its output.

  `system` is always written ("" when the pair has none), so a dataset_info.json mapping it works
  on any file. The canonical fields LLaMA-Factory has no column for (strength, source, meta, ...)
  travel as the JSON text of an object in SIDE_FIELD: one string column, which LLaMA-Factory
  loads and drops whatever the records hold, where nested objects of differing shapes could
  break its Arrow schema inference."""
  out: dict = {}
  meta = dict(pair.get("meta") or {})
  extra = meta.pop("llamafactory", {}) if isinstance(meta.get("llamafactory"), dict) else {}
  if pair.get("id"):
    out["id"] = pair["id"]
  out["conversations"] = [{"from": "human", "value": pair["question"]}]
  out["chosen"] = {"from": "gpt", "value": pair["chosen"]}
  out["rejected"] = {"from": "gpt", "value": pair["rejected"]}
  out["images"] = list(pair.get("images", []))
  if pair.get("videos"):
    out["videos"] = list(pair["videos"])
  out["system"] = pair.get("system") or ""
  side = {k: v for k, v in pair.items() if k not in _LF_COLUMNS}
  if "meta" in pair and (meta or not extra):  # what from_llamafactory cannot rebuild from extras
    side["meta"] = meta if pair["meta"] is not None else None
  if pair.get("system") == "":
    side["system"] = ""
  if side:
    out[SIDE_FIELD] = json.dumps(side, ensure_ascii=False, sort_keys=True)
  out.update(extra)
  return out


def llamafactory_record(pair: dict) -> dict:
  """A canonical pair as LLaMA-Factory expects it: one `<image>` per image in the prompt.

  Records that already carry placeholders (everything LLaMA-Factory itself wrote) are left
  exactly as `to_llamafactory` makes them, so LLaMA-Factory → canonical → LLaMA-Factory is the
  identity; prompts without any (native datasets) get them prepended, as images go first, and
  SIDE_FIELD notes it so that reading the record back gives the pair's own question.
  """
  rec = to_llamafactory(pair)
  n = len(rec.get("images") or [])
  question = rec["conversations"][0]["value"]
  if n and IMAGE_PLACEHOLDER not in question:
    rec["conversations"][0]["value"] = IMAGE_PLACEHOLDER * n + question
    side = json.loads(rec.get(SIDE_FIELD, "{}"))
    side[_PREPENDED] = n
    rec[SIDE_FIELD] = json.dumps(side, ensure_ascii=False, sort_keys=True)
  return rec


def normalize_pair(record: dict, where: str = "record") -> dict:
  """Any accepted pair record (canonical or LLaMA-Factory) → canonical pair, validated."""
  if is_llamafactory(record):
    return from_llamafactory(record, where)
  pair = dict(record)
  pair["images"] = _images(record, where)
  pair.pop("image", None)
  pair.pop("image_path", None)
  for key in ("question", "chosen", "rejected"):
    _require(pair, key, str, where)
  pair["id"] = record_id(record, where)
  _check_common(record, where)
  _check_pair_extras(record, where)
  return pair


def _check_pair_extras(record: dict, where: str) -> None:
  _optional(record, "meta", dict, where)
  _optional(record, "source", str, where)
  strength = record.get("strength")
  if strength is not None and not is_finite_number(strength):
    raise UserError(f"{where}: field 'strength' should be a finite number, got {strength!r:.40}")


def read_pairs(path: str | os.PathLike) -> list[dict]:
  """Reads a pair file (canonical JSONL, LLaMA-Factory JSON list or JSONL)."""
  return [normalize_pair(r, at(path, n)) for n, r in read_json_or_jsonl(path)]


def iter_pairs(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
  for n, r in read_json_or_jsonl(path):
    yield n, normalize_pair(r, at(path, n))


def normalize_scoring(record: dict, where: str = "record") -> dict:
  rec = dict(record)
  rec["images"] = _images(record, where)
  rec.pop("image", None)
  rec.pop("image_path", None)
  _require(rec, "question", str, where)
  _require(rec, "answer", str, where)
  _check_common(record, where)
  if record.get("id") is not None:
    rec["id"] = record_id(record, where)
  return rec


def check_judgment(record: dict, where: str) -> dict:
  """A judgment record (DESIGN §3.2) → a copy with `id` as a string and `where` added, the types of
  the fields the steps read checked: `id` (string or integer), `mode`, `raw` and `error` (strings or
  null). Whether `order` and `scores` make a valid judgment is each step's call (an invalid judgment
  is counted, not an error), so they are not checked here."""
  if record.get("id") is None:
    raise UserError(f"{where}: missing field 'id' (judgments are matched to items by id)")
  out = dict(record)
  out["id"] = record_id(record, where)
  for key in ("mode", "raw", "error"):
    _optional(record, key, str, where)
  out["where"] = where
  return out


def read_judgments(path: str | os.PathLike) -> list[dict]:
  """A judgment file (JSON Lines), each record checked by `check_judgment`, with its file:line."""
  return [check_judgment(r, at(path, n)) for n, r in iter_jsonl(path)]


def pair_to_scoring(pair: dict) -> tuple[dict, dict]:
  """A pair → (chosen, rejected) scoring records sharing the prompt."""
  base = {k: pair[k] for k in ("images", "question") if k in pair}
  if pair.get("system") is not None:
    base["system"] = pair["system"]
  pid = pair.get("id", "")
  return (
    {"id": f"{pid}:chosen", **base, "answer": pair["chosen"]},
    {"id": f"{pid}:rejected", **base, "answer": pair["rejected"]},
  )


def clean_question(question: str) -> str:
  """The question as curation keys it: `<image>` placeholders removed, whitespace stripped."""
  return question.replace(IMAGE_PLACEHOLDER, "").strip()


def score_key(images: list[str] | str | None, question: str, answer: str) -> tuple:
  """The key curation score files are matched on (DESIGN §3.2)."""
  if images is None:
    images = []
  if isinstance(images, str):
    images = [images]
  return (tuple(images), clean_question(question), answer)


def resolve_image(path: str, root: str | os.PathLike, where: str = "record") -> Path:
  """An image path relative to `root`, refusing anything that escapes it (`../`, absolute
  elsewhere)."""
  root = Path(root).resolve()
  full = (root / path).resolve()
  if full != root and root not in full.parents:
    raise UserError(f"{where}: image '{path}' is outside the image root {root}")
  return full


def _is_local_relative(path: str) -> bool:
  return not os.path.isabs(path) and "://" not in path


def rebase_images(pairs: list[dict], source_root, output, keep=frozenset()) -> list[dict]:
  """`pairs` whose relative image (and video frame) paths, relative to `source_root`, are made
  relative to the folder of `output` instead, the folder LLaMA-Factory (its dataset_dir) and our
  commands resolve them from. Paths in `keep` (already relative to the output, such as extracted
  images) and absolute paths or URLs stay as they are. An image outside the output's folder is a
  UserError: it would need a `../` path, which image roots refuse."""
  src, dst = Path(source_root).resolve(), Path(output).resolve().parent
  if src == dst:
    return pairs

  def rebase(path):
    if path in keep or not _is_local_relative(path):
      return path
    full = os.path.normpath(src / path)
    rel = os.path.relpath(full, dst)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
      raise UserError(
        f"{output}: image '{path}' (in {src}) lies outside the output's folder "
        f"{dst}, and records refer to images relative to their file's folder; write "
        f"the output into a folder that holds its images, such as {src}"
      )
    return rel.replace(os.sep, "/")

  out = []
  for pair in pairs:
    pair = dict(pair)
    if pair.get("images"):
      pair["images"] = [rebase(p) for p in pair["images"]]
    if pair.get("videos"):
      pair["videos"] = [
        rebase(v) if isinstance(v, str) else [rebase(f) for f in v] for v in pair["videos"]
      ]
    out.append(pair)
  return out
