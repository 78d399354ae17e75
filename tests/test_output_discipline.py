"""Output discipline (issue 15): an output may not be an input or another output of the same
command; several outputs are committed together; a killed run's temporary files are removed by the
next run;
outputs get the umask's permissions; errors name the output, never the temporary file."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_checks import one_error_line

from mrm_jax import io
from mrm_jax.cli import main
from mrm_jax.errors import UserError

PAIRS = [
  {"id": f"p{i}", "images": [], "question": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
  for i in range(4)
]


def _write(path: Path, records) -> Path:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


@pytest.fixture
def pairs_and_scores(tmp_path):
  """Pairs and a score file under which p0, p1 are kept and p2, p3 queued by `curate filter`."""
  pairs = _write(tmp_path / "pairs.jsonl", PAIRS)
  scores = []
  for i, p in enumerate(PAIRS):
    good = 1.0 if i < 2 else -1.0
    scores += [
      {"images": [], "question": p["question"], "answer": p["chosen"], "score": good},
      {"images": [], "question": p["question"], "answer": p["rejected"], "score": 0.0},
    ]
  return pairs, _write(tmp_path / "scores.jsonl", scores)


def _temps(directory: Path) -> list[str]:
  return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# -- same-path refusals ----------------------------------------------------------------------------


def test_filter_refuses_one_file_for_output_and_queue(pairs_and_scores, tmp_path, capsys):
  pairs, scores = pairs_and_scores
  out = tmp_path / "out.jsonl"
  out.write_bytes(b"previous good output\n")
  rc = main(
    [
      "curate",
      "filter",
      "--pairs",
      str(pairs),
      "--scores",
      str(scores),
      "--output",
      str(out),
      "--inconsistent",
      str(tmp_path / "." / "out.jsonl"),
    ]
  )
  assert rc == 2
  one_error_line(capsys, "--inconsistent", "--output", out.name)
  assert out.read_bytes() == b"previous good output\n"


def test_construct_refuses_report_on_the_pairs(tmp_path, capsys):
  cand = _write(
    tmp_path / "cand.jsonl", [{"id": "c", "images": [], "question": "q", "responses": ["a"]}]
  )
  judg = _write(tmp_path / "judg.jsonl", [])
  out = tmp_path / "pairs.jsonl"
  out.write_bytes(b"old pairs\n")
  rc = main(
    [
      "construct",
      "--candidates",
      str(cand),
      "--judgments",
      str(judg),
      "--output",
      str(out),
      "--report",
      str(out),
    ]
  )
  assert rc == 2
  one_error_line(capsys, "--report", "--output")
  assert out.read_bytes() == b"old pairs\n"


def test_judge_refuses_appending_into_its_input(tmp_path, capsys):
  cand = {"id": "c", "images": [], "question": "q", "responses": ["a", "b"]}
  inp = _write(tmp_path / "cand.jsonl", [cand])
  before = inp.read_bytes()
  rc = main(
    [
      "judge",
      "--input",
      str(inp),
      "--output",
      str(inp),
      "--base-url",
      "http://127.0.0.1:9/v1",
      "--judge-model",
      "m",
      "--no-progress",
    ]
  )
  assert rc == 2
  one_error_line(capsys, "--output", "--input", inp.name)
  assert inp.read_bytes() == before


def test_hard_linked_output_is_the_input(tmp_path, capsys):
  inp = _write(
    tmp_path / "records.jsonl", [{"id": "a", "images": [], "question": "q", "answer": "x"}]
  )
  os.link(inp, tmp_path / "alias.jsonl")
  before = inp.read_bytes()
  rc = main(
    [
      "score",
      "--model",
      str(tmp_path / "no-model"),
      "--input",
      str(inp),
      "--output",
      str(tmp_path / "alias.jsonl"),
    ]
  )
  assert rc == 2  # refused before the model is even looked at
  one_error_line(capsys, "alias.jsonl", "--input")
  assert inp.read_bytes() == before


@pytest.mark.parametrize(
  "argv",
  [
    ["curate", "flip", "--pairs", "{pairs}", "--scores", "{scores}", "--output", "{scores}"],
    ["curate", "vote", "--queue", "{pairs}", "--judgments", "{scores}", "--output", "{pairs}"],
    ["convert", "--input", "{pairs}", "--from", "canonical", "--output", "{pairs}"],
    ["t2i", "--input", "{pairs}", "--output", "{pairs}"],
    ["best-of-n", "--model", "m", "--input", "{pairs}", "--output", "{pairs}"],
    [
      "evaluate",
      "--benchmark",
      "pairs",
      "--data",
      "{pairs}",
      "--scores",
      "{scores}",
      "--output",
      "{scores}",
    ],
  ],
)
def test_every_command_refuses_an_input_as_output(argv, pairs_and_scores, capsys):
  pairs, scores = pairs_and_scores
  before = pairs.read_bytes(), scores.read_bytes()
  assert main([a.format(pairs=pairs, scores=scores) for a in argv]) == 2
  one_error_line(capsys, "is the same file as the input")
  assert (pairs.read_bytes(), scores.read_bytes()) == before


def test_check_distinct_paths_unit(tmp_path):
  io.check_distinct_paths(
    {"--output": tmp_path / "a", "--report": None}, {"--pairs": [tmp_path / "b"]}
  )
  with pytest.raises(UserError, match=r"--report .* is the same file as --output"):
    io.check_distinct_paths({"--output": tmp_path / "a", "--report": tmp_path / "sub" / ".." / "a"})


# -- outputs committed together --------------------------------------------------------------------


def test_filter_failing_second_output_leaves_the_first_untouched(
  pairs_and_scores, tmp_path, capsys
):
  pairs, scores = pairs_and_scores
  out = tmp_path / "kept.jsonl"
  out.write_bytes(b"old kept\n")
  (tmp_path / "blocker").write_text("a file where the queue's folder should be")
  rc = main(
    [
      "curate",
      "filter",
      "--pairs",
      str(pairs),
      "--scores",
      str(scores),
      "--output",
      str(out),
      "--inconsistent",
      str(tmp_path / "blocker" / "queue.jsonl"),
    ]
  )
  assert rc == 2
  one_error_line(capsys, "blocker")
  assert out.read_bytes() == b"old kept\n"
  assert _temps(tmp_path) == []
  # and when both can be written, both are
  queue = tmp_path / "queue.jsonl"
  assert (
    main(
      [
        "curate",
        "filter",
        "--pairs",
        str(pairs),
        "--scores",
        str(scores),
        "--output",
        str(out),
        "--inconsistent",
        str(queue),
      ]
    )
    == 0
  )
  assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["p0", "p1"]
  assert [json.loads(x)["id"] for x in queue.read_text().splitlines()] == ["p2", "p3"]


def test_atomic_outputs_exception_keeps_every_old_file(tmp_path):
  a, b = tmp_path / "a.json", tmp_path / "b.json"
  a.write_text("old a")
  b.write_text("old b")
  with pytest.raises(RuntimeError):
    with io.atomic_outputs():
      io.write_json(a, {"new": 1})
      io.write_json(b, {"new": 2})
      assert a.read_text() == "old a"  # nothing is renamed before the block ends
      raise RuntimeError("the second output's producer failed")
  assert (a.read_text(), b.read_text()) == ("old a", "old b")
  assert _temps(tmp_path) == []
  with io.atomic_outputs():
    io.write_json(a, {"new": 1})
    with io.atomic_outputs():  # nested: joins the outer block
      io.write_json(b, {"new": 2})
    assert b.read_text() == "old b"
  assert json.loads(a.read_text()) == {"new": 1} and json.loads(b.read_text()) == {"new": 2}
  with pytest.raises(UserError, match="written twice"):
    with io.atomic_outputs():
      io.write_json(a, {})
      io.write_json(tmp_path / "." / "a.json", {})


# -- stale temporary files, permissions, error names -----------------------------------------------

KILLED_WRITER = """
import os, signal, sys
from mrm_jax.io import atomic_open
with atomic_open(sys.argv[1]) as f:
  f.write("half a record")
  f.flush()
  os.kill(os.getpid(), signal.SIGKILL)
"""

LIVE_WRITER = """
import sys, time
from mrm_jax.io import atomic_open
with atomic_open(sys.argv[1]) as f:
  f.write("still writing")
  print("ready", flush=True)
  sys.stdin.readline()
"""


def test_killed_runs_temp_file_is_removed_by_the_next_run(pairs_and_scores, tmp_path):
  pairs, scores = pairs_and_scores
  out = tmp_path / "flipped.jsonl"
  r = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], timeout=60)
  assert r.returncode == -signal.SIGKILL
  (stale,) = _temps(tmp_path)
  assert stale.startswith(".flipped.jsonl.") and not out.exists()
  live = subprocess.Popen(
    [sys.executable, "-c", LIVE_WRITER, str(out)],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert live.stdout.readline() == "ready\n"
    (held,) = set(_temps(tmp_path)) - {stale}
    assert (
      main(["curate", "flip", "--pairs", str(pairs), "--scores", str(scores), "--output", str(out)])
      == 0
    )
    assert _temps(tmp_path) == [held]  # the killed run's file is gone, the live writer's kept
  finally:
    live.communicate("\n", timeout=60)
  assert live.returncode == 0 and _temps(tmp_path) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_outputs_get_the_umasks_permissions(pairs_and_scores, tmp_path, umask, mode):
  pairs, scores = pairs_and_scores
  old = os.umask(umask)
  try:
    out = tmp_path / "flipped.jsonl"
    assert (
      main(["curate", "flip", "--pairs", str(pairs), "--scores", str(scores), "--output", str(out)])
      == 0
    )
    io.write_json(tmp_path / "r.json", {"x": 1})
  finally:
    os.umask(old)
  assert os.stat(out).st_mode & 0o777 == mode
  assert os.stat(tmp_path / "r.json").st_mode & 0o777 == mode


def test_output_that_is_a_directory_is_named(pairs_and_scores, tmp_path, capsys):
  pairs, scores = pairs_and_scores
  (tmp_path / "outdir").mkdir()
  rc = main(
    [
      "curate",
      "flip",
      "--pairs",
      str(pairs),
      "--scores",
      str(scores),
      "--output",
      str(tmp_path / "outdir"),
    ]
  )
  assert rc == 2
  one_error_line(capsys, "outdir", "is a directory")
  assert _temps(tmp_path) == [] and list((tmp_path / "outdir").iterdir()) == []


def test_write_failure_names_the_output_not_the_temp_file(tmp_path, monkeypatch):
  real_replace = os.replace

  def failing_replace(src, dst):
    if str(dst).endswith("out.json"):
      raise OSError(28, "No space left on device", str(src))
    return real_replace(src, dst)

  monkeypatch.setattr(os, "replace", failing_replace)
  with pytest.raises(UserError) as e:
    io.write_json(tmp_path / "out.json", {"x": 1})
  assert str(e.value) == f"{tmp_path / 'out.json'}: cannot write (No space left on device)"
  assert _temps(tmp_path) == []
