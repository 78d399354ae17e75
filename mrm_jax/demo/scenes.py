"""Scenes of the embedded world and the texts about them.

A scene is a 56×56 picture cut into a 2×2 grid of 28-pixel cells; 1-4 cells hold a
shape, all of one colour and one kind, on a plain background. The grid is aligned with
Qwen2-VL's merged vision tokens (14-pixel patches merged 2×2 = 28 pixels), so every
fact a question asks about is visible to a tiny vision tower: colour (pixel values),
count (how many cells are filled), shape (how much of the cell is filled, and where),
position (which cell). Answers come in four styles of very different length and
formatting, correct or with exactly one hallucinated attribute, so correctness can only
be read from the image while style is free to be measured as a bias. Texts exist for
every question type; which ones the world asks is world.py's choice (QUESTION_WEIGHTS).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 56
CELL = IMAGE_SIZE // 2

# Six colours at the corners of the RGB cube, as far apart as six colours can be: a random vision
# tower maps nearby colours to nearby features, and with orange beside red and yellow and purple
# beside blue (the first palette) those pairs were the last the tiny model told apart, or never.
# Corners that differ in one channel are still the hardest pairs (see world.py, "Learnability").
COLORS = {
  "red": (220, 30, 30),
  "green": (30, 170, 40),
  "blue": (30, 50, 230),
  "yellow": (240, 220, 30),
  "purple": (200, 40, 210),
  "cyan": (20, 210, 210),
}
BACKGROUNDS = {
  "white": (245, 245, 245),
  "gray": (128, 128, 128),
  "black": (20, 20, 20),
  "beige": (225, 210, 170),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # cell index 0..3, row-major
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
STYLES = ("short", "sentence", "markdown", "verbose")  # shortest to longest
QUESTION_TYPES = ("color", "count", "shape", "position", "describe")


@dataclasses.dataclass(frozen=True)
class Scene:
  color: str
  shape: str
  cells: tuple[int, ...]  # filled cells, ascending
  background: str
  jitter: tuple[tuple[int, int, int], ...] = ()  # per filled cell: (dx, dy, dsize) in pixels

  @property
  def count(self) -> int:
    return len(self.cells)

  def facts(self) -> dict:
    return {
      "color": self.color,
      "shape": self.shape,
      "count": self.count,
      "background": self.background,
      "position": POSITIONS[self.cells[0]] if self.count == 1 else None,
    }


def random_scene(rng: np.random.Generator, count: int | None = None) -> Scene:
  count = int(rng.integers(1, 5)) if count is None else count
  cells = tuple(sorted(int(c) for c in rng.choice(4, size=count, replace=False)))
  jitter = tuple(
    (int(rng.integers(-2, 3)), int(rng.integers(-2, 3)), int(rng.integers(-1, 2))) for _ in cells
  )
  return Scene(
    color=str(rng.choice(list(COLORS))),
    shape=str(rng.choice(SHAPES)),
    cells=cells,
    background=str(rng.choice(list(BACKGROUNDS))),
    jitter=jitter,
  )


def alter(scene: Scene, attribute: str, rng: np.random.Generator) -> Scene:
  """The scene with one attribute changed to a different value (for mismatching T2I images)."""
  if attribute == "color":
    return dataclasses.replace(scene, color=_other(rng, list(COLORS), scene.color))
  if attribute == "shape":
    return dataclasses.replace(scene, shape=_other(rng, list(SHAPES), scene.shape))
  if attribute == "background":
    return dataclasses.replace(scene, background=_other(rng, list(BACKGROUNDS), scene.background))
  if attribute == "count":
    new = random_scene(rng, count=_other(rng, [1, 2, 3, 4], scene.count))
    return dataclasses.replace(scene, cells=new.cells, jitter=new.jitter)
  raise ValueError(f"cannot alter {attribute!r}")


def _other(rng: np.random.Generator, values: list, current):
  return values[int(rng.choice([i for i, v in enumerate(values) if v != current]))]


def render_png(scene: Scene) -> bytes:
  """PNG bytes of the scene; no metadata, so equal scenes give equal bytes."""
  img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[scene.background])
  draw = ImageDraw.Draw(img)
  fill = COLORS[scene.color]
  for cell, (dx, dy, ds) in zip(scene.cells, scene.jitter or [(0, 0, 0)] * scene.count):
    cx = (cell % 2) * CELL + CELL // 2 + dx
    cy = (cell // 2) * CELL + CELL // 2 + dy
    half = 10 + ds
    box = (cx - half, cy - half, cx + half - 1, cy + half - 1)
    if scene.shape == "circle":
      draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
      draw.rectangle(box, fill=fill)
    else:
      draw.polygon(
        [(cx, cy - half), (cx + half - 1, cy + half - 1), (cx - half, cy + half - 1)], fill=fill
      )
  buf = io.BytesIO()
  img.save(buf, format="PNG", optimize=False, compress_level=6)
  return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Texts. Every function is deterministic given its arguments; randomness is passed in as `variant`
# integers so the tokenizer corpus can enumerate every realisation.

QUESTION_TEMPLATES = {
  "color": ("What color {be} the {thing}?", "Which color {do} the {thing} in the image have?"),
  "count": ("How many shapes are in the image?", "How many shapes can you see?"),
  "shape": ("Which shape appears in the image?", "What kind of {thing} {be} shown?"),
  "position": ("Where is the shape located?", "In which part of the image is the shape?"),
  "describe": ("Describe the image.", "What does this image show?"),
}
OPENERS = (
  "Looking at the image carefully,",
  "After examining the picture,",
  "Based on what I can see in the image,",
)
LEADS = ("In short,", "To answer your question,", "So, as far as I can tell,")


def _plural(shape: str, count: int) -> str:
  return shape if count == 1 else shape + "s"


def question(qtype: str, facts: dict, variant: int) -> str:
  many = facts["count"] > 1
  text = QUESTION_TEMPLATES[qtype][variant % len(QUESTION_TEMPLATES[qtype])]
  return text.format(
    be="are" if many else "is", do="do" if many else "does", thing="shapes" if many else "shape"
  )


def noun_phrase(facts: dict) -> str:
  n = facts["count"]
  return f"{'a' if n == 1 else COUNT_WORDS[n]} {facts['color']} {_plural(facts['shape'], n)}"


def caption(facts: dict, variant: int) -> str:
  """A text-to-image prompt for the scene."""
  np_ = noun_phrase(facts)
  return (
    f"{np_[0].upper()}{np_[1:]} on a {facts['background']} background.",
    f"A picture of {np_} on a {facts['background']} background.",
  )[variant % 2]


def _counted(f: dict) -> str:
  n = f["count"]
  return f"{'a' if n == 1 else COUNT_WORDS[n]} {_plural(f['shape'], n)}"


def core_answer(qtype: str, f: dict) -> str:
  """The bare answer (what the short style says)."""
  n = f["count"]
  if qtype == "color":
    return f["color"]
  if qtype == "count":
    return COUNT_WORDS[n]
  if qtype == "shape":
    return f"a {f['shape']}" if n == 1 else _plural(f["shape"], n)
  if qtype == "position":
    return f["position"]
  return f"{_counted(f)} on a {f['background']} background, {f['color']}"


def _sentence(qtype: str, f: dict) -> str:
  n, many = f["count"], f["count"] > 1
  be, thing = ("are", "shapes") if many else ("is", "shape")
  if qtype == "color":
    return f"The {thing} {be} {f['color']}."
  if qtype == "count":
    return f"There {be} {COUNT_WORDS[n]} {thing} in the image."
  if qtype == "shape":
    return f"The {thing} {be} {core_answer('shape', f)}."
  if qtype == "position":
    return f"The {f['shape']} is in the {f['position']} corner."
  verb = "they are" if many else "it is"
  return (
    f"The image shows {_counted(f)} on a {f['background']} background, and {verb} {f['color']}."
  )


def answer(qtype: str, facts: dict, style: str, variant: int = 0) -> str:
  """An answer to a `qtype` question about a scene with these facts, in `style`.

  Every style ends with the answer sentence: the words that decide correctness sit at the same
  distance from the end of the sequence (where the reward is read) whatever the style, which a
  two-layer model learns far faster than finding them anywhere in a long answer.
  """
  core, sentence = core_answer(qtype, facts), _sentence(qtype, facts)
  if (
    style == "short"
  ):  # "Answer: red." keeps the deciding word the same token as in every other style
    return f"Answer: {core}."
  if style == "sentence":
    return sentence
  if style == "verbose":
    opener = OPENERS[variant % len(OPENERS)]
    lead = LEADS[(variant // len(OPENERS)) % len(LEADS)]
    thing = "the shapes stand" if facts["count"] > 1 else "the shape stands"
    return (
      f"{opener} {thing} out clearly against the {facts['background']} background. "
      f"{lead} {sentence[0].lower()}{sentence[1:]}"
    )
  if style == "markdown":
    return f"**Answer**\n\n- Background: {facts['background']}\n- {sentence}"
  raise ValueError(f"unknown style {style!r}")


def wrong_facts(facts: dict, attribute: str, rng: np.random.Generator) -> dict:
  """The facts with one attribute hallucinated (a different value)."""
  f = dict(facts)
  if attribute == "color":
    f["color"] = _other(rng, list(COLORS), facts["color"])
  elif attribute == "shape":
    f["shape"] = _other(rng, list(SHAPES), facts["shape"])
  elif attribute == "count":
    f["count"] = _other(rng, [1, 2, 3, 4], facts["count"])
  elif attribute == "position":
    f["position"] = _other(rng, list(POSITIONS), facts["position"])
  elif attribute == "background":
    f["background"] = _other(rng, list(BACKGROUNDS), facts["background"])
  else:
    raise ValueError(f"unknown attribute {attribute!r}")
  return f
