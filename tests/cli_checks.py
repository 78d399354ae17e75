"""Checks shared by the tests of the commands' error paths."""

from __future__ import annotations


def one_error_line(capsys, *needles) -> str:
  """The one stderr line a failed command printed: no traceback, no temporary file named, every
  needle
  in it."""
  err = capsys.readouterr().err
  assert "Traceback" not in err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  for n in needles:
    assert str(n) in lines[0], lines[0]
  assert ".tmp" not in lines[0]
  return lines[0]
