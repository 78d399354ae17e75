"""T2I preference reformulation (DESIGN §3.2b, §8).

A text-to-image preference (caption, chosen image, rejected image) becomes a two-image
reward-model pair: the question shows "Image 1" and "Image 2" and asks which matches the
caption better and looks better; the chosen answer names the truly preferred image as the
better one, the rejected answer the other. Which image is shown first is balanced exactly
(⌊n/2⌋ of the n pairs show the preferred image first, picked by a seeded shuffle), so the
position carries no signal a reward model could learn instead of the images.
"""

from __future__ import annotations

import os
import random

from mrm_jax.data.records import (
  IMAGE_PLACEHOLDER,
  REWARD_SYSTEM_PROMPT,
  VIDEO_PLACEHOLDER,
  record_id,
)
from mrm_jax.errors import UserError, at
from mrm_jax.io import read_json_or_jsonl

QUESTION = (
  'The two images below were generated for the caption: "{caption}"\n'
  f"Image 1: {IMAGE_PLACEHOLDER}\n"
  f"Image 2: {IMAGE_PLACEHOLDER}\n"
  "Which image matches the caption better and has better visual quality?"
)


def verdict(better: int, worse: int) -> str:
  return f"Image {better} is better than Image {worse}."


def chosen_first_indices(n: int, seed: int) -> set[int]:
  """The ⌊n/2⌋ record indices whose preferred image is shown first (seeded shuffle)."""
  perm = list(range(n))
  random.Random(seed).shuffle(perm)
  return set(perm[: n // 2])


def _check(record: dict, where: str) -> tuple[str, str, str]:
  caption = record.get("caption", record.get("prompt"))
  if caption is None:
    raise UserError(f"{where}: missing field 'caption'")
  if not isinstance(caption, str):
    raise UserError(f"{where}: field 'caption' should be a string")
  record_id(record, where)
  if record.get("source") is not None and not isinstance(record["source"], str):
    raise UserError(f"{where}: field 'source' should be a string")
  images = []
  for key in ("chosen_image", "rejected_image"):
    value = record.get(key)
    if not isinstance(value, str) or not value:
      raise UserError(f"{where}: field '{key}' should be an image path")
    images.append(value)
  if images[0] == images[1]:
    raise UserError(f"{where}: chosen_image and rejected_image are the same image '{images[0]}'")
  return caption, images[0], images[1]


def neutral_caption(caption: str) -> str:
  """The caption with its placeholders defused: a literal "<image>" or "<video>" would add a vision
  slot
  the pair has no image for."""
  return caption.replace(IMAGE_PLACEHOLDER, "image").replace(VIDEO_PLACEHOLDER, "video")


def reformulate(records: list[dict], seed: int = 42, wheres: list[str] | None = None) -> list[dict]:
  """T2I records {"id"?, "caption", "chosen_image", "rejected_image", "source"?} → canonical pairs.

  Records without an id get "t2i-{k}" (k = 0-based position). `wheres[k]` names record k
  in error messages.
  """
  first = chosen_first_indices(len(records), seed)
  pairs = []
  for k, record in enumerate(records):
    where = wheres[k] if wheres else f"T2I record {k + 1}"
    caption, chosen, rejected = _check(record, where)
    if k in first:
      images, pos_chosen, pos_rejected = [chosen, rejected], 1, 2
    else:
      images, pos_chosen, pos_rejected = [rejected, chosen], 2, 1
    rid = record_id(record, where)
    pairs.append(
      {
        "id": rid or f"t2i-{k}",
        "images": images,
        "system": REWARD_SYSTEM_PROMPT,
        "question": QUESTION.format(caption=neutral_caption(caption)),
        "chosen": verdict(pos_chosen, pos_rejected),
        "rejected": verdict(pos_rejected, pos_chosen),
        "source": record.get("source") or "t2i",
        "meta": {"caption": caption, "chosen_position": pos_chosen},
      }
    )
  return pairs


def read_generic(path: str | os.PathLike) -> tuple[list[dict], list[str]]:
  """T2I records from JSONL or a JSON list, checked, with their file:line."""
  records, wheres = [], []
  for lineno, record in read_json_or_jsonl(path):
    where = at(path, lineno)
    _check(record, where)
    records.append(record)
    wheres.append(where)
  return records, wheres
