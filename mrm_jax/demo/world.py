"""The embedded synthetic world (DESIGN §11): generated, seeded, byte-identical for a seed.

Layout written by `generate_world(out_dir, cfg)` (image paths are relative to `out_dir`,
the default image root of every file in it):

  images/*.png          56×56 scenes of coloured shapes (see scenes.py), no PNG metadata
  candidates.jsonl      candidate sets {"id","images","question","reference","responses","models"}
  judgments.jsonl       K stored raw listwise judge outputs per set (DESIGN §3.2 judgment records),
                        each shown in a random order different from the stored one; some malformed
  t2i.jsonl             T2I preferences {"id","caption","chosen_image","rejected_image"}
  noisy_pairs.jsonl     an "open-source" canonical pair set with a known fraction of flipped labels
  noisy_truth.json      the ground truth kept aside: flipped ids and each pair's correct answer
  heldout_pairs.jsonl   held-out canonical pairs (the `pairs` benchmark of `mrm-jax evaluate`)
  world_truth.jsonl     ground truth for every (image, question, answer), for simulated judges
  model/                HF-style Qwen2-VL directory: config.json, tokenizer.json,
                        tokenizer_config.json (with the chat template), preprocessor_config.json;
                        no weights (random init)
  world.json            the configuration, seed and statistics

Every random choice draws from a stream named after its part (`_rng(seed, "noisy")`), so
changing one part's size never changes another part's content.

Learnability. The demo's reward model is a random-initialised two-layer Qwen2-VL that must reach
held-out accuracy of 0.9 within a few hundred CPU steps, and what it can learn that fast shaped
the world (measured with configs/demo.py; see tests/test_demo_learns.py):
- Questions ask for the colour of the shapes, or for a description whose only hallucinated
  attribute is that colour. Colour is read from the pixels within ~100 steps; count, shape and
  position questions (texts for them still exist in scenes.py) kept the model at chance for 300.
- Every pair contrasts answers in one style and wording (candidate sets come from one model; held-
  out and noisy pairs likewise), and every style ends with the deciding words, spelt as the same
  token in every style, so the difference sits at the same distance from the token the reward is
  read from. Pairs whose answers also differ in style are what this model cannot afford: with 8%
  of them (a wordier model right, a terser one wrong) it fell into "longer wins" and stopped
  learning (held-out 0.50 after 300 steps, against 0.99 without them), and length-balanced
  resampling (`construct --balance-length`) did not rescue it. The world therefore has no style
  bias for the construction report to find; its measurement is tested on fixtures that have one.
- Six colours at the corners of the RGB cube (scenes.COLORS). The pairs learnt last are mostly
  corners that differ in one channel: a demo run trained 300 steps per round took cyan for green or
  blue; a five-colour palette without cyan instead left red/purple and green/yellow wrong (round-0
  held-out 0.905), so which nearby pair stays hard depends on the draw. Training long enough is
  what closes them (configs/curate_demo.py counts epochs; the runs measured then leave at most two
  errors).
- T2I pairs are few (two-image sequences are the longest) and differ in colour only, which the
  caption names.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from collections import Counter
from pathlib import Path

import ml_collections
import numpy as np

from mrm_jax.data.records import IMAGE_PLACEHOLDER, REWARD_SYSTEM_PROMPT
from mrm_jax.demo import scenes, simjudge
from mrm_jax.errors import UserError
from mrm_jax.io import write_json, write_jsonl

# What the world asks, and why only this (see "Learnability" in the module docstring). Describe
# answers name colour, count, shape and background, but only their colour is ever hallucinated.
QUESTION_WEIGHTS = {"color": 0.8, "describe": 0.2}
ERROR_ATTRIBUTES = {"color": ("color",), "describe": ("color",)}
# Share of each answer style (verbose and markdown answers are long: they cost sequence length).
STYLE_WEIGHTS = {"short": 0.3, "sentence": 0.3, "verbose": 0.2, "markdown": 0.2}
# Share of candidate sets with two hallucinated answers (the others have one).
THREE_ANSWER_SETS = 0.2
# Generator names per answer style: the "models" field of candidate sets.
STYLE_MODELS = {
  "short": "terse-vl",
  "sentence": "plain-vl",
  "verbose": "chatty-vl",
  "markdown": "markdown-vl",
}
REFERENCE_WRONG_P = 0.1  # the judge is told the reference may be wrong; sometimes it is

SIZES = {
  # candidate sets, T2I pairs, noisy pairs, held-out pairs
  "small": (40, 10, 100, 40),
  "full": (1000, 60, 1000, 400),
}


def world_config(size: str = "full") -> ml_collections.ConfigDict:
  """The `world` section of the demo config (counts of -1 take the size's default)."""
  c = ml_collections.ConfigDict()
  c.size = size  # small | full
  c.n_candidates = -1
  c.n_t2i = -1
  c.n_noisy = -1
  c.n_heldout = -1
  c.flip_fraction = 0.2  # share of noisy pairs whose labels are flipped
  c.judge_repeats = 2  # listwise judgments per candidate set (K)
  return c


def resolve_counts(wc) -> dict:
  if wc.size not in SIZES:
    raise UserError(f"world.size must be one of {', '.join(SIZES)}, got '{wc.size}'")
  if not 0.0 <= wc.flip_fraction <= 1.0:
    raise UserError(f"world.flip_fraction must be in [0, 1], got {wc.flip_fraction}")
  if wc.judge_repeats < 1:
    raise UserError(f"world.judge_repeats must be at least 1, got {wc.judge_repeats}")
  defaults = dict(zip(("candidates", "t2i", "noisy", "heldout"), SIZES[wc.size]))
  counts = {}
  for key, default in defaults.items():
    value = wc[f"n_{key}"]
    counts[key] = default if value < 0 else int(value)
  return counts


def _rng(seed: int, stream: str) -> np.random.Generator:
  digest = int.from_bytes(hashlib.sha256(stream.encode()).digest()[:4], "little")
  return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, digest]))


class _Images:
  """Writes scenes under images/. Plain writes (no fsync per file): the world is generated
  in a staging directory that is renamed into place only when complete."""

  def __init__(self, root: Path):
    self.root = root
    (root / "images").mkdir(parents=True, exist_ok=True)
    self.count = 0

  def write(self, name: str, scene: scenes.Scene) -> str:
    rel = f"images/{name}.png"
    (self.root / rel).write_bytes(scenes.render_png(scene))
    self.count += 1
    return rel


def _qtype(rng: np.random.Generator) -> str:
  names = list(QUESTION_WEIGHTS)
  p = np.array([QUESTION_WEIGHTS[n] for n in names])
  return names[int(rng.choice(len(names), p=p / p.sum()))]


def _scene_for(rng: np.random.Generator, qtype: str) -> scenes.Scene:
  return scenes.random_scene(rng, count=1 if qtype == "position" else None)


def _wrong(
  rng: np.random.Generator, qtype: str, facts: dict, avoid: tuple[str, ...] = ()
) -> tuple[dict, str]:
  """Facts with one hallucinated attribute; `avoid` lists colours already used by other wrong
  answers."""
  attribute = str(rng.choice(ERROR_ATTRIBUTES[qtype]))
  while True:
    wrong = scenes.wrong_facts(facts, attribute, rng)
    if attribute != "color" or wrong["color"] not in avoid or len(avoid) >= len(scenes.COLORS) - 1:
      return wrong, attribute


def _styles(rng: np.random.Generator, n: int) -> list[str]:
  """n distinct styles drawn by STYLE_WEIGHTS."""
  names = list(STYLE_WEIGHTS)
  p = np.array([STYLE_WEIGHTS[x] for x in names])
  return [names[int(k)] for k in rng.choice(len(names), size=n, replace=False, p=p / p.sum())]


def _claim(qtype: str, facts: dict) -> str:
  return scenes.core_answer(qtype, facts)


def _words(text: str) -> int:
  return len(text.split())


def _truth_record(images: list[str], q: str, a: str, correct: bool) -> dict:
  return {"images": images, "question": q, "answer": a, "correct": correct}


def _asked(rng: np.random.Generator, images: _Images, name: str) -> tuple[str, dict, str, str]:
  """A question type, a new scene written as images/NAME.png, and the question about it:
  (qtype, facts, image path, question starting with the `<image>` marker)."""
  qtype = _qtype(rng)
  scene = _scene_for(rng, qtype)
  facts = scene.facts()
  img = images.write(name, scene)
  return qtype, facts, img, IMAGE_PLACEHOLDER + scenes.question(qtype, facts, int(rng.integers(2)))


def _pair_set(
  rng: np.random.Generator, images: _Images, prefix: str, n: int, truth: list[dict], source: str
) -> list[dict]:
  """n canonical pairs: chosen a correct answer, rejected a hallucinated one in the same style and
  wording, so the pair differs only in what the image decides."""
  pairs = []
  for i in range(n):
    pid = f"{prefix}-{i:05d}"
    qtype, facts, img, q = _asked(rng, images, pid)
    (style,), variant = _styles(rng, 1), int(rng.integers(9))
    chosen = scenes.answer(qtype, facts, style, variant)
    rejected = scenes.answer(qtype, _wrong(rng, qtype, facts)[0], style, variant)
    truth += [_truth_record([img], q, chosen, True), _truth_record([img], q, rejected, False)]
    pairs.append(
      {
        "id": pid,
        "images": [img],
        "system": REWARD_SYSTEM_PROMPT,
        "question": q,
        "chosen": chosen,
        "rejected": rejected,
        "source": source,
        "meta": {"type": qtype, "style": style},
      }
    )
  return pairs


def _candidates(rng: np.random.Generator, images: _Images, n: int, repeats: int, truth: list[dict]):
  """Candidate sets and their stored listwise judgments.

  A set holds a right answer and one or two hallucinated ones (THREE_ANSWER_SETS), all from one
  model: one style and wording, differing only in what the image decides. Between two wrong
  answers the judge has nothing but noise to go on; construct's `min_gap` drops those pairs.
  """
  sets, judgments, kinds = [], [], Counter()
  for i in range(n):
    cid = f"cand-{i:05d}"
    qtype, facts, img, q = _asked(rng, images, cid)
    styles = _styles(rng, 1)
    n_wrong = 2 if rng.random() < THREE_ANSWER_SETS else 1
    slots = [(styles[0], True)] + [(styles[0], False)] * n_wrong
    variants = {style: int(rng.integers(9)) for style in styles}  # one wording per style
    responses, info, used_colours = [], [], ()
    for style, correct in slots:
      f = facts
      if not correct:
        f, _ = _wrong(rng, qtype, facts, used_colours)
        used_colours += (f["color"],)
      text = scenes.answer(qtype, f, style, variants[style])
      responses.append(text)
      info.append(
        {
          "correct": correct,
          "words": _words(text),
          "style": style,
          "partly": qtype == "describe" and not correct,
          "claim": _claim(qtype, f),
          "truth": _claim(qtype, facts),
        }
      )
    n_resp = len(responses)
    perm = [int(k) for k in rng.permutation(n_resp)]
    responses = [responses[k] for k in perm]
    info = [info[k] for k in perm]
    ref_wrong = rng.random() < REFERENCE_WRONG_P
    ref_facts = _wrong(rng, qtype, facts)[0] if ref_wrong else facts
    reference = scenes.answer(qtype, ref_facts, "sentence")
    sets.append(
      {
        "id": cid,
        "images": [img],
        "question": q,
        "reference": reference,
        "responses": responses,
        "models": [STYLE_MODELS[x["style"]] for x in info],
      }
    )
    truth += [_truth_record([img], q, r, x["correct"]) for r, x in zip(responses, info)]
    ref_info = {
      "correct": not ref_wrong,
      "claim": _claim(qtype, ref_facts),
      "truth": _claim(qtype, facts),
    }
    used = {tuple(range(n_resp))}
    for _ in range(repeats):
      while (
        True
      ):  # a random order differing from the stored one (and from earlier repeats when possible)
        order = tuple(int(k) for k in rng.permutation(n_resp))
        if order not in used or (
          len(used) == math.factorial(n_resp) and order != tuple(range(n_resp))
        ):
          break
      used.add(order)
      kind = simjudge.pick_kind(rng)
      kinds[kind] += 1
      raw, scores, error = simjudge.listwise_output(rng, [info[k] for k in order], ref_info, kind)
      judgments.append(
        {
          "id": cid,
          "mode": "listwise",
          "order": list(order),
          "raw": raw,
          "scores": scores,
          "error": error,
          "judge": simjudge.JUDGE_NAME,
        }
      )
  return sets, judgments, kinds


def _t2i(rng: np.random.Generator, images: _Images, n: int) -> list[dict]:
  records = []
  for i in range(n):
    scene = scenes.random_scene(rng)
    other = scenes.alter(
      scene, "color", rng
    )  # the caption names the colour: the learnable difference
    tid = f"t2i-{i:05d}"
    # File names do not say which image is preferred.
    a, b = (scene, other) if rng.random() < 0.5 else (other, scene)
    pa, pb = images.write(f"{tid}-a", a), images.write(f"{tid}-b", b)
    good, bad = (pa, pb) if a is scene else (pb, pa)
    records.append(
      {
        "id": tid,
        "caption": scenes.caption(scene.facts(), int(rng.integers(2))),
        "chosen_image": good,
        "rejected_image": bad,
      }
    )
  return records


def _flip(rng: np.random.Generator, pairs: list[dict], fraction: float) -> tuple[list[dict], dict]:
  n_flip = int(round(fraction * len(pairs)))
  flipped = (
    set(int(k) for k in rng.choice(len(pairs), size=n_flip, replace=False)) if n_flip else set()
  )
  out, correct = [], {}
  for k, p in enumerate(pairs):
    correct[p["id"]] = p["chosen"]
    if k in flipped:
      p = {**p, "chosen": p["rejected"], "rejected": p["chosen"]}
    out.append(p)
  truth = {
    "flip_fraction": fraction,
    "n_pairs": len(pairs),
    "n_flipped": n_flip,
    "flipped_ids": sorted(pairs[k]["id"] for k in flipped),
    "correct_answer": correct,
  }
  return out, truth


def _pair_stats(pairs: list[dict]) -> dict:
  n = len(pairs)
  longer = sum(len(p["chosen"]) > len(p["rejected"]) for p in pairs)
  return {
    "n": n,
    "chosen_longer_share": round(longer / n, 4) if n else 0.0,
    "types": dict(sorted(Counter(p["meta"]["type"] for p in pairs).items())),
  }


def generate_world(out_dir: str | Path, cfg: ml_collections.ConfigDict, progress=None) -> dict:
  """Writes the world into `out_dir` (see the module docstring) and returns its statistics.

  `cfg` is the demo config: `cfg.seed` and `cfg.world` (see `world_config`). `progress(name)`,
  when given, is called as each part starts.
  """
  from mrm_jax.demo import model_dir  # noqa: PLC0415 - keeps world generation light until needed

  out = Path(out_dir)
  counts = resolve_counts(cfg.world)
  seed = int(cfg.seed)
  step = progress or (lambda name: None)
  images = _Images(out)
  truth: list[dict] = []

  step("candidate sets and judge outputs")
  sets, judgments, kinds = _candidates(
    _rng(seed, "candidates"), images, counts["candidates"], int(cfg.world.judge_repeats), truth
  )
  write_jsonl(out / "candidates.jsonl", sets)
  write_jsonl(out / "judgments.jsonl", judgments)

  step("T2I pairs")
  t2i = _t2i(_rng(seed, "t2i"), images, counts["t2i"])
  write_jsonl(out / "t2i.jsonl", t2i)

  step("noisy pairs")
  clean = _pair_set(_rng(seed, "noisy"), images, "noisy", counts["noisy"], truth, "world-noisy")
  noisy, noisy_truth = _flip(_rng(seed, "flip"), clean, float(cfg.world.flip_fraction))
  write_jsonl(out / "noisy_pairs.jsonl", noisy)
  write_json(out / "noisy_truth.json", noisy_truth)

  step("held-out pairs")
  heldout = _pair_set(
    _rng(seed, "heldout"), images, "heldout", counts["heldout"], truth, "world-heldout"
  )
  write_jsonl(out / "heldout_pairs.jsonl", heldout)
  write_jsonl(out / "world_truth.jsonl", truth)

  step("tokenizer and model directory")
  model_info = model_dir.write_model_dir(out / "model")

  valid = sum(j["scores"] is not None for j in judgments)
  stats = {
    "seed": seed,
    "config": cfg.world.to_dict(),
    "image_size": scenes.IMAGE_SIZE,
    "images": images.count,
    "candidates": {"n": len(sets), "responses": sum(len(s["responses"]) for s in sets)},
    "judgments": {"n": len(judgments), "valid": valid, "kinds": dict(sorted(kinds.items()))},
    "t2i": {"n": len(t2i)},
    "noisy": {
      **_pair_stats(clean),
      "flipped": noisy_truth["n_flipped"],
      "flip_fraction": noisy_truth["flip_fraction"],
    },
    "heldout": _pair_stats(heldout),
    "model": model_info,
  }
  write_json(out / "world.json", stats)
  return stats


def ensure_world(workdir: Path, cfg) -> tuple[Path, dict, bool]:
  """WORKDIR/world for this config: reused when its world.json matches, else generated. Returns
  (path, stats, reused)."""
  target = workdir / "world"
  stats_path = target / "world.json"
  if stats_path.is_file():
    try:
      stats = json.loads(stats_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
      stats = {}
    if stats.get("seed") == int(cfg.seed) and stats.get("config") == cfg.world.to_dict():
      return target, stats, True
  staging = workdir / ".world.partial"
  shutil.rmtree(staging, ignore_errors=True)
  stats = generate_world(
    staging, cfg, progress=lambda name: print(f"[world] {name}", file=sys.stderr)
  )
  if target.exists():
    shutil.rmtree(target)
  staging.rename(target)
  return target, stats, False
