"""Style-bias report and length balancing for preference pairs (DESIGN §7.5).

If a classifier that sees only surface style (length, line count, markdown markers,
digits, ...) can tell the chosen answer from the rejected one, a reward model trained on
the pairs can learn that shortcut instead of correctness. The report gives the share of
pairs whose chosen answer is longer and the cross-validated accuracy of such a probe
(logistic regression in numpy); `balance_length` downsamples so the longer answer is the
chosen one in exactly half of the pairs whose lengths differ.
"""

from __future__ import annotations

import random
import re

import numpy as np

FEATURES = (
  "log_chars",
  "log_words",
  "log_lines",
  "bullets",
  "numbered_items",
  "headers",
  "bold",
  "code_blocks",
  "log_digits",
  "digit_share",
  "sentences",
  "exclamations",
  "questions",
  "mean_word_length",
  "uppercase_share",
)

_BULLET = re.compile(r"^\s*[-*+\u2022]\s+", re.M)
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+", re.M)
_HEADER = re.compile(r"^\s*#{1,6}\s+", re.M)
_BOLD = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
_SENTENCE = re.compile(r"[.!?](?:\s|$)")


def style_features(text: str) -> np.ndarray:
  """Surface-style features of one answer (content-blind)."""
  chars = len(text)
  words = text.split()
  lines = [ln for ln in text.splitlines() if ln.strip()]
  digits = sum(ch.isdigit() for ch in text)
  letters = [ch for ch in text if ch.isalpha()]
  return np.array(
    [
      np.log1p(chars),
      np.log1p(len(words)),
      np.log1p(len(lines)),
      np.log1p(len(_BULLET.findall(text))),
      np.log1p(len(_NUMBERED.findall(text))),
      np.log1p(len(_HEADER.findall(text))),
      np.log1p(len(_BOLD.findall(text))),
      np.log1p(text.count("```") // 2),
      np.log1p(digits),
      digits / chars if chars else 0.0,
      np.log1p(len(_SENTENCE.findall(text))),
      np.log1p(text.count("!")),
      np.log1p(text.count("?")),
      (sum(len(w) for w in words) / len(words)) if words else 0.0,
      (sum(ch.isupper() for ch in letters) / len(letters)) if letters else 0.0,
    ],
    dtype=np.float64,
  )


def pair_differences(pairs: list[dict]) -> np.ndarray:
  """[n, F]: features(chosen) - features(rejected)."""
  if not pairs:
    return np.zeros((0, len(FEATURES)))
  return np.stack([style_features(p["chosen"]) - style_features(p["rejected"]) for p in pairs])


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iters: int = 50) -> np.ndarray:
  """L2-regularised logistic regression without intercept, by Newton's method."""
  w = np.zeros(x.shape[1])
  for _ in range(iters):
    p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
    grad = x.T @ (p - y) / len(y) + l2 * w
    hess = (x.T * (p * (1 - p))) @ x / len(y) + l2 * np.eye(x.shape[1])
    step = np.linalg.solve(hess, grad)
    w -= step
    if np.max(np.abs(step)) < 1e-10:
      break
  return w


def probe_accuracy(pairs: list[dict], seed: int = 0, folds: int = 5) -> float | None:
  """Cross-validated accuracy of a style-only probe telling chosen from rejected.

  Each pair enters training in both orientations (diff, 1) and (-diff, 0), so the probe has
  no side to favour and chance is exactly 0.5; folds split pairs, never orientations.
  A test pair is right when the probe scores the chosen side higher (a tie counts half).
  None when there are too few pairs to cross-validate.
  """
  n = len(pairs)
  if n < 2 * folds:
    return None
  d = pair_differences(pairs)
  perm = np.random.default_rng(seed).permutation(n)
  correct = 0.0
  for k in range(folds):
    test = perm[k::folds]
    train = np.setdiff1d(perm, test)
    scale = np.sqrt(np.mean(d[train] ** 2, axis=0))
    scale[scale == 0] = 1.0
    xtr = np.concatenate([d[train], -d[train]]) / scale
    ytr = np.concatenate([np.ones(len(train)), np.zeros(len(train))])
    w = fit_logistic(xtr, ytr)
    margin = (d[test] / scale) @ w
    correct += float(np.sum(margin > 0) + 0.5 * np.sum(margin == 0))
  return correct / n


def length_counts(pairs: list[dict]) -> dict:
  longer = sum(len(p["chosen"]) > len(p["rejected"]) for p in pairs)
  shorter = sum(len(p["chosen"]) < len(p["rejected"]) for p in pairs)
  return {
    "chosen_longer": longer,
    "chosen_shorter": shorter,
    "equal_length": len(pairs) - longer - shorter,
  }


def style_report(pairs: list[dict], seed: int = 0, folds: int = 5) -> dict:
  """{n_pairs, chosen_longer_share, chosen_longer, chosen_shorter, equal_length, probe_accuracy,
  ...}."""
  counts = length_counts(pairs)
  n = len(pairs)
  acc = probe_accuracy(pairs, seed, folds)
  return {
    "n_pairs": n,
    "chosen_longer_share": counts["chosen_longer"] / n if n else None,
    **counts,
    "probe_accuracy": acc,
    "probe_folds": folds if acc is not None else None,
    "probe_features": list(FEATURES),
  }


def balance_length(pairs: list[dict], seed: int = 0) -> list[dict]:
  """Pairs downsampled so the chosen answer is longer in exactly as many pairs as it is
  shorter (a seeded choice of which of the majority side to keep); equal-length pairs
  are all kept and the input order is preserved."""
  longer = [k for k, p in enumerate(pairs) if len(p["chosen"]) > len(p["rejected"])]
  shorter = [k for k, p in enumerate(pairs) if len(p["chosen"]) < len(p["rejected"])]
  major, minor = (longer, shorter) if len(longer) >= len(shorter) else (shorter, longer)
  drop = set(random.Random(seed).sample(major, len(major) - len(minor)))
  return [p for k, p in enumerate(pairs) if k not in drop]
