"""The re-annotation judges behind `PairJudge` (mrm_jax/curate/judges.py): every queued pair asked
about in both orders, resumable, and keyed on what decides the answers; the library itself knows
no simulated judge (mrm_jax.demo supplies it)."""

import json

import ml_collections
import pytest

from mrm_jax.curate.config import curate_config
from mrm_jax.curate.judges import StoredPairJudge, judge_from_config
from mrm_jax.curate.steps import vote
from mrm_jax.demo.curation import SimulatedPairJudge
from mrm_jax.errors import UserError

QUEUE = [
  {
    "id": f"q{i}",
    "images": [],
    "question": f"What colour is shape {i}?",
    "chosen": f"It is red {i}.",
    "rejected": f"It is blue {i}.",
  }
  for i in range(4)
]


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _jsonl(path):
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _judge_cfg(**values) -> ml_collections.ConfigDict:
  jc = curate_config().judge
  jc.update(values)
  return jc


@pytest.fixture
def queue(tmp_path):
  return _write(tmp_path / "queue.jsonl", QUEUE)


@pytest.fixture
def truth(tmp_path):
  """The rejected answers are the right ones: a judge that knows should overturn every label."""
  rows = [
    {"images": [], "question": p["question"], "answer": p[side], "correct": side == "rejected"}
    for p in QUEUE
    for side in ("chosen", "rejected")
  ]
  return _write(tmp_path / "truth.jsonl", rows)


def test_simulated_judge_asks_both_orders_resumably(queue, truth, tmp_path):
  judge = SimulatedPairJudge(_judge_cfg(), truth, tmp_path, progress=False)
  out = tmp_path / "judgments.jsonl"
  ticks = []
  judge.judge(queue, out, 0, lambda: ticks.append(1))
  first = _jsonl(out)
  assert sorted((j["id"], tuple(j["order"])) for j in first) == sorted(
    (p["id"], o) for p in QUEUE for o in ((0, 1), (1, 0))
  )
  assert len(ticks) == len(first) == 2 * len(QUEUE)
  result = vote(QUEUE, first, min_votes=2)
  assert sum(p["meta"]["vote"]["swapped"] for p in result.kept) >= len(QUEUE) - 1
  judge.judge(queue, out, 0, lambda: ticks.append(1))  # resumed: nothing left to ask
  assert _jsonl(out) == first and len(ticks) == 2 * len(QUEUE)
  inputs, settings = judge.fingerprint(0)
  assert set(inputs) == {"truth"} and settings["kind"] == "simulated"


def test_stored_judge_takes_the_queued_pairs_judgments_of_its_round(queue, tmp_path):
  rows = [
    {
      "id": p["id"],
      "mode": "pairwise",
      "order": [0, 1],
      "raw": "",
      "scores": [8, 2],
      "error": None,
      "judge": "hand",
    }
    for p in QUEUE
  ]
  _write(tmp_path / "round_1.jsonl", rows + [{**rows[0], "id": "elsewhere"}])
  judge = StoredPairJudge(_judge_cfg(kind="stored", files=str(tmp_path / "round_{round}.jsonl")))
  out = tmp_path / "judgments.jsonl"
  judge.judge(queue, out, 1, lambda: None)
  assert _jsonl(out) == rows
  inputs, _ = judge.fingerprint(1)
  assert list(inputs["files"]) == [str(tmp_path / "round_1.jsonl")]
  with pytest.raises(UserError, match="round_0.jsonl: no such file"):
    judge.fingerprint(0)


def test_the_library_builds_only_its_own_judges(tmp_path):
  with pytest.raises(UserError, match="embedded world's judge"):
    judge_from_config(_judge_cfg(kind="simulated"), tmp_path)
  with pytest.raises(UserError, match="needs curate.judge.base_url"):
    judge_from_config(_judge_cfg(kind="openai"), tmp_path)
  with pytest.raises(UserError, match="needs curate.judge.files"):
    judge_from_config(_judge_cfg(kind="stored"), tmp_path)
