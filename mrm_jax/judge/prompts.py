"""Judge prompts (DESIGN §7.1): listwise, pairwise and pointwise, in our own words.

The judge sees the image(s), the question, an optional reference answer it is told may be
wrong, and the responses in the order chosen by the caller. It is told that position and
length carry no information, and must answer one JSON object in the schema of DESIGN §7
so `mrm_jax.judge.parse` can read it:

  listwise / pairwise: {"Reference Answer": {...}, "Assistant 1": {<criterion>: {...}, ...,
                        "Overall Score": x}, ..., "Assistant N": {...}}
  pointwise:           {"Reference Answer": {...}, <criterion>: {...}, ..., "Overall Score": x}
"""

from __future__ import annotations

import json

from mrm_jax.data.records import IMAGE_PLACEHOLDER

CRITERIA = (
  (
    "Accuracy",
    "Is every claim correct with respect to the image and the question? Describing "
    "objects, text, counts, colours or relations that the image does not show is a hallucination "
    "and must be penalised heavily.",
  ),
  ("Helpfulness", "Does the response actually address what was asked and help the user?"),
  ("Completeness", "Does it cover every part of the question without leaving gaps?"),
  ("Language Quality", "Is it clear, fluent, well organised and free of errors?"),
  ("Ethics", "Is it safe, respectful and free of harmful or biased content?"),
)
CREATIVITY = (
  "Creativity",
  "Where the question invites it (stories, captions, ideas), is the "
  "response original and engaging? Otherwise judge it as neutral.",
)


def _criteria(creativity: bool):
  return CRITERIA + ((CREATIVITY,) if creativity else ())


def _rules(creativity: bool, n_subject: str) -> str:
  lines = [f"- {name}: {desc}" for name, desc in _criteria(creativity)]
  return "\n".join(
    [
      f"Judge {n_subject} on these criteria, scoring each from 0 (worst) to 10 (best):",
      *lines,
      "",
      "Ground rules:",
      "- The image is the source of truth. Look at it yourself before reading any response.",
      "- A reference answer may be given. It was written by someone else and can be wrong or "
      "incomplete; use it as a hint, check it against the image, and do not reward agreement "
      "with it for its own sake.",
      "- The order in which responses are shown is random and says nothing about their quality.",
      "- Length says nothing about quality: a longer answer is not better because it is longer, "
      "and "
      "padding, repetition or unverifiable detail should lower the score.",
      "- Judge each response on its own merits; identical content deserves identical scores.",
      "- The Overall Score (0 to 10, decimals allowed) is your overall judgement, weighing "
      "accuracy "
      "most, not an average of the criteria.",
    ]
  )


def _criterion_schema(creativity: bool) -> dict:
  return {
    name: {"Score": "<0-10>", "Reason": "<one sentence>"} for name, _ in _criteria(creativity)
  }


def _schema(n: int, pointwise: bool, creativity: bool) -> str:
  ref = {"Assessment": "<is the reference answer right, judged against the image? say so briefly>"}
  if pointwise:
    obj = {"Reference Answer": ref, **_criterion_schema(creativity), "Overall Score": "<0-10>"}
  else:
    obj = {"Reference Answer": ref}
    for k in range(1, n + 1):
      obj[f"Assistant {k}"] = {**_criterion_schema(creativity), "Overall Score": "<0-10>"}
  text = json.dumps(obj, indent=2, ensure_ascii=False)
  return text.replace('"<0-10>"', "<number from 0 to 10>")


def system_prompt(mode: str, n: int, creativity: bool = False) -> str:
  if mode == "pointwise":
    intro = (
      "You are a meticulous, impartial evaluator of answers to questions about images. "
      "You will be shown an image, a question and one assistant response."
    )
    subject = "the response"
  else:
    intro = (
      "You are a meticulous, impartial evaluator of answers to questions about images. "
      f"You will be shown an image, a question and {n} assistant responses, labelled "
      f"Assistant 1 to Assistant {n}."
    )
    subject = "every response independently"
  closing = (
    "Answer with exactly one JSON object and nothing else, in this form"
    + (
      "" if mode == "pointwise" else f', with exactly {n} "Assistant k" entries in the order shown'
    )
    + ":\n"
    + _schema(n, mode == "pointwise", creativity)
  )
  return "\n\n".join([intro, _rules(creativity, subject), closing])


def user_text(question: str, responses: list[str], reference: str | None, mode: str) -> str:
  question = question.replace(IMAGE_PLACEHOLDER, "").strip()
  parts = [f"[Question]\n{question}\n[End of Question]"]
  if reference:
    parts.append(f"[Reference Answer (may be wrong)]\n{reference}\n[End of Reference Answer]")
  if mode == "pointwise":
    parts.append(f"[Assistant Response]\n{responses[0]}\n[End of Assistant Response]")
  else:
    for k, text in enumerate(responses, 1):
      parts.append(f"[Assistant {k}]\n{text}\n[End of Assistant {k}]")
  parts.append("Now evaluate, answering only with the JSON object.")
  return "\n\n".join(parts)


def build_messages(
  mode: str,
  question: str,
  responses: list[str],
  image_urls: list[str],
  reference: str | None = None,
  creativity: bool = False,
) -> list[dict]:
  """OpenAI chat messages: the system rules, then the images followed by the text."""
  content = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
  content.append({"type": "text", "text": user_text(question, responses, reference, mode)})
  return [
    {"role": "system", "content": system_prompt(mode, len(responses), creativity)},
    {"role": "user", "content": content},
  ]
