"""Best-of-N selection: the highest reward per candidate set (the first on a tie), all scores kept,
records unchanged otherwise; bad candidate files; the command end to end on a tiny model."""

import pytest

from mrm_jax.data.records import REWARD_SYSTEM_PROMPT
from mrm_jax.errors import UserError
from mrm_jax.evaluate import best_of_n

# A stand-in scorer with rewards fixed by hand per answer text.
REWARDS = {"a": 0.5, "bb": 2.0, "ccc": -1.0, "d": 2.0, "e": 7.0, "f": 7.0, "g": 3.0}


def _scorer(calls):
  def score(recs):
    calls.append(recs)
    return [REWARDS[r["answer"]] for r in recs]

  return score


def test_select_picks_highest_reward_first_on_ties():
  cands = [
    {
      "id": "x",
      "images": ["i.png"],
      "question": "<image>Q?",
      "responses": ["a", "bb", "ccc", "d"],
      "models": ["m"] * 4,
    },
    {"id": "y", "images": [], "question": "R?", "responses": ["e", "f", "g"], "system": "custom"},
    {"id": "z", "images": [], "question": "S?", "responses": ["ccc"]},
  ]
  calls = []
  out = best_of_n.select(cands, _scorer(calls))
  assert len(calls) == 1 and len(calls[0]) == 8  # one batched call over every response
  assert out == [
    {
      **cands[0],
      "scores": [0.5, 2.0, -1.0, 2.0],
      "best": 1,
      "best_response": "bb",
    },  # tie 2.0: first
    {**cands[1], "scores": [7.0, 7.0, 3.0], "best": 0, "best_response": "e"},
    {**cands[2], "scores": [-1.0], "best": 0, "best_response": "ccc"},
  ]
  recs = calls[0]
  assert recs[0] == {
    "id": "x:0",
    "images": ["i.png"],
    "question": "<image>Q?",
    "system": REWARD_SYSTEM_PROMPT,
    "answer": "a",
  }
  assert recs[4]["system"] == "custom" and recs[4]["id"] == "y:0"


@pytest.mark.parametrize(
  "line,message",
  [
    (
      '{"id": "x", "question": "q", "responses": []}',
      r"c\.jsonl:2: 'responses' should be a non-empty list",
    ),
    ('{"id": "x", "question": "q", "responses": ["a", 3]}', r"c\.jsonl:2: 'responses'"),
    ('{"id": "x", "responses": ["a"]}', r"c\.jsonl:2: missing field 'question'"),
    ('{"id": "x", "question": "q", "responses": ["a"], "images": "p.png"}', None),
  ],
)
def test_read_candidates(tmp_path, line, message):
  path = tmp_path / "c.jsonl"
  path.write_text(
    '{"id": "w", "image": "p.png", "question": "q", "responses": ["a"]}\n' + line + "\n"
  )
  if message is None:
    cands = best_of_n.read_candidates(path)
    assert [c["images"] for _, c in cands] == [["p.png"], ["p.png"]]
    assert cands[1][0].endswith("c.jsonl:2")
  else:
    with pytest.raises(UserError, match=message):
      best_of_n.read_candidates(path)


def test_missing_images_are_named(tmp_path):
  (tmp_path / "ok.png").write_bytes(b"x")
  cands = [
    ("c.jsonl:1", {"images": ["ok.png", "gone.png"]}),
    ("c.jsonl:2", {"images": ["gone2.png"]}),
  ]
  with pytest.raises(
    UserError,
    match=r"2 image files missing under .*: c\.jsonl:1: gone\.png; c\.jsonl:2: gone2\.png",
  ):
    best_of_n.check_images(cands, tmp_path)
