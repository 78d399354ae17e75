"""`mrm-jax construct` against a hand-computed fixture (DESIGN §3.2b)."""

import json

import pytest

from mrm_jax import cli
from mrm_jax.construct.pairs import construct, read_candidates, read_judgments
from mrm_jax.data.records import REWARD_SYSTEM_PROMPT, read_pairs
from mrm_jax.errors import UserError

CANDIDATES = [
  {
    "id": "c1",
    "images": ["a.png"],
    "question": "<image>Q1?",
    "reference": "ref",
    "responses": ["A", "BB", "CCC", "A"],
    "models": ["m0", "m1", "m2", "m3"],
  },
  {"id": "c2", "images": ["b.png"], "question": "Q2?", "responses": ["x", "yy", "zzz"]},
  {"id": "c3", "images": [], "question": "Q3?", "responses": ["p", "q"]},
  {"id": "c4", "images": [], "question": "Q4?", "responses": ["same", "same"]},
]


def J(cid, mode, order, scores, error=None):
  return {
    "id": cid,
    "mode": mode,
    "order": order,
    "raw": "...",
    "scores": scores,
    "error": error,
    "judge": "j",
  }


JUDGMENTS = [
  # c1: stored means s0 = (8+8)/2 = 8, s1 = (4+5)/2 = 4.5, s2 = (6+7)/2 = 6.5, s3 = (7+9)/2 = 8
  J("c1", "listwise", [2, 0, 1, 3], [6, 8, 4, 7]),
  J("c1", "listwise", [1, 3, 2, 0], [5, 9, 7, 8]),
  J("c1", "listwise", [0, 1, 2, 3], [1, 2, 3]),  # wrong length: invalid
  J("c1", "listwise", [3, 2, 1, 0], None, "HTTP 500"),  # failed: invalid
  J("c1", "pairwise", [0, 1], [0, 10]),  # not a construction mode: ignored
  # c2: s0 = (6+6.5)/2 = 6.25, s1 = (5+7)/2 = 6, s2 = (6+4+9)/3 = 6.333...
  J("c2", "listwise", [1, 0, 2], [5, 6, 6]),
  J("c2", "listwise", [2, 1, 0], [4, 7, 6.5]),
  J("c2", "pointwise", [2], [9]),
  # c3: only pointwise, so no judgment covers both responses
  J("c3", "pointwise", [0], [8]),
  J("c3", "pointwise", [1], [2]),
  J("zz", "listwise", [0, 1], [1, 2]),  # unknown id
]


def expected(cid, i, j, chosen, rejected, strength):
  return (f"{cid}:{i}-{j}", chosen, rejected, pytest.approx(strength, abs=1e-12))


def summary(pairs):
  return [(p["id"], p["chosen"], p["rejected"], p["strength"]) for p in pairs]


def test_hand_computed_fixture():
  pairs, stats = construct([dict(c) for c in CANDIDATES], JUDGMENTS, min_gap=0.5)
  assert summary(pairs) == [
    expected("c1", 0, 1, "A", "BB", 3.5),
    expected("c1", 0, 2, "A", "CCC", 1.5),
    # (0, 3) identical text
    expected("c1", 1, 2, "CCC", "BB", 2.0),
    expected("c1", 1, 3, "A", "BB", 3.5),
    expected("c1", 2, 3, "A", "CCC", 1.5),
    # c2: (0,1) and (1,2) disagree between the two listwise judgments; (0,2) gap 1/12 < 0.5
  ]
  assert stats.report() == {
    "n_candidates": 4,
    "n_pairs": 5,
    "judgments": {"n": 11, "valid": 7, "invalid": 2, "ignored_mode": 1, "unknown_id": 1},
    "dropped": {"identical_text": 2, "not_covered": 1, "disagreement": 2, "small_gap": 1},
  }
  p = pairs[2]
  assert (
    p["system"] == REWARD_SYSTEM_PROMPT
    and p["images"] == ["a.png"]
    and p["question"] == "<image>Q1?"
  )
  assert p["meta"]["chosen_index"] == 2 and p["meta"]["rejected_index"] == 1
  assert (
    p["meta"]["chosen_model"] == "m2"
    and p["meta"]["chosen_mean"] == 6.5
    and p["meta"]["rejected_mean"] == 4.5
  )


def test_min_gap_edges():
  pairs, _ = construct([dict(c) for c in CANDIDATES], JUDGMENTS, min_gap=2.0)
  assert [p["id"] for p in pairs] == ["c1:0-1", "c1:1-2", "c1:1-3"]  # a gap of exactly 2.0 is kept
  # With no minimum, c2's (0,2) survives: no judgment prefers 2, one ties, the means decide (6.333 >
  # 6.25).
  pairs, stats = construct([dict(c) for c in CANDIDATES], JUDGMENTS, min_gap=0.0)
  c2 = [p for p in pairs if p["id"].startswith("c2")]
  assert summary(c2) == [expected("c2", 0, 2, "zzz", "x", 19 / 3 - 6.25)]
  assert stats.small_gap == 0


def test_cli_files_formats_and_determinism(tmp_path):
  cands, judg = tmp_path / "c.jsonl", tmp_path / "j.jsonl"
  cands.write_text("".join(json.dumps(c) + "\n" for c in CANDIDATES))
  judg.write_text("".join(json.dumps(j) + "\n" for j in JUDGMENTS))
  out, rep = tmp_path / "pairs.jsonl", tmp_path / "r.json"
  args = ["construct", "--candidates", str(cands), "--judgments", str(judg), "--output", str(out)]
  assert cli.main(args + ["--report", str(rep), "--seed", "3"]) == 0
  pairs = [json.loads(line) for line in out.read_text().splitlines()]
  assert summary(pairs) == summary(construct(read_candidates(cands), read_judgments(judg))[0])
  report = json.loads(rep.read_text())
  assert report["n_pairs"] == 5 and report["n_written"] == 5 and report["min_gap"] == 0.5
  assert report["style"]["chosen_longer"] == 1 and report["style"]["chosen_shorter"] == 4
  assert report["style"]["chosen_longer_share"] == 0.2 and report["style"]["probe_accuracy"] is None

  # --balance-length: one "longer" pair (c1:1-2) and one of the four "shorter" ones, seeded, in
  # input order.
  bal = tmp_path / "bal.jsonl"
  assert (
    cli.main(args[:-1] + [str(bal), "--balance-length", "--seed", "3", "--report", str(rep)]) == 0
  )
  first = bal.read_text()
  kept = [json.loads(line) for line in first.splitlines()]
  assert len(kept) == 2 and "c1:1-2" in [p["id"] for p in kept]
  assert [p["id"] for p in kept] == [p["id"] for p in pairs if p["id"] in {k["id"] for k in kept}]
  assert json.loads(rep.read_text())["balanced"]["chosen_longer"] == 1
  assert json.loads(rep.read_text())["balanced"]["removed"] == 3
  assert cli.main(args[:-1] + [str(bal), "--balance-length", "--seed", "3"]) == 0
  assert bal.read_text() == first  # same seed, same output
  picks = set()
  for seed in range(12):
    assert cli.main(args[:-1] + [str(bal), "--balance-length", "--seed", str(seed)]) == 0
    picks.add(tuple(json.loads(line)["id"] for line in bal.read_text().splitlines()))
  assert len(picks) > 1  # the seed decides which shorter-chosen pair stays

  lf = tmp_path / "lf.jsonl"
  assert cli.main(args[:-1] + [str(lf), "--format", "llamafactory"]) == 0
  back = read_pairs(lf)
  assert [(p["id"], p["chosen"], p["rejected"], p["system"]) for p in back] == [
    (p["id"], p["chosen"], p["rejected"], p["system"]) for p in pairs
  ]


def test_reparse_uses_the_raw_text(tmp_path):
  cands = [{"id": "c", "images": [], "question": "Q", "responses": ["a", "b", "c"]}]
  stale = [J("c", "listwise", [2, 0, 1], None, "old parser failed")]
  stale[0]["raw"] = (
    'Scores:\n```json\n{"Reference Answer": {}, "Assistant 1": {"Overall Score": 9,},'
    ' "Assistant 2": {"Overall Score": 1}, "Assistant 3": {"Overall Score": 5}}\n```'
  )
  assert construct(cands, stale)[0] == []
  pairs, stats = construct(cands, stale, reparse_raw=True)
  # stored means: s2 = 9, s0 = 1, s1 = 5
  assert summary(pairs) == [
    expected("c", 0, 1, "b", "a", 4),
    expected("c", 0, 2, "c", "a", 8),
    expected("c", 1, 2, "c", "b", 4),
  ]


def test_bad_input_names_the_line(tmp_path, capsys):
  cands, judg = tmp_path / "c.jsonl", tmp_path / "j.jsonl"
  cands.write_text("".join(json.dumps(c) + "\n" for c in CANDIDATES))
  judg.write_text(
    json.dumps(JUDGMENTS[0]) + "\n" + json.dumps(J("c2", "listwise", [0, 5, 1], [1, 2, 3])) + "\n"
  )
  with pytest.raises(UserError, match=f"{judg}:2: 'order'"):
    construct(read_candidates(cands), read_judgments(judg))
  assert (
    cli.main(
      [
        "construct",
        "--candidates",
        str(cands),
        "--judgments",
        str(judg),
        "--output",
        str(tmp_path / "o.jsonl"),
      ]
    )
    == 2
  )
  assert f"{judg}:2" in capsys.readouterr().err and not (tmp_path / "o.jsonl").exists()
  cands.write_text(json.dumps(CANDIDATES[0]) + "\n" + json.dumps(CANDIDATES[0]) + "\n")
  with pytest.raises(UserError, match=f"{cands}:2: duplicate id 'c1'"):
    read_candidates(cands)


def test_demo_world(tmp_path):
  """construct and t2i on the embedded world: stored scores and re-parsed raw text agree, and the
  judge's preferences (via the debiased pairs) mostly pick the correct answer."""
  world = pytest.importorskip("mrm_jax.demo.world")
  import ml_collections

  cfg = ml_collections.ConfigDict({"seed": 0, "world": world.world_config("small")})
  world.generate_world(tmp_path / "w", cfg)
  w = tmp_path / "w"
  args = [
    "construct",
    "--candidates",
    str(w / "candidates.jsonl"),
    "--judgments",
    str(w / "judgments.jsonl"),
  ]
  assert (
    cli.main(args + ["--output", str(tmp_path / "a.jsonl"), "--report", str(tmp_path / "r.json")])
    == 0
  )
  assert cli.main(args + ["--output", str(tmp_path / "b.jsonl"), "--reparse"]) == 0
  assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
  pairs = read_pairs(tmp_path / "a.jsonl")
  truth = {}
  for line in (w / "world_truth.jsonl").read_text().splitlines():
    t = json.loads(line)
    # the pairs lie one folder above the candidates, so their image paths are rebased onto it
    truth[(tuple(f"w/{i}" for i in t["images"]), t["question"], t["answer"])] = t["correct"]
  decided = [
    (
      truth[(tuple(p["images"]), p["question"], p["chosen"])],
      truth[(tuple(p["images"]), p["question"], p["rejected"])],
    )
    for p in pairs
  ]
  informative = [c for c, r in decided if c != r]
  assert len(pairs) > 20 and sum(informative) / len(informative) > 0.8
  assert all(p["strength"] >= 0.5 for p in pairs)
  assert (
    cli.main(["t2i", "--input", str(w / "t2i.jsonl"), "--output", str(tmp_path / "t.jsonl")]) == 0
  )
  t2i = read_pairs(tmp_path / "t.jsonl")
  assert sum(p["chosen"].startswith("Image 1") for p in t2i) == len(t2i) // 2
