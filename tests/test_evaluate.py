"""Benchmark adapters and metrics against independent hand computations (plain loops over the raw
records) on the real VL-RewardBench and MM-RLHF-RewardBench metadata and on synthetic Multimodal
RewardBench records; random scores with many ties (a tie is wrong); score-file errors."""

import json
import random
from pathlib import Path

import pytest

from mrm_jax import cli
from mrm_jax.data.records import REWARD_SYSTEM_PROMPT
from mrm_jax.errors import UserError
from mrm_jax.evaluate import benchmarks, metrics
from mrm_jax.evaluate.model_eval import skipped_summary, split_missing

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
VLRB = SHARED / "vl_rewardbench" / "data.jsonl"
MMRLHF = SHARED / "mm_rlhf_rewardbench" / "mm_reward_bench.jsonl"


def _close(expected):
  """pytest.approx for nested reports (dicts of numbers and dicts)."""
  if isinstance(expected, dict):
    return {k: _close(v) for k, v in expected.items()}
  return pytest.approx(expected, rel=1e-12, abs=0)


def _need(path):
  if not path.is_file():
    pytest.skip(
      f"benchmark metadata {path} is absent (it lives in the shared folder beside the repository)"
    )


def _raw(path):
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _random_scores(n, seed):
  """Small integers: about a quarter of the pairs are ties."""
  rng = random.Random(seed)
  return [(float(rng.randint(0, 3)), float(rng.randint(0, 3))) for _ in range(n)]


def _write_scores(path, scores, ids=None):
  with open(path, "w") as f:
    for k, (c, r) in enumerate(scores):
      line = {"chosen": c, "rejected": r}
      if ids is not None:
        line["id"] = ids[k]
      f.write(json.dumps(line) + "\n")
  return path


# ----------------------------------------------------------------------------- VL-RewardBench


def _vlrb_oracle(raw, scores):
  total = {"general": 0, "hallucination": 0, "reasoning": 0}
  right = {"general": 0, "hallucination": 0, "reasoning": 0}
  for rec, (c, r) in zip(raw, scores):
    i = rec["id"]
    if i.startswith("hallucination_pair") or i.startswith("RLAIF-V") or i.startswith("RLHF-V"):
      cat = "hallucination"
    elif i.startswith("mathverse") or i.startswith("mmmu"):
      cat = "reasoning"
    else:
      cat = "general"
    total[cat] += 1
    if c > r:
      right[cat] += 1
  acc = {k: right[k] / total[k] for k in total}
  return {
    "n": len(raw),
    "overall": sum(right.values()) / len(raw),
    "macro": (acc["general"] + acc["hallucination"] + acc["reasoning"]) / 3,
    **acc,
  }, total


@pytest.mark.parametrize("seed", [0, 1])
def test_vl_rewardbench_metrics_match_oracle(tmp_path, seed):
  _need(VLRB)
  raw = _raw(VLRB)
  scores = _random_scores(len(raw), seed)
  expected, totals = _vlrb_oracle(raw, scores)
  assert totals == {
    "hallucination": 448 + 233 + 68,
    "reasoning": 167 + 151,
    "general": 1250 - 749 - 318,
  }
  items = benchmarks.load("vl_rewardbench", VLRB)
  report = metrics.report(
    "vl_rewardbench",
    items,
    metrics.read_scores(
      _write_scores(tmp_path / "s.jsonl", scores, ids=[r["id"] for r in raw]), items, VLRB
    ),
  )
  assert set(report) == {"n", "overall", "macro", "general", "hallucination", "reasoning"}
  assert report == _close(expected)


def test_vl_rewardbench_chosen_is_the_human_preferred_response():
  _need(VLRB)
  raw = _raw(VLRB)
  items = benchmarks.load("vl_rewardbench", VLRB)
  swapped = 0
  for rec, item in zip(raw, items):
    best = 0 if rec["human_ranking"] == [0, 1] else 1
    swapped += best
    assert (
      item.pair["chosen"] == rec["response"][best]
      and item.pair["rejected"] == rec["response"][1 - best]
    )
    assert item.pair["images"] == [rec["image_path"]] and item.pair["question"] == rec["query"]
  assert swapped == 5  # the five [1, 0] records


def test_constant_scores_are_all_wrong(tmp_path):
  _need(VLRB)
  items = benchmarks.load("vl_rewardbench", VLRB)
  report = metrics.report("vl_rewardbench", items, [(0.5, 0.5)] * len(items))
  assert report["overall"] == report["macro"] == 0.0


# ----------------------------------------------------------------------------- MM-RLHF-RewardBench


def _mmrlhf_oracle(raw, scores):
  pair_total, pair_right = {}, {}
  id_pairs = {}  # id -> list of right flags
  cat_id_pairs = {}  # (category, id) -> list of right flags
  for rec, (c, r) in zip(raw, scores):
    path = rec.get("image") or rec.get("video")
    cat = path.split("/")[0]
    ok = c > r
    pair_total[cat] = pair_total.get(cat, 0) + 1
    pair_right[cat] = pair_right.get(cat, 0) + (1 if ok else 0)
    id_pairs.setdefault(rec["id"], []).append(ok)
    cat_id_pairs.setdefault((cat, rec["id"]), []).append(ok)
  cats = {}
  for cat in pair_total:
    groups = [flags for (c2, _), flags in cat_id_pairs.items() if c2 == cat]
    n_all_right = 0
    for flags in groups:
      if all(flags):
        n_all_right += 1
    cats[cat] = {
      "n": pair_total[cat],
      "acc": pair_right[cat] / pair_total[cat],
      "acc_plus": n_all_right / len(groups),
    }
  n_ids_right = 0
  for flags in id_pairs.values():
    if all(flags):
      n_ids_right += 1
  return {
    "n": len(raw),
    "acc": sum(pair_right.values()) / len(raw),
    "acc_plus": n_ids_right / len(id_pairs),
    "categories": cats,
  }


@pytest.mark.parametrize("seed", [0, 3])
def test_mm_rlhf_rewardbench_metrics_match_oracle(tmp_path, seed):
  _need(MMRLHF)
  raw = _raw(MMRLHF)
  rng = random.Random(seed)
  # Mostly right so that Acc+ (all of an id's 2-6 pairs right) is not trivially zero; ties included.
  scores = [
    (float(rng.choice([1, 1, 1, 1, 1, 1, 0])), float(rng.choice([0, 0, 0, 0, 1]))) for _ in raw
  ]
  expected = _mmrlhf_oracle(raw, scores)
  assert {k: v["n"] for k, v in expected["categories"].items()} == {
    "mcq": 42,
    "long": 37,
    "short": 34,
    "safety": 32,
    "video": 25,
  }
  assert expected["acc_plus"] > 0
  items = benchmarks.load("mm_rlhf_rewardbench", MMRLHF)
  report = metrics.report(
    "mm_rlhf_rewardbench",
    items,
    metrics.read_scores(_write_scores(tmp_path / "s.jsonl", scores), items, MMRLHF),
  )
  assert report == _close(expected)
  assert list(report["categories"]) == ["mcq", "long", "short", "safety", "video"]


def test_mm_rlhf_video_items_list_their_frames_in_order(tmp_path):
  _need(MMRLHF)
  items = benchmarks.load("mm_rlhf_rewardbench", MMRLHF)
  video = next(i for i in items if i.category == "video")
  folder = tmp_path / video.video
  folder.mkdir(parents=True)
  for name in ("frame_10.jpg", "frame_2.jpg", "frame_1.jpg", "notes.txt"):
    (folder / name).write_bytes(b"x")
  assert benchmarks.missing_media(video, tmp_path) == []
  chosen, rejected = benchmarks.scoring_records(video, tmp_path)
  frames = [f"{video.video}/frame_{k}.jpg" for k in (1, 2, 10)]
  assert chosen["videos"] == rejected["videos"] == [frames] and chosen["images"] == []
  assert chosen["answer"] == video.pair["chosen"] and rejected["answer"] == video.pair["rejected"]
  assert chosen["system"] == REWARD_SYSTEM_PROMPT and chosen["question"] == video.pair["question"]


# ----------------------------------------------------------------------------- Multimodal
# RewardBench

MMRB_CATEGORIES = [
  "open_generation/correctness_task",
  "open_generation/preference_task",
  "knowledge",
  "reasoning",
  "safety",
  "vqa",
]


def _mmrb_records(n, seed):
  rng = random.Random(seed)
  recs = []
  for k in range(n):
    cat = rng.choice(MMRB_CATEGORIES)
    prefix = {
      "reasoning": rng.choice(["mathvista", "EMMA-Coding", "Math-Vision"]),
      "safety": rng.choice(["PAIRS", "pairs", "hatefulmemes"]),
    }.get(cat, "nocaps")
    recs.append(
      {
        "ID": f"{prefix}_{k}",
        "Text": f"question {k}",
        "Image": f"images/{k}.jpg",
        "Output1": f"first {k}",
        "Output2": f"second {k}",
        "Better": rng.choice(["Output1", "Output2"]),
        "Category": cat,
      }
    )
  return recs


def _mmrb_oracle(recs, scores):
  groups = {}
  for rec, (c, r) in zip(recs, scores):
    cat = rec["Category"]
    if cat == "safety":
      cat = "safety/bias" if rec["ID"].lower().startswith("pairs") else "safety/toxicity"
    if cat == "reasoning":
      cat = "reasoning/math" if rec["ID"].lower().startswith("math") else "reasoning/coding"
    groups.setdefault(cat, []).append(c > r)
  all_flags = [ok for flags in groups.values() for ok in flags]
  no_safety = [ok for cat, flags in groups.items() if not cat.startswith("safety") for ok in flags]
  return {
    "n": len(recs),
    "overall": sum(all_flags) / len(all_flags),
    "overall_without_safety": sum(no_safety) / len(no_safety),
    "categories": {
      cat: {"n": len(flags), "accuracy": sum(flags) / len(flags)} for cat, flags in groups.items()
    },
  }


@pytest.mark.parametrize("seed", [0, 5])
def test_multimodal_rewardbench_metrics_match_oracle(tmp_path, seed):
  recs = _mmrb_records(300, seed)
  data = tmp_path / "all_data.json"
  data.write_text(json.dumps(recs))  # the release is a JSON list
  scores = _random_scores(len(recs), seed + 100)
  expected = _mmrb_oracle(recs, scores)
  assert set(expected["categories"]) == {
    "open_generation/correctness_task",
    "open_generation/preference_task",
    "knowledge",
    "reasoning/math",
    "reasoning/coding",
    "safety/bias",
    "safety/toxicity",
    "vqa",
  }
  items = benchmarks.load("multimodal_rewardbench", data)
  report = metrics.report(
    "multimodal_rewardbench",
    items,
    metrics.read_scores(
      _write_scores(tmp_path / "s.jsonl", scores, ids=[r["ID"] for r in recs]), items, data
    ),
  )
  assert report == _close(expected)
  for rec, item in zip(recs, items):
    worse = "Output2" if rec["Better"] == "Output1" else "Output1"
    assert (item.pair["chosen"], item.pair["rejected"]) == (rec[rec["Better"]], rec[worse])
    assert item.pair["system"] == REWARD_SYSTEM_PROMPT


# ----------------------------------------------------------------------------- pairs and the
# command


def test_pairs_benchmark_and_command_report(tmp_path, capsys):
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text(
    "".join(
      json.dumps({"id": f"p{k}", "images": [], "question": "q", "chosen": "a", "rejected": "b"})
      + "\n"
      for k in range(4)
    )
  )
  scores = _write_scores(tmp_path / "s.jsonl", [(1.0, 0.0), (0.0, 1.0), (2.0, 2.0), (3.0, -1.0)])
  out = tmp_path / "r" / "report.json"
  assert (
    cli.main(
      [
        "evaluate",
        "--benchmark",
        "pairs",
        "--data",
        str(pairs),
        "--scores",
        str(scores),
        "--output",
        str(out),
      ]
    )
    == 0
  )
  assert json.loads(out.read_text()) == {"n": 4, "accuracy": 0.5}
  assert "accuracy" in capsys.readouterr().out


def test_command_writes_exact_report_keys(tmp_path, capsys):
  _need(MMRLHF)
  raw = _raw(MMRLHF)
  scores = _write_scores(tmp_path / "s.jsonl", _random_scores(len(raw), 7))
  out = tmp_path / "report.json"
  assert (
    cli.main(
      [
        "evaluate",
        "--benchmark",
        "mm_rlhf_rewardbench",
        "--data",
        str(MMRLHF),
        "--scores",
        str(scores),
        "--output",
        str(out),
      ]
    )
    == 0
  )
  report = json.loads(out.read_text())
  assert set(report) == {"n", "acc", "acc_plus", "categories"}
  assert all(set(v) == {"n", "acc", "acc_plus"} for v in report["categories"].values())
  fractions = [report["acc"], report["acc_plus"]] + [
    x for v in report["categories"].values() for x in (v["acc"], v["acc_plus"])
  ]
  assert all(0 <= f <= 1 for f in fractions)
  table = capsys.readouterr().out
  assert "mm_rlhf_rewardbench" in table and "video" in table and "acc+%" in table


def _pairs_file(tmp_path, n=3):
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text(
    "".join(
      json.dumps({"id": f"p{k}", "images": [], "question": "q", "chosen": "a", "rejected": "b"})
      + "\n"
      for k in range(n)
    )
  )
  return pairs


@pytest.mark.parametrize(
  "lines,message",
  [
    (
      ['{"chosen": 1, "rejected": 0}'] * 2,
      r"s\.jsonl: 2 score lines but .*pairs\.jsonl has 3 records",
    ),
    (['{"chosen": 1, "rejected": 0}'] * 4, r"s\.jsonl:4: more score lines than the 3 records"),
    (
      [
        '{"chosen": 1, "rejected": 0}',
        '{"id": "p9", "chosen": 1, "rejected": 0}',
        '{"chosen": 1, "rejected": 0}',
      ],
      r"s\.jsonl:2: id 'p9' does not match record 2 \('p1' at .*pairs\.jsonl:2\)",
    ),
    (
      [
        '{"chosen": 1, "rejected": 0}',
        '{"chosen": 1, "rejected": 0',
        '{"chosen": 1, "rejected": 0}',
      ],
      r"s\.jsonl:2: malformed JSON",
    ),
    (
      ['{"chosen": 1, "rejected": 0}', '{"chosen": 1}', '{"chosen": 1, "rejected": 0}'],
      r"s\.jsonl:2: a score line needs 'chosen' and 'rejected'",
    ),
    (
      [
        '{"chosen": 1, "rejected": 0}',
        '{"chosen": "1", "rejected": 0}',
        '{"chosen": 1, "rejected": 0}',
      ],
      r"s\.jsonl:2: 'chosen' should be a finite number",
    ),
  ],
)
def test_bad_score_files_are_one_line_errors(tmp_path, capsys, lines, message):
  import re

  pairs = _pairs_file(tmp_path)
  scores = tmp_path / "s.jsonl"
  scores.write_text("\n".join(lines) + "\n")
  out = tmp_path / "report.json"
  assert (
    cli.main(
      [
        "evaluate",
        "--benchmark",
        "pairs",
        "--data",
        str(pairs),
        "--scores",
        str(scores),
        "--output",
        str(out),
      ]
    )
    == 2
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and re.search(message, err[0]), err
  assert not out.exists()


def test_unknown_benchmark_is_an_error(tmp_path, capsys):
  pairs = _pairs_file(tmp_path)
  assert (
    cli.main(["evaluate", "--benchmark", "mmbench", "--data", str(pairs), "--scores", str(pairs)])
    == 2
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "unknown benchmark 'mmbench'" in err[0]


def test_malformed_benchmark_record_names_file_and_line(tmp_path):
  data = tmp_path / "vl.jsonl"
  good = {
    "id": "RLAIF-V-1",
    "image_path": "a.jpg",
    "query": "q",
    "response": ["x", "y"],
    "human_ranking": [0, 1],
  }
  data.write_text(json.dumps(good) + "\n" + json.dumps({**good, "response": ["x"]}) + "\n")
  with pytest.raises(UserError, match=r"vl\.jsonl:2"):
    benchmarks.load("vl_rewardbench", data)


def test_missing_images_error_or_skip(tmp_path):
  recs = [
    {
      "ID": f"{p}_{k}",
      "Text": "q",
      "Image": f"img/{k}.jpg",
      "Output1": "a",
      "Output2": "b",
      "Better": "Output1",
      "Category": c,
    }
    for k, (p, c) in enumerate(
      [
        ("pairs", "safety"),
        ("hm", "safety"),
        ("nocaps", "vqa"),
        ("math", "reasoning"),
        ("nocaps", "vqa"),
      ]
    )
  ]
  data = tmp_path / "all_data.json"
  data.write_text(json.dumps(recs))
  (tmp_path / "img").mkdir()
  for k in (0, 2):
    (tmp_path / "img" / f"{k}.jpg").write_bytes(b"x")
  items = benchmarks.load("multimodal_rewardbench", data)
  with pytest.raises(
    UserError,
    match=r"3 image files missing under .* in 3 of 5 items: .*all_data\.json:2: img/1\.jpg",
  ):
    split_missing(items, tmp_path, skip_missing=False)
  present, skipped = split_missing(items, tmp_path, skip_missing=True)
  assert [i.id for i in present] == ["pairs_0", "nocaps_2"]
  assert skipped_summary(skipped) == {
    "n": 3,
    "categories": {"reasoning/math": 1, "safety/toxicity": 1, "vqa": 1},
  }
  with pytest.raises(UserError, match="outside the image root"):
    benchmarks.missing_media(
      benchmarks.BenchItem("x", "vqa", {"images": ["../../etc/passwd"]}, "f:1"), tmp_path
    )
