"""File I/O shared by every stage: JSON Lines with file:line errors, atomic writes,
and append-only logs that survive a kill (resumable stages)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from mrm_jax.errors import UserError, at


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
  """Yields (line_number, record) for each non-blank line; malformed JSON is a UserError naming file:line."""
  path = Path(path)
  if not path.is_file():
    raise UserError(f"{path}: no such file")
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{at(path, lineno)}: malformed JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(record, dict):
        raise UserError(f"{at(path, lineno)}: expected a JSON object, got {type(record).__name__}")
      yield lineno, record


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  return [r for _, r in iter_jsonl(path)]


def read_json_or_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
  """A JSON list of objects (line = 1-based item index) or JSON Lines."""
  path = Path(path)
  if not path.is_file():
    raise UserError(f"{path}: no such file")
  with open(path, encoding="utf-8") as f:
    head = f.read(4096).lstrip()
  if head.startswith("["):
    try:
      items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
      raise UserError(f"{at(path, e.lineno)}: malformed JSON ({e.msg})") from None
    for i, item in enumerate(items, 1):
      if not isinstance(item, dict):
        raise UserError(f"{path}: item {i} is not a JSON object")
      yield i, item
  else:
    yield from iter_jsonl(path)


def dumps(record: Any) -> str:
  return json.dumps(record, ensure_ascii=False, sort_keys=False)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
  """Writes to a temporary file beside `path` and renames it into place on success.

  On any exception the temporary file is removed and `path` is left as it was.
  """
  path = Path(path)
  if path.parent and not path.parent.exists():
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise UserError(f"{path.parent}: cannot create directory ({e.strerror})") from None
  try:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  except OSError as e:
    raise UserError(f"{path}: cannot write ({e.strerror})") from None
  try:
    with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
  """Atomically writes records as JSON Lines; returns the count."""
  n = 0
  with atomic_open(path) as f:
    for r in records:
      f.write(dumps(r) + "\n")
      n += 1
  return n


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
  with atomic_open(path) as f:
    json.dump(obj, f, ensure_ascii=False, indent=indent)
    f.write("\n")


def _complete_records(data: bytes) -> tuple[list[dict], int]:
  """(records, byte length) of an append log's leading complete lines: a torn or unparsable line
  ends them."""
  records, good_end, pos = [], 0, 0
  for raw in data.splitlines(keepends=True):
    pos += len(raw)
    if not raw.endswith(b"\n"):
      break  # torn last line: dropped
    text = raw.decode("utf-8", errors="replace").strip()
    if text:
      try:
        records.append(json.loads(text))
      except json.JSONDecodeError:
        break
    good_end = pos
  return records, good_end


def read_append_log(path: str | os.PathLike) -> list[dict]:
  """An AppendLog's complete records, read-only (another process may be the one that repairs it)."""
  path = Path(path)
  return _complete_records(path.read_bytes())[0] if path.is_file() else []


class AppendLog:
  """An append-only JSONL file for resumable work: each record is flushed and fsynced
  as soon as it is written, and opening it repairs a torn last line left by a kill."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.records: list[dict] = self._load_and_repair()
    self._f = open(self.path, "a", encoding="utf-8")

  def _load_and_repair(self) -> list[dict]:
    if not self.path.exists():
      return []
    data = self.path.read_bytes()
    records, good_end = _complete_records(data)
    if good_end != len(data):
      with open(self.path, "r+b") as f:
        f.truncate(good_end)
    return records

  def append(self, record: dict) -> None:
    self._f.write(dumps(record) + "\n")
    self._f.flush()
    os.fsync(self._f.fileno())
    self.records.append(record)

  def close(self) -> None:
    self._f.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def check_writable_dir(path: str | os.PathLike) -> Path:
  """Creates `path` if needed and checks it can be written; UserError otherwise."""
  path = Path(path)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test.", delete=True)
    probe.close()
  except OSError as e:
    raise UserError(f"{path}: cannot write to this directory ({e.strerror or e})") from None
  return path
