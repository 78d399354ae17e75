"""The embedded world (DESIGN §11): determinism, ground truth checked against the pixels,
judge outputs checked against an independent parser, label noise, tokenizer and model dir."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mrm_jax.demo import scenes, simjudge
from mrm_jax.demo.config import load_demo_config
from mrm_jax.demo.world import generate_world

SMALL = [
  "--config.world.size=small",
  "--config.world.n_candidates=24",
  "--config.world.n_t2i=12",
  "--config.world.n_noisy=60",
  "--config.world.n_heldout=20",
]


def _cfg(seed=0, extra=()):
  return load_demo_config("demo", SMALL + list(extra), seed=seed)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  out = tmp_path_factory.mktemp("world")
  generate_world(out, _cfg(seed=7))
  return out


def _tree(root: Path) -> dict:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path):
  return [
    json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()
  ]


# ---------------------------------------------------------------------------------------------
# An oracle that reads a scene back from the PNG pixels, knowing only the palette.


def read_scene(path) -> dict:
  a = np.asarray(Image.open(path).convert("RGB")).astype(int)
  assert a.shape == (56, 56, 3)
  bg = tuple(a[0, 0])
  background = [n for n, c in scenes.BACKGROUNDS.items() if c == bg]
  assert len(background) == 1, f"{path}: unknown background {bg}"
  colours = {tuple(p) for p in a.reshape(-1, 3)} - {bg}
  assert len(colours) == 1, f"{path}: expected one shape colour, got {colours}"
  (rgb,) = colours
  color = [n for n, c in scenes.COLORS.items() if c == rgb][0]
  mask = np.all(a == rgb, axis=-1)
  cells, kinds = [], set()
  for cell in range(4):
    m = mask[(cell // 2) * 28 : (cell // 2) * 28 + 28, (cell % 2) * 28 : (cell % 2) * 28 + 28]
    if not m.any():
      continue
    cells.append(cell)
    ys, xs = np.nonzero(m)
    fill = m.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    kinds.add("square" if fill > 0.92 else "circle" if fill > 0.65 else "triangle")
  assert len(kinds) == 1, f"{path}: mixed shapes {kinds}"
  return {
    "color": color,
    "shape": kinds.pop(),
    "count": len(cells),
    "background": background[0],
    "position": scenes.POSITIONS[cells[0]] if len(cells) == 1 else None,
  }


def _qtype(question: str, facts: dict) -> str:
  q = question.replace("<image>", "")
  types = [t for t in scenes.QUESTION_TYPES for v in (0, 1) if scenes.question(t, facts, v) == q]
  assert types, q
  return types[0]


def _true_answers(qtype: str, facts: dict) -> set:
  return {scenes.answer(qtype, facts, s, v) for s in scenes.STYLES for v in range(9)}


# ---------------------------------------------------------------------------------------------


def test_answer_templates_hand_checked():
  f = {"color": "red", "shape": "circle", "count": 2, "background": "white", "position": None}
  assert scenes.answer("color", f, "short") == "Answer: red."
  assert scenes.answer("count", f, "sentence") == "There are two shapes in the image."
  assert scenes.answer("shape", f, "short") == "Answer: circles."
  assert scenes.answer("describe", f, "sentence") == (
    "The image shows two circles on a white background, and they are red."
  )
  assert scenes.answer("describe", f, "short") == "Answer: two circles on a white background, red."
  assert scenes.answer("color", f, "verbose", 0) == (
    "Looking at the image carefully, the shapes stand out clearly against the white background. "
    "In short, the shapes are red."
  )
  assert scenes.answer("color", f, "verbose", 4) == (
    "After examining the picture, the shapes stand out clearly against the white background. "
    "To answer your question, the shapes are red."
  )
  assert (
    scenes.answer("color", f, "markdown")
    == "**Answer**\n\n- Background: white\n- The shapes are red."
  )
  one = {
    "color": "blue",
    "shape": "triangle",
    "count": 1,
    "background": "gray",
    "position": "top right",
  }
  assert scenes.answer("position", one, "sentence") == "The triangle is in the top right corner."
  assert scenes.answer("shape", one, "short") == "Answer: a triangle."
  assert scenes.answer("describe", one, "markdown") == (
    "**Answer**\n\n- Background: gray\n- The image shows a triangle on a gray background, and it "
    "is blue."
  )
  assert scenes.question("color", one, 0) == "What color is the shape?"
  assert scenes.caption(one, 1) == "A picture of a blue triangle on a gray background."
  # Every style ends with the words that decide correctness, spelt the same way (one token).
  for style in scenes.STYLES:
    for qtype in ("color", "describe"):
      assert scenes.answer(qtype, one, style, 7).endswith(" blue.")


def test_world_is_byte_identical_for_a_seed_and_differs_across_seeds(tmp_path, world):
  generate_world(tmp_path / "again", _cfg(seed=7))
  a, b = _tree(world), _tree(tmp_path / "again")
  assert sorted(a) == sorted(b)
  assert [k for k in a if a[k] != b[k]] == []
  generate_world(tmp_path / "other", _cfg(seed=8))
  c = _tree(tmp_path / "other")
  for name in (
    "candidates.jsonl",
    "judgments.jsonl",
    "noisy_pairs.jsonl",
    "heldout_pairs.jsonl",
    "t2i.jsonl",
  ):
    assert a[name] != c[name], name
  differing_images = sum(a[k] != c.get(k) for k in a if k.startswith("images/"))
  assert differing_images > 0.8 * sum(k.startswith("images/") for k in a)
  # The tokenizer and model directory are the same for every seed (trained on all world texts).
  assert a["model/tokenizer.json"] == c["model/tokenizer.json"]


def test_pairs_agree_with_the_pixels(world):
  for name in ("noisy_pairs.jsonl", "heldout_pairs.jsonl"):
    truth = json.loads((world / "noisy_truth.json").read_text())
    for p in _jsonl(world / name):
      facts = read_scene(world / p["images"][0])
      correct = _true_answers(_qtype(p["question"], facts), facts)
      flipped = p["id"] in truth["flipped_ids"]
      assert (p["rejected"] if flipped else p["chosen"]) in correct, p
      assert (p["chosen"] if flipped else p["rejected"]) not in correct, p
      assert p["question"].startswith("<image>") and p["system"]
      # Same style and wording: the two answers differ only in the hallucinated colour.
      assert (
        _mask_colours(p["chosen"]) == _mask_colours(p["rejected"]) and p["chosen"] != p["rejected"]
      ), p


def _mask_colours(text: str) -> str:
  return re.sub(
    "|".join(scenes.COLORS),
    "<colour>",
    re.sub("|".join(c.capitalize() for c in scenes.COLORS), "<Colour>", text),
  )


def test_world_truth_agrees_with_the_pixels(world):
  records = _jsonl(world / "world_truth.jsonl")
  assert len(records) == 2 * 60 + 2 * 20 + sum(
    len(s["responses"]) for s in _jsonl(world / "candidates.jsonl")
  )
  for r in records:
    facts = read_scene(world / r["images"][0])
    assert (r["answer"] in _true_answers(_qtype(r["question"], facts), facts)) == r["correct"], r


def test_candidate_sets(world):
  sets = _jsonl(world / "candidates.jsonl")
  truth = {
    (r["images"][0], r["question"], r["answer"]): r["correct"]
    for r in _jsonl(world / "world_truth.jsonl")
  }
  styles_seen, n_answers = set(), []
  for s in sets:
    assert set(s) == {"id", "images", "question", "reference", "responses", "models"}
    assert 2 <= len(s["responses"]) <= 3 and len(set(s["responses"])) == len(s["responses"])
    assert len(s["models"]) == len(s["responses"])
    flags = [truth[(s["images"][0], s["question"], r)] for r in s["responses"]]
    assert any(flags) and not all(flags)
    # One model (style and wording) per set: its answers differ only in the colour they name.
    assert len(set(s["models"])) == 1
    assert len({_mask_colours(r) for r in s["responses"]}) == 1 and sum(flags) == 1
    n_answers.append(len(s["responses"]))
    styles_seen.update(s["models"])
  assert 0.1 < n_answers.count(3) / len(sets) < 0.3
  assert styles_seen == {"terse-vl", "plain-vl", "chatty-vl", "markdown-vl"}
  lengths = [len(r) for s in sets for r in s["responses"]]
  assert max(lengths) > 5 * min(lengths)  # style variants of very different length


def test_constructed_pairs_contrast_right_and_wrong_in_one_style(tmp_path):
  from mrm_jax.construct.pairs import construct_files
  from mrm_jax.curate.config import curate_config

  out = tmp_path / "w"
  generate_world(
    out,
    _cfg(
      seed=3,
      extra=[
        "--config.world.n_candidates=240",
        "--config.world.n_t2i=1",
        "--config.world.n_noisy=2",
        "--config.world.n_heldout=2",
      ],
    ),
  )
  truth = {
    (r["images"][0], r["question"], r["answer"]): r["correct"]
    for r in _jsonl(out / "world_truth.jsonl")
  }
  kinds = {}
  for min_gap in (0.5, curate_config().min_gap):
    pairs, _ = construct_files(out / "candidates.jsonl", out / "judgments.jsonl", min_gap)
    kinds[min_gap] = [
      (
        truth[(p["images"][0], p["question"], p["chosen"])],
        truth[(p["images"][0], p["question"], p["rejected"])],
      )
      for p in pairs
    ]
    assert all(
      _mask_colours(p["chosen"]) == _mask_colours(p["rejected"]) for p in pairs
    )  # never a style contrast
  loose, world_gap = kinds[0.5], kinds[curate_config().min_gap]
  # Two wrong answers differ only by judge noise and misreads: the world's min_gap drops most of
  # those pairs and (almost) no right-vs-wrong one.
  assert loose.count((False, False)) > 2 * world_gap.count((False, False))
  assert world_gap.count((True, False)) > 0.97 * loose.count((True, False))
  assert world_gap.count((True, False)) > 0.9 * len(world_gap) and world_gap.count(
    (False, True)
  ) < 0.02 * len(world_gap)


def _repair_parse(raw: str) -> list[float]:
  """An independent robust parser: strip wrappers, trailing commas and stray backslashes."""
  text = raw[raw.index("{") : raw.rindex("}") + 1]
  text = re.sub(r",(\s*[}\]])", r"\1", text)
  text = re.sub(r'\\(?![\\"/bfnrtu])', r"\\\\", text)
  obj = json.loads(text)
  return [
    float(obj[f"Assistant {k}"]["Overall Score"])
    for k in range(1, 1 + sum(k.startswith("Assistant ") for k in obj))
  ]


def test_stored_judgments_match_an_independent_parser(world):
  sets = {s["id"]: s for s in _jsonl(world / "candidates.jsonl")}
  truth = {
    (r["images"][0], r["question"], r["answer"]): r["correct"]
    for r in _jsonl(world / "world_truth.jsonl")
  }
  judgments = _jsonl(world / "judgments.jsonl")
  assert len(judgments) == 2 * len(sets)
  malformed_valid = invalid = 0
  by_correct = {True: [], False: []}
  orders = {}
  for j in judgments:
    s = sets[j["id"]]
    n = len(s["responses"])
    assert j["mode"] == "listwise" and j["judge"] == simjudge.JUDGE_NAME
    assert sorted(j["order"]) == list(range(n)) and j["order"] != list(range(n))
    orders.setdefault(j["id"], []).append(tuple(j["order"]))
    try:
      parsed = _repair_parse(j["raw"])
    except (ValueError, KeyError):
      parsed = None
    if j["scores"] is None:
      invalid += 1
      assert j["error"] and (parsed is None or len(parsed) != n), j
      continue
    assert j["error"] is None and parsed == j["scores"], j
    try:
      json.loads(j["raw"])
    except json.JSONDecodeError:
      malformed_valid += 1
    for k, score in enumerate(j["scores"]):
      by_correct[truth[(s["images"][0], s["question"], s["responses"][j["order"][k]])]].append(
        score
      )
  assert malformed_valid > 0 and invalid > 0
  # The K orders differ from each other where the set has enough orders (two answers have one).
  assert all(len(set(o)) == len(o) for o in orders.values() if len(o[0]) > 2)
  assert any(len(o[0]) > 2 for o in orders.values())
  assert np.mean(by_correct[True]) > np.mean(by_correct[False]) + 3


def test_simulated_judge_has_a_mild_length_bias():
  rng = np.random.default_rng(0)
  long_ = np.mean([simjudge.response_score(rng, True, 35)[2] for _ in range(3000)])
  short = np.mean([simjudge.response_score(rng, True, 2)[2] for _ in range(3000)])
  assert 1.0 < long_ - short < 1.7  # 0.04 points per word
  wrong_long = np.mean([simjudge.response_score(rng, False, 35)[2] for _ in range(3000)])
  assert short - wrong_long > 3.5  # correctness dominates


def test_t2i_pairs_agree_with_the_pixels(world):
  records = _jsonl(world / "t2i.jsonl")
  assert len(records) == 12
  for r in records:
    assert set(r) == {"id", "caption", "chosen_image", "rejected_image"}
    good, bad = read_scene(world / r["chosen_image"]), read_scene(world / r["rejected_image"])
    assert r["caption"] in {scenes.caption(good, v) for v in (0, 1)}
    assert r["caption"] not in {scenes.caption(bad, v) for v in (0, 1)}
    assert sum(good[k] != bad[k] for k in ("color", "shape", "count", "background")) == 1


@pytest.mark.parametrize("fraction", [0.2, 0.35])
def test_label_noise_fraction_is_as_configured(tmp_path, fraction):
  out = tmp_path / "w"
  generate_world(
    out,
    _cfg(
      seed=1,
      extra=[
        f"--config.world.flip_fraction={fraction}",
        "--config.world.n_candidates=3",
        "--config.world.n_t2i=1",
      ],
    ),
  )
  truth = json.loads((out / "noisy_truth.json").read_text())
  pairs = _jsonl(out / "noisy_pairs.jsonl")
  flipped = {p["id"] for p in pairs if p["chosen"] != truth["correct_answer"][p["id"]]}
  assert flipped == set(truth["flipped_ids"])
  assert len(flipped) == round(fraction * 60) == truth["n_flipped"]
  assert truth["flip_fraction"] == fraction and truth["n_pairs"] == 60
  stats = json.loads((out / "world.json").read_text())
  assert stats["noisy"]["flipped"] == len(flipped)


# ---------------------------------------------------------------------------------------------
# Tokenizer and model directory


def _texts(world):
  texts = []
  for s in _jsonl(world / "candidates.jsonl"):
    texts += [s["question"], s["reference"], *s["responses"]]
  for p in _jsonl(world / "heldout_pairs.jsonl"):
    texts += [p["system"], p["question"], p["chosen"], p["rejected"]]
  texts += [r["caption"] for r in _jsonl(world / "t2i.jsonl")]
  return texts


def test_tokenizer_round_trips_and_matches_transformers(world):
  from tokenizers import Tokenizer
  from transformers import AutoTokenizer

  raw = Tokenizer.from_file(str(world / "model" / "tokenizer.json"))
  hf = AutoTokenizer.from_pretrained(str(world / "model"))
  texts = _texts(world)
  lengths = []
  for text in texts:
    ids = raw.encode(text).ids
    assert raw.decode(ids) == text
    assert hf(text)["input_ids"] == ids  # transformers rebuilds Qwen2's pipeline: must agree
    assert hf.decode(ids) == text
    lengths.append(len(ids))
  assert np.mean(lengths) < 0.35 * np.mean(
    [len(t.encode()) for t in texts]
  )  # BPE really compresses
  for token in (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
  ):
    assert raw.encode(token).ids == [raw.token_to_id(token)]
    assert raw.token_to_id(token) >= raw.get_vocab_size() - 14


def test_chat_template_renders_the_reward_model_turns(world):
  from transformers import AutoTokenizer

  hf = AutoTokenizer.from_pretrained(str(world / "model"))
  messages = [
    {"role": "system", "content": "SYS"},
    {
      "role": "user",
      "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}],
    },
    {"role": "assistant", "content": "Red."},
  ]
  text = hf.apply_chat_template(messages, tokenize=False)
  assert text == (
    "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
    "What color is the shape?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n"
  )
  ids = hf.apply_chat_template(messages, tokenize=True)
  ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
  assert hf.convert_ids_to_tokens(ids[-2:]) == [
    "<|im_end|>",
    "Ċ",
  ]  # the reward head reads this newline
  # Without a system message the template adds Qwen's default one.
  default = hf.apply_chat_template(messages[1:], tokenize=False)
  assert default.startswith(
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
  )


def test_model_dir_loads_like_a_qwen2_vl_checkpoint(world, tmp_path):
  from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

  model = world / "model"
  cfg = AutoConfig.from_pretrained(str(model))
  tok = AutoTokenizer.from_pretrained(str(model))
  assert cfg.model_type == "qwen2_vl"
  assert cfg.text_config.vocab_size >= len(tok) and cfg.text_config.vocab_size % 64 == 0
  for attr, token in (
    ("image_token_id", "<|image_pad|>"),
    ("video_token_id", "<|video_pad|>"),
    ("vision_start_token_id", "<|vision_start|>"),
    ("vision_end_token_id", "<|vision_end|>"),
  ):
    assert getattr(cfg, attr) == tok.convert_tokens_to_ids(token)
  assert cfg.vision_config.hidden_size == cfg.text_config.hidden_size
  head_dim = cfg.text_config.hidden_size // cfg.text_config.num_attention_heads
  assert sum(cfg.text_config.rope_parameters["mrope_section"]) == head_dim // 2
  # transformers writes back exactly what we wrote (same layout), apart from its version stamp.
  cfg.save_pretrained(str(tmp_path))
  ours = json.loads((model / "config.json").read_text())
  theirs = json.loads((tmp_path / "config.json").read_text())
  theirs.pop("transformers_version")
  assert ours == theirs
  proc = AutoImageProcessor.from_pretrained(str(model))
  out = proc(images=[Image.open(world / "images" / "heldout-00000.png")], return_tensors="np")
  assert out["image_grid_thw"].tolist() == [[1, 4, 4]]  # 56×56 kept: 16 patches, 4 image tokens
  assert out["pixel_values"].shape == (16, 3 * 2 * 14 * 14)
