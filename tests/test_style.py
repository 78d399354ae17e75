"""The style-bias probe and length balancing (DESIGN §7.5)."""

import random

import numpy as np

from mrm_jax.construct import style

WORDS = (
  "the a cat dog sits on mat red blue two three shape square circle left right image shows".split()
)


def text(rng: random.Random, n_words: int) -> str:
  """A random answer of n_words words with random (label-independent) markdown."""
  words = [rng.choice(WORDS) for _ in range(n_words)]
  out = " ".join(words).capitalize() + "."
  r = rng.random()
  if r < 0.2:
    out = "**Answer:** " + out
  elif r < 0.35:
    out = out + "\n- " + rng.choice(WORDS) + "\n- " + rng.choice(WORDS)
  elif r < 0.45:
    out = "## Result\n" + out + f" ({rng.randint(1, 99)})"
  return out


def biased_pairs(n: int, p_longer: float, seed: int = 0) -> list[dict]:
  rng = random.Random(seed)
  pairs = []
  while len(pairs) < n:
    a, b = rng.randint(3, 40), rng.randint(3, 40)
    if a == b:
      continue
    long_, short = sorted([text(rng, a), text(rng, b)], key=len, reverse=True)
    if len(long_) == len(short):
      continue
    chosen_longer = rng.random() < p_longer
    c, r = (long_, short) if chosen_longer else (short, long_)
    pairs.append({"id": str(len(pairs)), "chosen": c, "rejected": r})
  return pairs


def test_probe_detects_length_bias_and_balancing_removes_it():
  pairs = biased_pairs(2500, p_longer=0.93)
  report = style.style_report(pairs, seed=0)
  assert report["n_pairs"] == 2500
  assert report["chosen_longer"] + report["chosen_shorter"] + report["equal_length"] == 2500
  assert 0.9 < report["chosen_longer_share"] < 0.96
  assert report["probe_accuracy"] >= 0.9

  balanced = style.balance_length(pairs, seed=1)
  counts = style.length_counts(balanced)
  assert (
    counts["chosen_longer"]
    == counts["chosen_shorter"]
    == style.length_counts(pairs)["chosen_shorter"]
  )
  assert len(balanced) > 300
  ids = [p["id"] for p in balanced]
  assert ids == sorted(ids, key=int)  # input order kept
  acc = style.probe_accuracy(balanced, seed=0)
  assert abs(acc - 0.5) <= 0.1, acc
  assert style.balance_length(pairs, seed=1) == balanced  # seeded
  assert style.balance_length(pairs, seed=2) != balanced


def test_probe_sees_markdown_not_only_length():
  """Same length distribution on both sides; the chosen one is formatted with bold and bullets."""
  rng = random.Random(5)
  pairs = []
  for _ in range(400):
    n = rng.randint(5, 30)
    plain = " ".join(rng.choice(WORDS) for _ in range(n))
    fancy_words = [rng.choice(WORDS) for _ in range(n)]
    fancy = "**" + fancy_words[0] + "**\n- " + " ".join(fancy_words[1:])
    pairs.append({"chosen": fancy, "rejected": plain})
  assert style.probe_accuracy(pairs, seed=0) >= 0.95
  # and an unbiased set stays at chance
  unbiased = [
    p if k % 2 else {"chosen": p["rejected"], "rejected": p["chosen"]}
    for k, p in enumerate(biased_pairs(800, 0.5, seed=9))
  ]
  assert abs(style.probe_accuracy(unbiased, seed=0) - 0.5) <= 0.1


def test_features_and_logistic_fit():
  f = dict(
    zip(style.FEATURES, style.style_features("## Title\n- one\n- two 42\n1. **bold** item!"))
  )
  assert (
    f["headers"] == np.log1p(1)
    and f["bullets"] == np.log1p(2)
    and f["numbered_items"] == np.log1p(1)
  )
  assert (
    f["bold"] == np.log1p(1) and f["log_digits"] == np.log1p(3) and f["log_lines"] == np.log1p(4)
  )
  # logistic regression recovers a known direction
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4000, 3))
  w_true = np.array([2.0, -1.0, 0.0])
  y = (rng.random(4000) < 1 / (1 + np.exp(-x @ w_true))).astype(float)
  w = style.fit_logistic(x, y, l2=1e-6)
  assert np.allclose(w, w_true, atol=0.15)
  assert style.probe_accuracy(biased_pairs(5, 1.0)) is None  # too few pairs to cross-validate
