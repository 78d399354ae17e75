"""A simulated LLM judge that knows the world's ground truth.

It scores a response by whether it is correct (with Gaussian noise, occasional misreads
and a mild preference for longer answers, the biases DESIGN §7 sets out to remove) and
writes what a real judge writes: the JSON of DESIGN §7 ("Reference Answer", then
"Assistant k" objects with per-criterion objects and an "Overall Score"), sometimes
wrapped or broken the way real judges break it. `stored_scores` says what a correct
parser recovers from each kind of output.
"""

from __future__ import annotations

import json
import re

import numpy as np

JUDGE_NAME = "world-sim-judge"

# Output kinds and their probabilities. The first five parse (robustly); the last two do not.
OUTPUT_KINDS = {
  "clean": 0.66,
  "code_fence": 0.08,
  "prose": 0.07,
  "trailing_comma": 0.05,
  "stray_backslash": 0.03,
  "unicode_escape": 0.03,
  "wrong_count": 0.05,
  "truncated": 0.03,
}
INVALID_KINDS = ("wrong_count", "truncated")

QUALITY_CORRECT, QUALITY_WRONG, QUALITY_PARTLY = 8.0, 2.5, 4.0
NOISE_STD = 0.9
MISREAD_P = 0.04  # the judge sometimes believes a wrong answer (or doubts a right one)
LENGTH_BIAS = 0.04  # points per word: a verbosity bias, small next to correctness


def response_score(
  rng: np.random.Generator, correct: bool, words: int, partly: bool = False
) -> tuple[int, int, int]:
  """(accuracy, helpfulness, overall) integer scores in 0..10."""
  quality = QUALITY_CORRECT if correct else (QUALITY_PARTLY if partly else QUALITY_WRONG)
  bias = LENGTH_BIAS * words
  clip = lambda x: int(min(10, max(0, round(x))))  # noqa: E731
  accuracy = clip(quality + rng.normal(0, NOISE_STD))
  helpful = clip(quality + 2 * bias + rng.normal(0, NOISE_STD))
  overall = clip(quality + bias + rng.normal(0, NOISE_STD))
  return accuracy, helpful, overall


def _analysis(believed: bool, claim: str, truth: str) -> str:
  if believed:
    return f"The response is consistent with the image: {claim}."
  if claim == truth:  # a misread: the judge doubts a right answer
    return f"The response claims \u201c{claim}\u201d, which the image doesn\u2019t seem to show."
  return (
    f"The response claims \u201c{claim}\u201d, but the image shows {truth}; it doesn\u2019t match."
  )


def listwise_output(
  rng: np.random.Generator, shown: list[dict], reference: dict, kind: str
) -> tuple[str, list[float] | None, str | None]:
  """Raw judge text for responses in presentation order.

  `shown[k]` = {"correct", "words", "partly", "claim", "truth"} for the k-th shown response;
  `reference` = {"correct", "claim", "truth"}. Returns (raw, scores a correct parser returns,
  error).
  """
  obj: dict = {
    "Reference Answer": {
      "Accuracy": {
        "Analysis": _analysis(reference["correct"], reference["claim"], reference["truth"]),
        "Score": 9 if reference["correct"] else 3,
      }
    }
  }
  overall = []
  for k, r in enumerate(shown, 1):
    believed = r["correct"] != (rng.random() < MISREAD_P)
    acc, helpful, score = response_score(rng, believed, r["words"], r.get("partly", False))
    overall.append(float(score))
    obj[f"Assistant {k}"] = {
      "Accuracy": {"Analysis": _analysis(believed, r["claim"], r["truth"]), "Score": acc},
      "Helpfulness": {
        "Analysis": "The response answers the question asked."
        if believed
        else "The response answers the question, but with wrong content.",
        "Score": helpful,
      },
      "Overall Score": score,
    }
  n = len(shown)
  if kind == "wrong_count":
    if rng.random() < 0.5 and n > 1:
      del obj[f"Assistant {n}"]
    else:
      obj[f"Assistant {n + 1}"] = dict(obj[f"Assistant {n}"])
  text = json.dumps(obj, indent=2, ensure_ascii=(kind == "unicode_escape"))
  if kind == "code_fence":
    text = f"```json\n{text}\n```"
  elif kind == "prose":
    text = (
      f"Here is my evaluation of the responses.\n\n{text}\n\n"
      "The scores above reflect accuracy first."
    )
  elif kind == "trailing_comma":
    text = re.sub(r'(["\d])\n(\s*)\}', r"\1,\n\2}", text)
  elif kind == "stray_backslash":
    text = text.replace("the image shows", "the image shows\\ ", 1).replace(
      "consistent with", "consistent\\ with", 1
    )
  elif kind == "truncated":
    # Cut inside the last response, before its overall score: nothing can recover it.
    last = text.rfind(f'"Assistant {n}"')
    cut = text.find('"Overall Score"', last)
    text = text[: last + (cut - last) // 2]
  if kind == "wrong_count":
    got = len([k for k in obj if k.startswith("Assistant ")])
    return text, None, f"expected {n} overall scores, got {got}"
  if kind == "truncated":
    return text, None, "truncated output: no complete JSON object"
  return text, overall, None


def pick_kind(rng: np.random.Generator) -> str:
  kinds = list(OUTPUT_KINDS)
  p = np.array([OUTPUT_KINDS[k] for k in kinds])
  return kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
