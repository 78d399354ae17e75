"""Robust parsing of judge answers into overall scores (DESIGN §7.2).

Real judges wrap their JSON in code fences and prose, leave trailing commas, write stray
backslashes (LaTeX, Windows paths), use single quotes, or escape the whole object as a
string. `parse_scores` repairs what is unambiguous and refuses the rest: the result is the
list of "Overall Score" numbers in PRESENTATION order, or a one-line reason. A judgment
whose number of "Assistant k" objects differs from the number of responses shown is
invalid: a silently shortened list would shift every score onto the wrong response.

The same function parses live answers (`mrm-jax judge`) and stored raw outputs (the demo
world, re-parsing old judgment files with `reparse`), so both go through one path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

MODES = ("listwise", "pointwise", "pairwise")
SCORE_RANGE = (0.0, 10.0)

_FENCE = re.compile(r"```[ \t]*(?:json|JSON|javascript|js)?[ \t]*\n?(.*?)```", re.S)
_ASSISTANT_KEY = re.compile(r"^assistant\s*#?\s*(\d+)$")
_OVERALL_KEYS = ("overall score", "overall", "overall rating", "overall scores")
_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*10|out of 10|points?)?\s*$", re.I)


@dataclasses.dataclass(frozen=True)
class Parsed:
  """Overall scores in presentation order, or why there are none."""

  scores: list[float] | None
  error: str | None

  @property
  def ok(self) -> bool:
    return self.scores is not None


def parse_scores(raw: str | None, n: int, mode: str = "listwise") -> Parsed:
  """Parses a judge answer that rated `n` responses (pointwise: n == 1)."""
  if mode not in MODES:
    raise ValueError(f"unknown judge mode {mode!r}")
  if not isinstance(raw, str) or not raw.strip():
    return Parsed(None, "empty answer")
  objects = list(_json_objects(raw))
  first_error = None
  for obj in objects:
    scores, error = _extract(obj, n, mode)
    if scores is not None:
      return Parsed(scores, None)
    # Prefer the complaint about an object that looked like an answer over a stray '{...}'.
    if first_error is None or (first_error.startswith("no ") and not error.startswith("no ")):
      first_error = error
  if first_error is not None:
    return Parsed(None, first_error)
  # No JSON object could be recovered (truncated answer, unquoted "8/10", ...): read the
  # scores off the key layout, still requiring exactly one score per assistant.
  scores, error = _extract_by_pattern(raw, n, mode)
  return Parsed(scores, None) if scores is not None else Parsed(None, error)


def reparse(judgment: dict) -> dict:
  """A judgment record with `scores`/`error` recomputed from its `raw` text and `order`.

  A transport failure (no answer at all) keeps its recorded error.
  """
  out = dict(judgment)
  raw = judgment.get("raw")
  order = judgment.get("order") or []
  if not raw and judgment.get("error"):
    out["scores"] = None
    return out
  parsed = parse_scores(raw, len(order), judgment.get("mode", "listwise"))
  out["scores"], out["error"] = parsed.scores, parsed.error
  return out


# ----------------------------------------------------------------------------------------
# Finding the JSON object


def _json_objects(raw: str):
  """Yields every dict recoverable from the answer, most explicit first."""
  texts = []
  text = raw.strip()
  # The whole answer JSON-encoded as a string ("{\"Assistant 1\": ...}").
  if text.startswith('"'):
    try:
      decoded = json.loads(text)
      if isinstance(decoded, str):
        text = decoded
    except json.JSONDecodeError:
      pass
  texts.extend(m.group(1) for m in _FENCE.finditer(text))
  texts.append(text)
  seen = set()
  for t in texts:
    for candidate in _balanced_objects(t):
      if candidate in seen:
        continue
      seen.add(candidate)
      obj = _loads_lenient(candidate)
      if isinstance(obj, dict):
        yield obj


def _balanced_objects(text: str):
  """Substrings from each top-level '{' to its matching '}' (or the end, if truncated)."""
  i = 0
  while True:
    start = text.find("{", i)
    if start < 0:
      return
    depth, in_str, esc, end = 0, None, False, None
    for k in range(start, len(text)):
      c = text[k]
      if in_str:
        if esc:
          esc = False
        elif c == "\\":
          esc = True
        elif c == in_str:
          in_str = None
      elif c == '"':
        in_str = c
      elif c == "{":
        depth += 1
      elif c == "}":
        depth -= 1
        if depth == 0:
          end = k + 1
          break
    if end is None:
      yield text[start:]
      return
    yield text[start:end]
    i = end


def _loads_lenient(text: str):
  unescaped = _unescape_quotes(text)
  for attempt in (text, _repair(text), None if unescaped is None else _repair(unescaped)):
    if attempt is None:
      continue
    try:
      return json.loads(attempt)
    except (json.JSONDecodeError, RecursionError):
      continue
  return None


def _unescape_quotes(text: str) -> str | None:
  """`{\\"Assistant 1\\": ...}`, an object that was escaped once too often."""
  if '\\"' not in text:
    return None
  return text.replace("\\\\", "\\").replace('\\"', '"').replace("\\n", "\n")


_VALID_ESCAPES = set('"\\/bfnrt')
_HEX = set("0123456789abcdefABCDEF")
_OPEN_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u201d": "\u201d"}
_LITERALS = {"True": "true", "False": "false", "None": "null"}


def _repair(text: str) -> str:
  """Rewrites near-JSON into JSON: strings re-quoted with '"' and their escapes fixed
  (stray backslashes doubled, raw newlines escaped), single and curly quotes as string
  delimiters, trailing commas dropped, Python literals translated, truncation closed."""
  out: list[str] = []
  stack: list[str] = []
  i, n = 0, len(text)
  while i < n:
    c = text[i]
    if c in _OPEN_QUOTES:
      close = _OPEN_QUOTES[c]
      j = i + 1
      buf = []
      while j < n and text[j] != close:
        ch = text[j]
        if ch == "\\":
          nxt = text[j + 1] if j + 1 < n else ""
          if (
            nxt == "u"
            and all(x in _HEX for x in text[j + 2 : j + 6])
            and len(text[j + 2 : j + 6]) == 4
          ):
            buf.append(text[j : j + 6])
            j += 6
            continue
          if nxt in _VALID_ESCAPES and nxt:
            buf.append("\\" + nxt)
            j += 2
            continue
          if nxt == "'":
            buf.append("'")
            j += 2
            continue
          buf.append("\\\\")  # stray backslash: keep it literally
          j += 1
          continue
        if ch == '"':
          buf.append('\\"')
        elif ch == "\n":
          buf.append("\\n")
        elif ch == "\r":
          buf.append("\\r")
        elif ch == "\t":
          buf.append("\\t")
        elif ord(ch) < 0x20:
          buf.append(f"\\u{ord(ch):04x}")
        else:
          buf.append(ch)
        j += 1
      out.append('"' + "".join(buf) + '"')
      i = j + 1
      continue
    if c in "{[":
      stack.append("}" if c == "{" else "]")
      out.append(c)
    elif c in "}]":
      _drop_trailing_comma(out)
      if stack:
        stack.pop()
      out.append(c)
    elif c.isalpha():
      j = i
      while j < n and (text[j].isalnum() or text[j] == "_"):
        j += 1
      word = text[i:j]
      out.append(_LITERALS.get(word, word))
      i = j
      continue
    else:
      out.append(c)
    i += 1
  # A missing final brace is closed, but only after a complete value: a number cut off
  # by a token limit ("Overall Score": 1|0) must not be read as a different number.
  if stack and text.rstrip()[-1:] in ("}", "]", ","):
    _drop_trailing_comma(out)
    out.extend(reversed(stack))
  return "".join(out)


def _drop_trailing_comma(out: list[str]) -> None:
  k = len(out) - 1
  while k >= 0 and out[k].isspace():
    k -= 1
  if k >= 0 and out[k] == ",":
    del out[k]


# ----------------------------------------------------------------------------------------
# Reading the scores off the object


def _norm_key(key) -> str:
  return re.sub(r"[^a-z0-9#]+", " ", str(key).lower()).strip()


def _to_number(value) -> float | None:
  if isinstance(value, bool):
    return None
  if isinstance(value, (int, float)):
    x = float(value)
  elif isinstance(value, str):
    m = _NUMBER.match(value)
    if not m:
      return None
    x = float(m.group(1))
  else:
    return None
  return x if math.isfinite(x) else None


def _overall(value) -> tuple[float | None, str | None]:
  """The overall score of one assistant's entry (a number, or an object holding one)."""
  if isinstance(value, dict):
    for key, v in value.items():
      if _norm_key(key) in _OVERALL_KEYS:
        x = _to_number(v)
        if x is None and isinstance(v, dict):  # {"Overall Score": {"Score": 8}}
          x = next((_to_number(w) for k, w in v.items() if _norm_key(k) == "score"), None)
        return (x, None) if x is not None else (None, f"'Overall Score' is not a number: {v!r:.40}")
    return None, "missing 'Overall Score'"
  x = _to_number(value)
  return (x, None) if x is not None else (None, "missing 'Overall Score'")


def _assistants(obj: dict) -> dict[int, object]:
  found: dict[int, object] = {}
  for key, value in obj.items():
    m = _ASSISTANT_KEY.match(_norm_key(key))
    if m:
      found[int(m.group(1))] = value
  return found


def _check_range(scores: list[float]) -> str | None:
  lo, hi = SCORE_RANGE
  bad = [s for s in scores if not lo <= s <= hi]
  return f"score {bad[0]:g} outside {lo:g}-{hi:g}" if bad else None


def _extract(obj: dict, n: int, mode: str) -> tuple[list[float] | None, str | None]:
  if mode == "pointwise":
    for key, value in obj.items():
      if _norm_key(key) in _OVERALL_KEYS:
        x, err = _overall({key: value})
        if x is None:
          return None, err
        err = _check_range([x])
        return (None, err) if err else ([x], None)
  found = _assistants(obj)
  if not found:
    # One wrapper level ({"evaluation": {"Assistant 1": ...}}) is common enough to accept.
    inner = [v for v in obj.values() if isinstance(v, dict) and _assistants(v)]
    if len(inner) == 1:
      found = _assistants(inner[0])
  if not found:
    return None, "no 'Assistant k' objects" if mode != "pointwise" else "missing 'Overall Score'"
  if sorted(found) != list(range(1, n + 1)):
    return (
      None,
      f"wrong score count: expected {n} (Assistant 1..{n}), got {len(found)} (Assistant "
      f"{sorted(found)})",
    )
  scores = []
  for k in range(1, n + 1):
    x, err = _overall(found[k])
    if x is None:
      return None, f"Assistant {k}: {err}"
    scores.append(x)
  err = _check_range(scores)
  return (None, err) if err else (scores, None)


_KEY_POS = re.compile(
  r"[\"'\u201c*]*(Assistant\s*#?\s*(\d+)|Reference\s+Answer)[\"'\u201d*]*\s*[:\-\u2013\u2014]", re.I
)
_OVERALL_POS = re.compile(
  r"[\"'\u201c]?Overall(?:\s+Score)?[\"'\u201d]?\s*:\s*[\"']?\s*(-?\d+(?:\.\d+)?)(?=[^\d.])", re.I
)


def _extract_by_pattern(raw: str, n: int, mode: str) -> tuple[list[float] | None, str | None]:
  keys = list(_KEY_POS.finditer(raw))
  segments: dict[int, list[str]] = {}
  top_level = raw[: keys[0].start()] if keys else raw
  for idx, m in enumerate(keys):
    end = keys[idx + 1].start() if idx + 1 < len(keys) else len(raw)
    if m.group(2) is not None:
      segments.setdefault(int(m.group(2)), []).append(raw[m.end() : end])
  if mode == "pointwise" and not segments:
    found = _OVERALL_POS.findall(top_level) or _OVERALL_POS.findall(
      raw[keys[-1].end() :] if keys else ""
    )
    if len(found) == 1:
      x = float(found[0])
      err = _check_range([x])
      return (None, err) if err else ([x], None)
    return None, "unparsable answer (no JSON object with 'Overall Score')"
  if not segments:
    return None, "unparsable answer (no JSON object, no 'Assistant k' scores)"
  if sorted(segments) != list(range(1, n + 1)) or any(len(v) != 1 for v in segments.values()):
    return None, (
      f"wrong score count: expected {n} (Assistant 1..{n}), got Assistant {sorted(segments)} "
      "(unparsable JSON)"
    )
  scores = []
  for k in range(1, n + 1):
    found = _OVERALL_POS.findall(segments[k][0])
    if len(found) != 1:
      return None, f"Assistant {k}: no unique 'Overall Score' (unparsable JSON)"
    scores.append(float(found[0]))
  err = _check_range(scores)
  return (None, err) if err else (scores, None)
