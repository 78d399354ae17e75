"""File I/O shared by every stage: JSON Lines with file:line errors, atomic writes,
and append-only logs that survive a kill (resumable stages)."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mrm_jax.errors import UserError, at

log = logging.getLogger(__name__)

try:
  import fcntl
except ImportError:  # not POSIX: no locks, so stale temporary files are never removed
  fcntl = None


# -- reading JSON ----------------------------------------------------------------------------------
#
# Every JSON and JSON Lines input goes through one decoder. It refuses what `json.loads` would let
# in but no later step can use: NaN / Infinity (not JSON, and they poison every mean and
# comparison), numbers that overflow a float (1e999 would become inf), integers too long to convert,
# nesting deep enough to exhaust the stack, and bytes that are not UTF-8. Each becomes a one-line
# error naming file:line.


class BadJSON(ValueError):
  """Text that is not a JSON value this project reads; `line` is its 1-based text line when
  known."""

  def __init__(self, message: str, line: int | None = None):
    super().__init__(message)
    self.line = line


class _Refused(ValueError):
  """Raised from the decoder's hooks (JSON that parses but is refused)."""


def _refuse_constant(name: str):
  raise _Refused(f"{name} is not a JSON number (write a finite number, or null)")


def _finite_float(text: str) -> float:
  value = float(text)
  if math.isinf(value):
    raise _Refused(f"the number {text[:40]} is too large for a float")
  return value


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_BOM = b"\xef\xbb\xbf"


def _parse(text: str, pos: int | None = None):
  """`text` as one JSON value (pos None), or (value, end) of the value that starts at `pos`."""
  try:
    return _DECODER.decode(text) if pos is None else _DECODER.raw_decode(text, pos)
  except json.JSONDecodeError as e:
    raise BadJSON(f"malformed JSON ({e.msg} at column {e.colno})", e.lineno) from None
  except _Refused as e:
    raise BadJSON(str(e)) from None
  except RecursionError:
    raise BadJSON("JSON nested too deeply") from None
  except ValueError:  # int() refuses more than sys.get_int_max_str_digits() digits
    raise BadJSON("an integer with too many digits") from None


def _utf8(data: bytes) -> str:
  """UTF-8 bytes → text (a leading byte-order mark dropped); BadJSON naming the line of a bad
  byte."""
  if data.startswith(_BOM):
    data = data[len(_BOM) :]
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line_start = data.rfind(b"\n", 0, e.start) + 1
    raise BadJSON(
      f"not valid UTF-8 (byte 0x{data[e.start]:02x} at column {e.start - line_start + 1})",
      data.count(b"\n", 0, e.start) + 1,
    ) from None


def parse_json(data: str | bytes) -> Any:
  """One JSON value from text or UTF-8 bytes, through the project's strict decoder; BadJSON
  otherwise."""
  return _parse(_utf8(data) if isinstance(data, (bytes, bytearray)) else data)


def json_type(value: Any) -> str:
  """The JSON name of a decoded value's type, for error messages ("got array")."""
  return {dict: "object", list: "array", str: "string", bool: "true/false", type(None): "null"}.get(
    type(value), "number"
  )


def _existing(path: str | os.PathLike) -> Path:
  path = Path(path)
  if not path.is_file():
    raise UserError(f"{path}: no such file")
  return path


def scan_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict | None, str | None]]:
  """Every non-blank line of a JSON Lines file: (line, record, None), or (line, None, what is wrong)
  for a line that is not a JSON object the decoder accepts. For readers that skip bad lines."""
  path = _existing(path)
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        record = parse_json(raw)
      except BadJSON as e:
        yield lineno, None, str(e)
        continue
      if not isinstance(record, dict):
        yield lineno, None, f"expected a JSON object, got {json_type(record)}"
        continue
      yield lineno, record, None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
  """Yields (line_number, record) for each non-blank line; a line that is not a JSON object
  (malformed,
  not UTF-8, NaN, ...) is a UserError naming file:line."""
  for lineno, record, error in scan_jsonl(path):
    if error is not None:
      raise UserError(f"{at(path, lineno)}: {error}")
    yield lineno, record


def _iter_json_list(path: Path) -> Iterator[tuple[int, dict]]:
  """The objects of a file holding one JSON list, item by item. As for every record of a JSON list,
  `file:N` in an error means item N (a release may hold its whole list on one line); the text line
  is added where it helps to find the item."""
  try:
    text = _utf8(path.read_bytes())
  except BadJSON as e:
    raise UserError(f"{path}: {e} on text line {e.line}") from None

  def line_of(pos: int) -> int:
    return text.count("\n", 0, pos) + 1

  pos = _WHITESPACE.match(text, _WHITESPACE.match(text).end() + 1).end()  # past "["
  item = 0
  while item or not text.startswith("]", pos):  # "[]" holds no item; after a "," one must follow
    item += 1
    try:
      value, end = _parse(text, pos)
    except BadJSON as e:
      line = e.line or line_of(pos)
      raise UserError(f"{at(path, item)}: {e} (list item {item}, text line {line})") from None
    if not isinstance(value, dict):
      raise UserError(
        f"{at(path, item)}: expected a JSON object, got {json_type(value)} "
        f"(list item {item}, text line {line_of(pos)})"
      )
    yield item, value
    pos = _WHITESPACE.match(text, end).end()
    if text.startswith(",", pos):
      pos = _WHITESPACE.match(text, pos + 1).end()
    elif text.startswith("]", pos):
      break
    else:
      raise UserError(
        f"{path}: malformed JSON list (expected ',' or ']' after item {item}, "
        f"text line {line_of(pos)})"
      )
  if _WHITESPACE.match(text, pos + 1).end() != len(text):
    raise UserError(
      f"{path}: malformed JSON list (extra data after it, text line {line_of(pos + 1)})"
    )


def is_json_list(path: str | os.PathLike) -> bool:
  """Whether a file holds one JSON list (else it is read as JSON Lines)."""
  with open(_existing(path), "rb") as f:
    return f.read(4096).removeprefix(_BOM).lstrip().startswith(b"[")


def read_json_or_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
  """A JSON list of objects (line = 1-based item index) or JSON Lines."""
  path = _existing(path)
  if is_json_list(path):
    yield from _iter_json_list(path)
  else:
    yield from iter_jsonl(path)


def read_json_object(path: str | os.PathLike) -> dict:
  """A file holding one JSON object (a manifest, a truth file); a UserError naming the file (and the
  line, when known) if it is missing, malformed or not an object."""
  path = _existing(path)
  try:
    value = parse_json(path.read_bytes())
  except BadJSON as e:
    raise UserError(f"{at(path, e.line)}: {e}") from None
  if not isinstance(value, dict):
    raise UserError(f"{path}: expected a JSON object, got {json_type(value)}")
  return value


def non_finite_path(value: Any) -> str | None:
  """The key path ('meta.scores[1]') of the first NaN or infinite float inside `value`, if any."""
  stack = [("", value)]
  while stack:
    where, v = stack.pop()
    if isinstance(v, float) and not math.isfinite(v):
      return where or "the value"
    if isinstance(v, dict):
      stack.extend((f"{where}.{k}" if where else str(k), x) for k, x in reversed(list(v.items())))
    elif isinstance(v, (list, tuple)):
      stack.extend((f"{where}[{i}]", x) for i, x in reversed(list(enumerate(v))))
  return None


def dumps(record: Any, indent: int | None = None) -> str:
  """JSON text of `record`. NaN and Infinity are refused (they are not JSON, and this project's own
  reader refuses them): a UserError naming the field, raised before anything is written."""
  try:
    return json.dumps(record, ensure_ascii=False, sort_keys=False, allow_nan=False, indent=indent)
  except ValueError:
    where = non_finite_path(record)
    if where is None:
      raise
    raise UserError(
      f"cannot write '{where}' as JSON: NaN and Infinity are not JSON numbers "
      "(an input number too large, or a model that produced NaN?)"
    ) from None
  except RecursionError:
    raise UserError("cannot write a record nested this deeply as JSON") from None


# -- atomic writes ---------------------------------------------------------------------------------
#
# An output NAME is written to a temporary sibling `.NAME.PID.RANDOM.tmp`, created with mode 0666 so
# the kernel applies the umask (and any default ACL) exactly as for a plain `open()`, then fsynced
# and renamed over NAME. While the temporary file exists its writer holds an exclusive flock on it.
# The lock is what tells a killed run's leftover from a live writer's file: the kernel drops it when
# the writer dies, even by SIGKILL, and a file nobody holds is removed the next time NAME is
# written. Age or PID tests cannot tell these apart (a slow writer leaves an old file; PIDs are
# reused and mean nothing on another host of a shared filesystem; NFSv4 carries flocks across
# hosts).

_staged: contextvars.ContextVar[list | None] = contextvars.ContextVar(
  "mrm_jax_staged_outputs", default=None
)


def _try_lock(fd: int, block: bool) -> bool | None:
  """Exclusive flock on `fd`: True when taken, False when another open file holds it, None when this
  filesystem has no locks (then nothing is ever removed as stale)."""
  if fcntl is None:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    return True
  except BlockingIOError:
    return False
  except OSError:
    return None


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
  """Removes the `.NAME.*.tmp` siblings of `path` that no live writer holds (left by a killed run);
  returns them. Files of this process, symlinks, non-files and files it may not open are left
  alone."""
  path = Path(path)
  prefix = f".{path.name}."
  try:
    names = [n for n in os.listdir(path.parent) if n.startswith(prefix) and n.endswith(".tmp")]
  except OSError:
    return []
  removed = []
  for name in names:
    if name[len(prefix) :].split(".", 1)[0] == str(os.getpid()):
      continue  # another thread's write in progress (NFS emulates flock with per-process locks)
    tmp = path.parent / name
    try:
      fd = os.open(
        tmp,
        os.O_WRONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
      )
    except OSError:
      continue  # gone (renamed by its writer), a symlink, or not ours to open
    try:
      if stat.S_ISREG(os.fstat(fd).st_mode) and _try_lock(fd, block=False):
        os.unlink(tmp)
        removed.append(tmp)
    except OSError:
      pass
    finally:
      os.close(fd)
  return removed


def _create_temp(path: Path) -> tuple[int, Path]:
  """(fd, name) of a new, locked temporary sibling of `path`."""
  flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
  while True:
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
      fd = os.open(tmp, flags, 0o666)
    except FileExistsError:
      continue
    # blocking: a cleaner holds the lock only to unlink; if it took our new file, make another
    _try_lock(fd, block=True)
    if os.fstat(fd).st_nlink:
      return fd, tmp
    os.close(fd)


def _prepare_target(path: Path) -> None:
  """Creates the output's folder, refuses a folder in the output's place, removes stale temp
  files."""
  if not path.parent.is_dir():
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise UserError(f"{path.parent}: cannot create directory ({e.strerror})") from None
  if path.is_dir():
    raise UserError(f"{path}: is a directory, not a file to write")
  remove_stale_temps(path)


def _write_error(e: BaseException, tmp: Path) -> bool:
  """Whether `e` is a failure to write / sync / rename the temporary file (not some other file's
  error
  raised by the caller's code inside the `with`)."""
  if not isinstance(e, OSError) or e.errno is None:
    return False
  return e.filename is None or str(e.filename) == str(tmp)


def _discard(tmp: Path) -> None:
  with contextlib.suppress(OSError):
    os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
  """Makes the renames durable (some filesystems refuse to sync a directory: then they are not
  needed)."""
  with contextlib.suppress(OSError):
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
  """Writes to a temporary file beside `path` and renames it into place on success.

  On any exception the temporary file is removed and `path` is left as it was; a failure to write
  is a UserError naming `path`. The file gets the umask's permissions. Stale temporary files of
  `path` left by a killed run are removed first. Inside `atomic_outputs()` the rename waits for the
  end of that block.
  """
  path = Path(path)
  staged = _staged.get()
  if staged is not None and any(same_file(path, p) for p, _, _ in staged):
    raise UserError(f"{path}: written twice by one command (two outputs name the same file)")
  _prepare_target(path)
  try:
    fd, tmp = _create_temp(path)
  except OSError as e:
    raise UserError(f"{path}: cannot write ({e.strerror})") from None
  try:
    with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
      if staged is not None:
        staged.append((path, tmp, os.dup(f.fileno())))  # the dup keeps the lock until the commit
      else:
        os.replace(tmp, path)
    if staged is None:
      _fsync_dir(path.parent)
  except BaseException as e:
    _discard(tmp)
    if _write_error(e, tmp):
      raise UserError(f"{path}: cannot write ({e.strerror})") from None
    raise


@contextlib.contextmanager
def atomic_outputs():
  """Commits several outputs together: a command with two outputs never leaves one replaced and the
  other not because the second failed.

  Inside the block every atomic write of this thread (`atomic_open`, `write_jsonl`, `write_json`)
  writes and fsyncs its temporary file but renames nothing. When the block ends normally, all are
  renamed, in the order they were written; on an exception all temporary files are removed and every
  output keeps its old bytes. The renames are the only step left after every byte is on disk, but
  they are not one atomic step: a kill in the instant between two renames leaves the earlier outputs
  new and the later ones old (a rerun rewrites both and removes the leftover temporary files), so
  write the file that marks a complete set (a manifest, config.json) last. A nested block joins the
  outer one.
  """
  if _staged.get() is not None:
    yield
    return
  staged: list[tuple[Path, Path, int]] = []
  token = _staged.set(staged)
  ok = False
  try:
    yield
    ok = True
  finally:
    _staged.reset(token)
    if not ok:
      _release(staged, discard=True)
  for k, (path, tmp, _) in enumerate(staged):
    try:
      os.replace(tmp, path)
    except OSError as e:
      _release(staged[k:], discard=True)
      _release(staged[:k], discard=False)
      done = ", ".join(str(p) for p, _, _ in staged[:k])
      raise UserError(
        f"{path}: cannot write ({e.strerror})" + (f"; already replaced: {done}" if done else "")
      ) from None
  for directory in dict.fromkeys(p.parent for p, _, _ in staged):
    _fsync_dir(directory)
  _release(staged, discard=False)


def _release(staged: list[tuple[Path, Path, int]], discard: bool) -> None:
  for _, tmp, fd in staged:
    if discard:
      _discard(tmp)
    with contextlib.suppress(OSError):
      os.close(fd)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
  """Whether two paths name one file: equal once resolved (symlinks, `..`), or, when both exist, the
  same inode (hard links, bind mounts)."""
  if Path(a).resolve() == Path(b).resolve():
    return True
  try:
    return os.path.samefile(a, b)
  except OSError:
    return False


def check_distinct_paths(outputs: dict[str, Any], inputs: dict[str, Any] | None = None) -> None:
  """Refuses an output that is an input or another output of the same command (writing it would
  destroy data: `curate filter --output X --inconsistent X` loses the kept pairs). Keys name the
  options ("--output"); values are a path, a list of paths, or None (option not given). A UserError
  names both options."""

  def named(options: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for option, value in (options or {}).items():
      for p in [] if value is None else value if isinstance(value, (list, tuple)) else [value]:
        out.append((option, str(p)))
    return out

  outs, ins = named(outputs), named(inputs)
  for i, (option, path) in enumerate(outs):
    for other, other_path in outs[:i]:
      if same_file(path, other_path):
        raise UserError(
          f"{option} {path} is the same file as {other} {other_path}: give each output its own path"
        )
    for other, other_path in ins:
      if same_file(path, other_path):
        raise UserError(
          f"{option} {path} is the same file as the input {other} {other_path}: "
          "write the output elsewhere"
        )


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
  """Atomically writes records as JSON Lines; returns the count."""
  n = 0
  with atomic_open(path) as f:
    for r in records:
      f.write(dumps(r) + "\n")
      n += 1
  return n


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
  text = dumps(obj, indent=indent) + "\n"  # refuses NaN / Infinity before anything is written
  with atomic_open(path) as f:
    f.write(text)


def _complete_records(data: bytes) -> tuple[list[dict], list[bytes], int, list[int]]:
  """An append log's complete lines: (records, their raw lines, byte length of the complete lines,
  line numbers of unreadable ones). A torn last line (no newline: the writer was killed mid-line)
  ends them; an unreadable complete line (damaged on disk, edited by hand) is passed over, so the
  records
  after it, work already done, are kept."""
  records, raw_lines, bad, good_end, pos = [], [], [], 0, 0
  for lineno, raw in enumerate(data.splitlines(keepends=True), 1):
    pos += len(raw)
    if not raw.endswith(b"\n"):
      break
    good_end = pos
    if not raw.strip():
      continue
    try:
      record = parse_json(raw)
    except BadJSON:
      record = None
    if not isinstance(record, dict):
      bad.append(lineno)
      continue
    records.append(record)
    raw_lines.append(raw)
  return records, raw_lines, good_end, bad


def read_append_log(path: str | os.PathLike) -> list[dict]:
  """An AppendLog's complete records, read-only (another process may be the one that repairs it)."""
  path = Path(path)
  return _complete_records(path.read_bytes())[0] if path.is_file() else []


class AppendLog:
  """An append-only JSONL file for resumable work: each record is flushed and fsynced
  as soon as it is written, and opening it repairs a torn last line left by a kill (and drops,
  with a warning, complete lines that are not records)."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.records: list[dict] = self._load_and_repair()
    self._f = open(self.path, "a", encoding="utf-8")

  def _load_and_repair(self) -> list[dict]:
    if not self.path.exists():
      return []
    data = self.path.read_bytes()
    records, raw_lines, good_end, bad = _complete_records(data)
    if bad:
      shown = ", ".join(str(n) for n in bad[:5]) + (", ..." if len(bad) > 5 else "")
      log.warning(
        "%s: dropped %d unreadable line(s) (line %s); kept its %d records",
        self.path,
        len(bad),
        shown,
        len(records),
      )
      # Rewritten by hand, not with atomic_open: inside an `atomic_outputs` block that would defer
      # the rename past the appends that follow.
      tmp = self.path.with_name(f".{self.path.name}.repair.tmp")
      with open(tmp, "wb") as f:
        f.writelines(raw_lines)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.path)
    elif good_end != len(data):
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
