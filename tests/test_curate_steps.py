"""Curation data steps (DESIGN §3.2b) against hand-computed fixtures: flip, filter, vote,
including ties, missing scores and invalid judgments, through the library and the command."""

import json

import pytest

from mrm_jax import cli
from mrm_jax.curate import steps
from mrm_jax.data.records import read_pairs, score_key
from mrm_jax.errors import UserError


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _read_jsonl(path):
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _pair(k, **extra):
  return {
    "id": f"p{k}",
    "images": ["img/a.png"],
    "question": f"<image>Q{k}",
    "chosen": f"A{k}",
    "rejected": f"B{k}",
    **extra,
  }


def _scores(rows, image_key="images"):
  """rows: (k, score of A_k, score of B_k); None leaves that answer out. Questions are written
  without the placeholder, as scorers see them after cleaning."""
  out = []
  for k, sa, sb in rows:
    image = ["img/a.png"] if image_key == "images" else "img/a.png"
    for ans, s in ((f"A{k}", sa), (f"B{k}", sb)):
      if s is not None:
        out.append({image_key: image, "question": f"Q{k}", "answer": ans, "score": s})
  return out


# Scorer 1 and 2, (chosen, rejected) per pair. Strengths (mean of differences):
#  p1: (1-3 + 1-1)/2 = -1     p2: (2-0 + 2-1)/2 = 1.5    p3: (0-4 + 0-0)/2 = -2
#  p4: (5-6 + 1-2)/2 = -1     p5: missing in scorer 2    p6: (0-2 + 3-3)/2 = -1     p7: 0
# Negatives sorted ascending, stable: p3 (-2), p1, p4, p6 (-1 each, input order).
S1 = [(1, 1, 3), (2, 2, 0), (3, 0, 4), (4, 5, 6), (5, 1, 0), (6, 0, 2), (7, 1, 1)]
S2 = [(1, 1, 1), (2, 2, 1), (3, 0, 0), (4, 1, 2), (5, 1, None), (6, 3, 3), (7, 2, 2)]


@pytest.fixture
def flip_files(tmp_path):
  pairs = _write_jsonl(tmp_path / "pairs.jsonl", [_pair(k) for k in range(1, 8)])
  s1 = _write_jsonl(tmp_path / "s1.jsonl", _scores(S1))
  s2 = _write_jsonl(tmp_path / "s2.jsonl", _scores(S2, image_key="image_path"))
  return pairs, s1, s2


def _expected_flip(flipped):
  strengths = {1: -1.0, 2: 1.5, 3: -2.0, 4: -1.0, 6: -1.0, 7: 0.0}
  out = []
  for k, s in strengths.items():
    if k in flipped:
      out.append(
        {**_pair(k), "chosen": f"B{k}", "rejected": f"A{k}", "strength": -s, "flipped": True}
      )
    else:
      out.append({**_pair(k), "strength": s})
  return out


@pytest.mark.parametrize(
  "fraction,flipped", [(0.5, {3, 1}), (0.75, {3, 1, 4}), (0.0, set()), (1.0, {1, 3, 4, 6})]
)
def test_flip_matches_hand_computation(flip_files, fraction, flipped):
  pairs, s1, s2 = flip_files
  out, missing = steps.flip(
    read_pairs(pairs), [steps.read_score_file(s1), steps.read_score_file(s2)], fraction
  )
  assert out == _expected_flip(flipped)
  assert [(m.index, m.pair_id, m.files) for m in missing] == [(4, "p5", [1])]


def test_flip_fraction_floor_is_exact():
  # 29 of 100 negative pairs: 0.29 * 100 is 28.999999999999996 in floating point.
  pairs = [_pair(k) for k in range(100)]
  table = {
    score_key(r["images"], r["question"], r["answer"]): r["score"]
    for r in _scores([(k, 0, 1 + k) for k in range(100)])
  }
  out, _ = steps.flip(pairs, [table], 0.29)
  assert sum(1 for p in out if p.get("flipped")) == 29
  assert {p["id"] for p in out if p.get("flipped")} == {
    f"p{k}" for k in range(71, 100)
  }  # most negative


def test_flip_command_writes_all_pairs_and_lists_missing(flip_files, tmp_path, capsys):
  pairs, s1, s2 = flip_files
  out = tmp_path / "out.jsonl"
  assert (
    cli.main(
      ["curate", "flip", "--pairs", str(pairs), "--scores", str(s1), str(s2), "--output", str(out)]
    )
    == 0
  )
  assert _read_jsonl(out) == _expected_flip({3, 1})
  err = capsys.readouterr().err
  assert "left out 1 pair(s)" in err and "pairs.jsonl:5 id='p5'" in err and "s2.jsonl" in err


def test_duplicate_score_lines_average(tmp_path):
  s = _write_jsonl(
    tmp_path / "s.jsonl",
    [
      {"images": [], "question": "<image> q ", "answer": "a", "score": 1.0},
      {"images": [], "question": "q", "answer": "a", "score": 2.0},
    ],
  )
  assert steps.read_score_file(s) == {((), "q", "a"): 1.5}


@pytest.mark.parametrize(
  "line,message",
  [
    (
      '{"images": [], "question": "q", "answer": "a"}',
      r"s\.jsonl:2: 'score' should be a finite number",
    ),
    ('{"images": [], "question": "q", "answer": "a", "score": "1"}', r"s\.jsonl:2: 'score'"),
    ('{"images": [], "answer": "a", "score": 1}', r"s\.jsonl:2: missing field 'question'"),
    ('{"images": [], "question": "q", "answer": "a", "score": 1', r"s\.jsonl:2: malformed JSON"),
  ],
)
def test_bad_score_lines_name_file_and_line(tmp_path, line, message):
  s = tmp_path / "s.jsonl"
  s.write_text('{"images": [], "question": "q", "answer": "b", "score": 0}\n' + line + "\n")
  with pytest.raises(UserError, match=message):
    steps.read_score_file(s)


def test_flip_command_bad_score_file_is_one_line_error(flip_files, tmp_path, capsys):
  pairs, s1, _ = flip_files
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"images": [], "question": "q", "answer": "a", "score": null}\n')
  out = tmp_path / "out.jsonl"
  assert (
    cli.main(
      ["curate", "flip", "--pairs", str(pairs), "--scores", str(s1), str(bad), "--output", str(out)]
    )
    == 2
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "bad.jsonl:1" in err[0]
  assert not out.exists()


# filter: (chosen, rejected) per scorer; kept iff mean(chosen) > mean(rejected) strictly.
#  p1: 3 > 1 (and 2 > 0) kept      p2: 1 = 1 and 1 = 1 → tie → queue
#  p3: 0 < 2 → queue               p4: missing (scorer 1 lacks B4) → left out
#  p5: c = (2+0)/2 = 1, r = (1+2)/2 = 1.5 → queue     p6: c = 1, r = 0.5 → kept
F1 = [(1, 3, 1), (2, 1, 1), (3, 0, 2), (4, 1, None), (5, 2, 1), (6, 1, 0)]
F2 = [(1, 2, 0), (2, 1, 1), (3, 0, 2), (4, 1, 0), (5, 0, 2), (6, 1, 1)]


def test_filter_matches_hand_computation(tmp_path, capsys):
  pairs = _write_jsonl(tmp_path / "pairs.jsonl", [_pair(k) for k in range(1, 7)])
  f1 = _write_jsonl(tmp_path / "f1.jsonl", _scores(F1))
  f2 = _write_jsonl(tmp_path / "f2.jsonl", _scores(F2))
  kept, queue, missing = steps.filter_consistent(
    [_pair(k) for k in range(1, 7)], [steps.read_score_file(f1), steps.read_score_file(f2)]
  )
  assert [p["id"] for p in kept] == ["p1", "p6"]
  assert queue == [_pair(2), _pair(3), _pair(5)]  # labelled as they came
  assert [m.pair_id for m in missing] == ["p4"]
  # One scorer only: p5 is kept (2 > 1), p6 too (1 > 0).
  kept1, queue1, _ = steps.filter_consistent(
    [_pair(k) for k in range(1, 7)], [steps.read_score_file(f1)]
  )
  assert [p["id"] for p in kept1] == ["p1", "p5", "p6"] and [p["id"] for p in queue1] == [
    "p2",
    "p3",
  ]

  out, q = tmp_path / "kept.jsonl", tmp_path / "queue.jsonl"
  assert (
    cli.main(
      [
        "curate",
        "filter",
        "--pairs",
        str(pairs),
        "--scores",
        str(f1),
        str(f2),
        "--output",
        str(out),
        "--inconsistent",
        str(q),
      ]
    )
    == 0
  )
  assert [p["id"] for p in _read_jsonl(out)] == ["p1", "p6"]
  assert _read_jsonl(q) == [_pair(2), _pair(3), _pair(5)]
  assert "pairs.jsonl:4 id='p4'" in capsys.readouterr().err


def _j(pid, order, scores, mode="pairwise"):
  return {
    "id": pid,
    "mode": mode,
    "order": order,
    "raw": "",
    "scores": scores,
    "error": None if isinstance(scores, list) else "unparsable",
    "judge": "j",
  }


# Stored responses are [chosen, rejected]; a judgment votes for order[argmax(scores)].
JUDGMENTS_A = [
  _j("p1", [0, 1], [8, 3]),  # → 0 (chosen)
  _j("p2", [0, 1], [2, 9]),  # → 1
  _j("p3", [0, 1], [5, 5]),  # tie: ½ + ½
  _j("p4", [0, 1], [5, 5]),  # ½ + ½
  _j("p5", [0, 1], [7, 1]),  # → 0
  _j("p6", [0, 1], [1, 9]),  # → 1
  _j("p6", [0, 1], ["9", 1]),  # invalid: not a number
  _j("zzz", [0, 1], [1, 0]),  # not in the queue
]
JUDGMENTS_B = [
  _j("p1", [1, 0], [2, 7]),  # → order[1] = 0
  _j("p2", [1, 0], [9, 2]),  # → order[0] = 1
  _j("p3", [1, 0], [4, 6]),  # → 0
  _j("p4", [1, 0], [5, 5]),  # ½ + ½
  _j("p5", [1, 0], None),  # invalid: no scores
  _j("p5", [0, 1], [1, 2, 3]),  # invalid: length differs from order
  _j("p6", [1, 0], [3, 8]),  # → 0
  _j("p6", [1, 0], [True, 0]),  # invalid: a boolean is not a score
  _j("p6", [0, 1], [2, 1]),  # → 0
  _j("p6", [0, 1], [2, 1], mode="listwise"),  # not a pairwise judgment
]
# Tallies (chosen, rejected, valid): p1 2-0 (2), p2 0-2 (2) swapped, p3 1.5-0.5 (2), p4 1-1 (2)
# tied, p5 1-0 (1) no quorum, p6 2-1 (3).


def test_vote_matches_hand_computation():
  queue = [_pair(k) for k in range(1, 7)]
  res = steps.vote(queue, JUDGMENTS_A + JUDGMENTS_B, min_votes=2)
  expected = [
    {**_pair(1), "meta": {"vote": {"votes": [2.0, 0.0], "judgments": 2, "swapped": False}}},
    {
      **_pair(2),
      "chosen": "B2",
      "rejected": "A2",
      "meta": {"vote": {"votes": [2.0, 0.0], "judgments": 2, "swapped": True}},
    },
    {**_pair(3), "meta": {"vote": {"votes": [1.5, 0.5], "judgments": 2, "swapped": False}}},
    {**_pair(6), "meta": {"vote": {"votes": [2.0, 1.0], "judgments": 3, "swapped": False}}},
  ]
  assert res.kept == expected
  assert res.tied == ["p4"] and res.no_quorum == ["p5"]
  assert res.invalid == 5 and res.unknown == ["zzz"]
  res3 = steps.vote(queue, JUDGMENTS_A + JUDGMENTS_B, min_votes=3)
  assert [p["id"] for p in res3.kept] == ["p6"]


def test_vote_command(tmp_path, capsys):
  queue = _write_jsonl(tmp_path / "queue.jsonl", [_pair(k) for k in range(1, 7)])
  ja = _write_jsonl(tmp_path / "ja.jsonl", JUDGMENTS_A)
  jb = _write_jsonl(tmp_path / "jb.jsonl", JUDGMENTS_B)
  out = tmp_path / "out.jsonl"
  assert (
    cli.main(
      [
        "curate",
        "vote",
        "--queue",
        str(queue),
        "--judgments",
        str(ja),
        str(jb),
        "--output",
        str(out),
      ]
    )
    == 0
  )
  kept = _read_jsonl(out)
  assert [(p["id"], p["chosen"]) for p in kept] == [
    ("p1", "A1"),
    ("p2", "B2"),
    ("p3", "A3"),
    ("p6", "A6"),
  ]
  captured = capsys.readouterr()
  assert "'zzz'" in captured.err
  assert "4 of 6 pairs kept" in captured.out and "5 invalid" in captured.out


def test_vote_refuses_duplicate_queue_ids(tmp_path, capsys):
  queue = _write_jsonl(tmp_path / "queue.jsonl", [_pair(1), _pair(2), _pair(1)])
  ja = _write_jsonl(tmp_path / "ja.jsonl", JUDGMENTS_A)
  out = tmp_path / "out.jsonl"
  assert (
    cli.main(
      ["curate", "vote", "--queue", str(queue), "--judgments", str(ja), "--output", str(out)]
    )
    == 2
  )
  assert "queue.jsonl:3: duplicate pair id 'p1'" in capsys.readouterr().err


def test_curate_steps_refuse_config_overrides(flip_files, tmp_path, capsys):
  pairs, s1, _ = flip_files
  assert (
    cli.main(
      [
        "curate",
        "flip",
        "--pairs",
        str(pairs),
        "--scores",
        str(s1),
        "--output",
        str(tmp_path / "o.jsonl"),
        "--config.seed=3",
      ]
    )
    == 2
  )
  assert "unrecognized arguments: --config.seed=3" in capsys.readouterr().err
