"""The judge-answer parser: what real judges write, and what must be refused."""

import json

import numpy as np
import pytest

from mrm_jax.judge import prompts
from mrm_jax.judge.parse import parse_scores, reparse


def answer(scores, crit=True):
  obj = {"Reference Answer": {"Assessment": "The reference says two cats; the image shows two."}}
  for k, s in enumerate(scores, 1):
    entry = {"Accuracy": {"Score": 7, "Reason": "matches"}} if crit else {}
    obj[f"Assistant {k}"] = {**entry, "Overall Score": s}
  return json.dumps(obj, indent=2)


CASES = [
  # (raw, n, mode, expected scores)
  (answer([7, 4.5, 9]), 3, "listwise", [7.0, 4.5, 9.0]),
  (
    "Here is my evaluation:\n```json\n" + answer([3, 8]) + "\n```\nLet me know.",
    2,
    "listwise",
    [3.0, 8.0],
  ),
  ("```\n" + answer([3, 8]) + "\n```", 2, "listwise", [3.0, 8.0]),
  (
    answer([6, 2])
    .replace('"Overall Score": 2\n', '"Overall Score": 2,\n')
    .replace("}\n}", "},\n}"),
    2,
    "listwise",
    [6.0, 2.0],
  ),
  (
    '{"Assistant 1": {"Reason": "uses \\frac{1}{2} and C:\\new\\dir", "Overall Score": 6},'
    ' "Assistant 2": {"Overall Score": 5}}',
    2,
    "listwise",
    [6.0, 5.0],
  ),
  (
    '{"Assistant 1": {"Reason": "caf\\u00e9 \\u2014 ok \\ud83d\\ude00", "Overall Score": 6},'
    ' "Assistant 2": {"Overall Score": 5}}',
    2,
    "listwise",
    [6.0, 5.0],
  ),
  (
    "{'Assistant 1': {'Overall Score': 7}, 'Assistant 2': {'Overall Score': 2, 'Reason': 'says "
    '"no"\'}}',
    2,
    "listwise",
    [7.0, 2.0],
  ),
  (
    '"{\\"Assistant 1\\": {\\"Overall Score\\": 6}, \\"Assistant 2\\": {\\"Overall Score\\": 1}}"',
    2,
    "listwise",
    [6.0, 1.0],
  ),
  (
    '{"assistant_1": {"overall_score": "8/10"}, "ASSISTANT 2": {"Overall Score": "3.5"}}',
    2,
    "listwise",
    [8.0, 3.5],
  ),
  (
    '{"Assistant 1": {"Reason": "line one\nline two", "Overall Score": 9}, "Assistant 2": '
    '{"Overall Score": 0}}',
    2,
    "listwise",
    [9.0, 0.0],
  ),
  (
    '{"evaluation": {"Assistant 1": {"Overall Score": 1}, "Assistant 2": {"Overall Score": 2}}}',
    2,
    "listwise",
    [1.0, 2.0],
  ),
  # pairwise: the same schema with two assistants
  (answer([8, 2]), 2, "pairwise", [8.0, 2.0]),
  # pointwise: one object with "Overall Score" (the reference's own fields do not count)
  (
    '{"Reference Answer": {"Assessment": "right", "Score": 9}, "Accuracy": {"Score": 4}, "Overall '
    'Score": 4}',
    1,
    "pointwise",
    [4.0],
  ),
  ('```json\n{"Assistant 1": {"Overall Score": 6.5}}\n```', 1, "pointwise", [6.5]),
  # no JSON at all, but one unambiguous score per assistant
  (
    "Assistant 1 - Overall Score: 8/10\nAssistant 2 - Overall Score: 3/10",
    2,
    "listwise",
    [8.0, 3.0],
  ),
  # a missing final brace after a complete value
  (
    '{"Assistant 1": {"Overall Score": 6}, "Assistant 2": {"Overall Score": 5}',
    2,
    "listwise",
    [6.0, 5.0],
  ),
]


@pytest.mark.parametrize("raw,n,mode,expected", CASES)
def test_recovers_scores(raw, n, mode, expected):
  parsed = parse_scores(raw, n, mode)
  assert parsed.error is None and parsed.scores == expected


INVALID = [
  (answer([6]), 2, "count"),  # too few
  (answer([6, 5, 4]), 2, "count"),  # too many: never truncate silently
  ('{"Assistant 1": {"Overall Score": 6}, "Assistant 3": {"Overall Score": 5}}', 2, "Assistant"),
  ('{"Assistant 1": {"Overall Score": 6}, "Assistant 2": {"Accuracy": 5}}', 2, "Overall Score"),
  ('{"Assistant 1": {"Overall Score": 16}, "Assistant 2": {"Overall Score": 5}}', 2, "outside"),
  (
    '{"Assistant 1": {"Overall Score": true}, "Assistant 2": {"Overall Score": 5}}',
    2,
    "not a number",
  ),
  ("I am unable to evaluate these responses.", 2, "unparsable"),
  ("", 2, "empty"),
  # cut by a token limit inside the last number: "1" could have been "10"
  ('{"Assistant 1": {"Overall Score": 6}, "Assistant 2": {"Overall Score": 1', 2, "Overall Score"),
  (
    '{"Assistant 1": {"Overall Score": 6}, "Assistant 2": {"Accuracy": {"Reason": "the ans',
    2,
    "Overall",
  ),
]


@pytest.mark.parametrize("raw,n,reason", INVALID)
def test_refuses(raw, n, reason):
  parsed = parse_scores(raw, n, "listwise")
  assert parsed.scores is None and reason.lower() in parsed.error.lower()


def test_reparse_keeps_transport_errors_and_fixes_stale_scores():
  j = {
    "id": "a",
    "mode": "listwise",
    "order": [1, 0],
    "raw": answer([2, 7]),
    "scores": None,
    "error": "old",
    "judge": "m",
  }
  assert reparse(j)["scores"] == [2.0, 7.0] and reparse(j)["error"] is None
  failed = {**j, "raw": "", "error": "HTTP 500 (after 6 attempts)"}
  assert (
    reparse(failed)["error"] == "HTTP 500 (after 6 attempts)" and reparse(failed)["scores"] is None
  )
  wrong = {**j, "order": [2, 0, 1], "scores": [1, 2, 3]}
  assert reparse(wrong)["scores"] is None and "got 2" in reparse(wrong)["error"]


def test_prompt_schema_example_parses_with_the_right_count():
  """The schema we show the judge is itself what the parser reads (with numbers filled in)."""
  for mode, n in (("listwise", 4), ("pairwise", 2), ("pointwise", 1)):
    sys_prompt = prompts.system_prompt(mode, n, creativity=True)
    schema = sys_prompt[sys_prompt.index("{") :]
    filled = schema.replace("<number from 0 to 10>", "7")
    assert parse_scores(filled, n, mode).scores == [7.0] * n
    assert (
      "order" in sys_prompt.lower()
      and "length" in sys_prompt.lower()
      and "Creativity" in sys_prompt
    )
  msgs = prompts.build_messages(
    "listwise",
    "<image>What is it?",
    ["r1", "r2"],
    ["data:image/png;base64,AA=="],
    reference="a cat",
  )
  user = msgs[1]["content"]
  assert (
    user[0]["type"] == "image_url"
    and "may be wrong" in user[1]["text"]
    and "<image>" not in user[1]["text"]
  )
  assert "[Assistant 2]\nr2" in user[1]["text"]


def test_demo_world_judge_outputs():
  """Every kind of raw output the demo world's simulated judge writes parses to what it meant."""
  simjudge = pytest.importorskip("mrm_jax.demo.simjudge")
  rng = np.random.default_rng(0)
  n_checked = 0
  for kind in simjudge.OUTPUT_KINDS:
    for _ in range(25):
      n = int(rng.integers(2, 6))
      shown = [
        {
          "correct": bool(rng.integers(2)),
          "words": int(rng.integers(1, 40)),
          "claim": "red",
          "truth": "blue",
        }
        for _ in range(n)
      ]
      raw, scores, error = simjudge.listwise_output(
        rng, shown, {"correct": True, "claim": "blue", "truth": "blue"}, kind
      )
      parsed = parse_scores(raw, n, "listwise")
      assert parsed.scores == scores, (kind, raw)
      assert (parsed.error is None) == (error is None)
      n_checked += 1
  assert n_checked == 25 * len(simjudge.OUTPUT_KINDS)
