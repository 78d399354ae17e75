"""What a successful run may print on stderr: the project's own stage lines (`[world] ...`) and its
INFO log lines (`HH:MM:SS I mrm_jax.x] ...`). Anything else (a third-party notice, a warning, a
traceback, a TF C++ line) is something a user would have to wonder about.

    python tests/quiet_output.py STDERR_FILE     # exit 1 and print the offending lines, if any
"""

from __future__ import annotations

import re
import sys

ALLOWED = (
  re.compile(r"^\[[\w .:/()-]+\] "),  # the project's stage lines
  re.compile(r"^\d\d:\d\d:\d\d I mrm_jax[\w.]*\] "),  # the project's INFO log lines
)


def unexpected_lines(text: str) -> list[str]:
  return [
    line for line in text.splitlines() if line.strip() and not any(p.match(line) for p in ALLOWED)
  ]


def main(path: str) -> int:
  with open(path, encoding="utf-8", errors="replace") as f:
    bad = unexpected_lines(f.read())
  for line in bad:
    print(f"unexpected stderr line: {line}", file=sys.stderr)
  if bad:
    print(f"{path}: {len(bad)} stderr line(s) a user would have to wonder about", file=sys.stderr)
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1]))
