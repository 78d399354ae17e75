"""Readers of DESIGN §3.3 on small fixtures written in each dataset's native layout
(parquet with image-bytes structs, JSON lists, JSON Lines), checked against hand-built pairs."""

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mrm_jax.data import readers
from mrm_jax.errors import UserError

BENCH = Path("/work/shared/benchmarks")


def _img_bytes(color, fmt="JPEG"):
  buf = io.BytesIO()
  Image.new("RGB", (8, 6), color).save(buf, format=fmt)
  return buf.getvalue()


def _hashed(data, ext):
  return hashlib.sha256(data).hexdigest()[:16] + ext


def _jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def test_image_store_content_hash_and_dedup(tmp_path):
  store = readers.ImageStore(tmp_path / "out" / "images", relative_to=tmp_path / "out")
  jpg, png = _img_bytes("red"), _img_bytes("blue", "PNG")
  assert store.put(jpg, "x:1") == "images/" + _hashed(jpg, ".jpg")
  assert store.put(png, "x:2") == "images/" + _hashed(png, ".png")
  assert store.put(jpg, "x:3") == "images/" + _hashed(jpg, ".jpg")  # same bytes, same file
  assert len(store.created) == 2
  assert (tmp_path / "out" / "images" / _hashed(jpg, ".jpg")).read_bytes() == jpg
  with pytest.raises(UserError, match="x:4: embedded image bytes are not a known image format"):
    store.put(b"not an image at all", "x:4")
  store.remove_created()
  assert not list((tmp_path / "out" / "images").iterdir())


def test_rlaif_v_parquet_with_image_struct(tmp_path):
  a, b = _img_bytes("red"), _img_bytes("green", "PNG")
  table = pa.table(
    {
      "ds_name": ["RLAIF-V", "RLAIF-V"],
      "image": [{"bytes": a, "path": "x.jpg"}, {"bytes": b, "path": None}],
      "question": ["What is it?", "Colour?"],
      "chosen": ["A cat.", "Green."],
      "rejected": ["A dog.", "Red."],
      "origin_dataset": ["OK-VQA", "VQAv2"],
      "origin_split": ['{"model":"m"}', '{"model":"n"}'],
      "idx": ["7", "8"],
      "image_path": ["rlaif/7.jpg", "rlaif/8.jpg"],
    }
  )
  pq.write_table(table, tmp_path / "train-00000.parquet")
  store = readers.ImageStore(tmp_path / "images", relative_to=tmp_path)
  got = list(readers.read(tmp_path / "train-00000.parquet", "rlaif_v", store))
  assert [w for w, _ in got] == [
    f"{tmp_path / 'train-00000.parquet'}:1",
    f"{tmp_path / 'train-00000.parquet'}:2",
  ]
  assert got[0][1] == {
    "id": "7",
    "images": ["images/" + _hashed(a, ".jpg")],
    "question": "What is it?",
    "chosen": "A cat.",
    "rejected": "A dog.",
    "source": "rlaif_v",
    "meta": {"ds_name": "RLAIF-V", "origin_dataset": "OK-VQA", "origin_split": '{"model":"m"}'},
  }
  assert got[1][1]["images"] == ["images/" + _hashed(b, ".png")]
  assert (tmp_path / "images" / _hashed(b, ".png")).read_bytes() == b


def test_rlaif_v_jsonl_with_paths_and_folder_of_shards(tmp_path):
  d = tmp_path / "rlaif"
  d.mkdir()
  _jsonl(
    d / "b.jsonl",
    [{"idx": 2, "image": "imgs/2.jpg", "question": "Q2", "chosen": "C2", "rejected": "R2"}],
  )
  _jsonl(
    d / "a.jsonl",
    [{"idx": 1, "image_path": "imgs/1.jpg", "question": "Q1", "chosen": "C1", "rejected": "R1"}],
  )
  pairs = readers.read_all(d, "rlaif_v")
  assert [(p["id"], p["images"], p["question"]) for p in pairs] == [
    ("1", ["imgs/1.jpg"], "Q1"),
    ("2", ["imgs/2.jpg"], "Q2"),
  ]


def test_rlaif_v_missing_field_names_line(tmp_path):
  f = _jsonl(
    tmp_path / "r.jsonl",
    [
      {"image": "a.jpg", "question": "Q", "chosen": "C", "rejected": "R"},
      {"image": "a.jpg", "question": "Q", "chosen": "C"},
    ],
  )
  with pytest.raises(UserError, match=r"r\.jsonl:2: missing field 'rejected'"):
    readers.read_all(f, "rlaif_v")


def test_malformed_json_names_line(tmp_path):
  f = tmp_path / "r.jsonl"
  f.write_text('{"question": "Q", "chosen": "C", "rejected": "R"}\n{"question": "Q",\n')
  with pytest.raises(UserError, match=r"r\.jsonl:2: malformed JSON"):
    readers.read_all(f, "rlaif_v")


VLF_JSON = [
  {
    "id": "svit-1",
    "prompt": "Describe the image.",
    "image_path": "svit/1.jpg",
    "models": ["m0", "m1", "m2", "m3"],
    "completions": [
      {
        "model": "m0",
        "response": "good",
        "annotations": {
          "Helpfulness": {"Rating": "5", "Rationale": ""},
          "Ethical Considerations": {"Rating": "5", "Rationale": ""},
          "Visual Faithfulness": {"Rating": "4", "Rationale": ""},
        },
      },
      {
        "model": "m1",
        "response": "bad",
        "annotations": {
          "Helpfulness": {"Rating": "2", "Rationale": ""},
          "Ethical Considerations": {"Rating": "5", "Rationale": ""},
          "Visual Faithfulness": {"Rating": "N/A", "Rationale": ""},
        },
      },
      {
        "model": "m2",
        "response": "also good",
        "annotations": {
          "Helpfulness": {"Rating": "4", "Rationale": ""},
          "Ethical Considerations": {"Rating": "5", "Rationale": ""},
          "Visual Faithfulness": {"Rating": "5", "Rationale": ""},
        },
      },
      {"model": "m3", "response": "unrated", "annotations": {}},
    ],
  }
]


def test_vlfeedback_json_list_pairs_from_rating_gaps(tmp_path):
  f = tmp_path / "vlfeedback.json"
  f.write_text(json.dumps(VLF_JSON))
  pairs = readers.read_all(f, "vlfeedback")
  # means: m0 = 14/3, m1 = 7/2 (N/A ignored), m2 = 14/3, m3 unrated → (0,1) and (1,2); (0,2) tie
  # dropped.
  assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [
    ("svit-1:0-1", "good", "bad"),
    ("svit-1:1-2", "also good", "bad"),
  ]
  assert pairs[0]["strength"] == pytest.approx(14 / 3 - 3.5)
  assert pairs[1]["meta"]["models"] == ["m2", "m1"]
  assert all(
    p["images"] == ["svit/1.jpg"] and p["question"] == "Describe the image." for p in pairs
  )


def test_vlfeedback_hf_parquet_columnar_completions(tmp_path):
  img = _img_bytes("purple")
  comps = VLF_JSON[0]["completions"][:2]
  row = {
    "id": "svit-1",
    "prompt": "Describe the image.",
    "models": ["m0", "m1"],
    "completions": {
      "model": [c["model"] for c in comps],
      "response": [c["response"] for c in comps],
      "annotations": [c["annotations"] for c in comps],
    },
    "image": {"bytes": img, "path": None},
  }
  pq.write_table(pa.Table.from_pylist([row]), tmp_path / "vlf.parquet")
  store = readers.ImageStore(tmp_path / "images", relative_to=tmp_path)
  pairs = readers.read_all(tmp_path / "vlf.parquet", "vlfeedback", store)
  assert [(p["id"], p["chosen"], p["rejected"], p["images"]) for p in pairs] == [
    ("svit-1:0-1", "good", "bad", ["images/" + _hashed(img, ".jpg")])
  ]


def test_mm_rlhf_pairs_image_and_video(tmp_path):
  f = _jsonl(
    tmp_path / "mm.jsonl",
    [
      {
        "id": "a",
        "image": "long/1.jpg",
        "prompt": "P",
        "chosen": "C",
        "rejected": "R",
        "chosen_reason": "why",
      },
      {"id": "b", "video": "video/xyz", "prompt": "V", "chosen": "C2", "rejected": "R2"},
    ],
  )
  pairs = readers.read_all(f, "mm_rlhf")
  assert pairs[0] == {
    "id": "a",
    "images": ["long/1.jpg"],
    "question": "P",
    "chosen": "C",
    "rejected": "R",
    "source": "mm_rlhf",
    "meta": {"chosen_reason": "why"},
  }
  assert pairs[1]["images"] == [] and pairs[1]["videos"] == ["video/xyz"]


def test_vl_rewardbench_real_metadata():
  f = BENCH / "vl_rewardbench" / "data.jsonl"
  raw = [json.loads(line) for line in f.open()]
  pairs = readers.read_all(f, "vl_rewardbench")
  assert len(pairs) == len(raw) == 1250
  for r, p in zip(raw, pairs):
    best = r["human_ranking"].index(min(r["human_ranking"]))
    assert (p["id"], p["images"], p["question"]) == (r["id"], [r["image_path"]], r["query"])
    assert (p["chosen"], p["rejected"]) == (r["response"][best], r["response"][1 - best])
  swapped = [p for r, p in zip(raw, pairs) if r["human_ranking"] == [1, 0]]
  assert len(swapped) == 5 and swapped[0]["chosen"] == raw[0]["response"][1]


def test_vl_rewardbench_hf_parquet_with_image(tmp_path):
  img = _img_bytes("white", "PNG")
  pq.write_table(
    pa.Table.from_pylist(
      [
        {
          "id": "mmmu-1",
          "query": "Q",
          "response": ["x", "y"],
          "human_ranking": [1, 0],
          "image": {"bytes": img, "path": "a.png"},
        }
      ]
    ),
    tmp_path / "test.parquet",
  )
  store = readers.ImageStore(tmp_path / "im", relative_to=tmp_path)
  (p,) = readers.read_all(tmp_path / "test.parquet", "vl_rewardbench", store)
  assert (p["chosen"], p["rejected"], p["images"]) == ("y", "x", ["im/" + _hashed(img, ".png")])


def test_mm_rlhf_rewardbench_real_metadata():
  f = BENCH / "mm_rlhf_rewardbench" / "mm_reward_bench.jsonl"
  raw = [json.loads(line) for line in f.open()]
  pairs = readers.read_all(f, "mm_rlhf_rewardbench")
  assert len(pairs) == 170 and len({p["id"] for p in pairs}) == 46
  for r, p in zip(raw, pairs):
    assert (p["id"], p["question"], p["chosen"], p["rejected"]) == (
      r["id"],
      r["prompt"],
      r["chosen"],
      r["rejected"],
    )
    assert p["images"] == ([r["image"]] if "image" in r else [])
    assert p.get("videos") == ([r["video"]] if "video" in r else None)
    assert p["source"] == "mm_rlhf_rewardbench"
  assert sum("videos" in p for p in pairs) == 25


def test_multimodal_rewardbench_better_picks_output(tmp_path):
  f = _jsonl(
    tmp_path / "all_data.json",
    [
      {
        "ID": "pairs-1",
        "Text": "T1",
        "Image": "img/1.png",
        "Output1": "o1",
        "Output2": "o2",
        "Better": "Output2",
        "Category": "safety",
        "Meta": {"src": "pairs"},
      },
      {
        "ID": "math-2",
        "Text": "T2",
        "Image": "img/2.png",
        "Output1": "p1",
        "Output2": "p2",
        "Better": "Output1",
        "Category": "reasoning",
        "Meta": {},
      },
    ],
  )
  pairs = readers.read_all(f, "multimodal_rewardbench")
  assert pairs[0] == {
    "id": "pairs-1",
    "images": ["img/1.png"],
    "question": "T1",
    "chosen": "o2",
    "rejected": "o1",
    "source": "multimodal_rewardbench",
    "meta": {"category": "safety", "meta": {"src": "pairs"}, "better": "Output2"},
  }
  assert (pairs[1]["chosen"], pairs[1]["rejected"]) == ("p1", "p2")
  bad = _jsonl(
    tmp_path / "bad.jsonl",
    [{"ID": "x", "Text": "T", "Image": "i", "Output1": "a", "Output2": "b", "Better": "Output3"}],
  )
  with pytest.raises(UserError, match=r"bad\.jsonl:1: 'Better' must be"):
    readers.read_all(bad, "multimodal_rewardbench")


def test_pickapic_parquet_bytes_ties_dropped(tmp_path):
  imgs = [_img_bytes(c) for c in ("red", "green", "blue", "black", "white", "gray")]
  pq.write_table(
    pa.table(
      {
        "ranking_id": [11, 12, 13],
        "caption": ["a cat", "a dog", "a tie"],
        "jpg_0": imgs[0:6:2],
        "jpg_1": imgs[1:6:2],
        "label_0": [1.0, 0.0, 0.5],
        "label_1": [0.0, 1.0, 0.5],
        "has_label": [True, True, True],
      }
    ),
    tmp_path / "train-0.parquet",
  )
  store = readers.ImageStore(tmp_path / "images", relative_to=tmp_path)
  recs = readers.read_all(tmp_path / "train-0.parquet", "pickapic", store)
  h = ["images/" + _hashed(b, ".jpg") for b in imgs]
  assert recs == [
    {
      "id": "11",
      "caption": "a cat",
      "chosen_image": h[0],
      "rejected_image": h[1],
      "source": "pickapic",
    },
    {
      "id": "12",
      "caption": "a dog",
      "chosen_image": h[3],
      "rejected_image": h[2],
      "source": "pickapic",
    },
  ]
  assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(x[7:] for x in h[:4])


def test_hpdv2_train_and_test_layouts(tmp_path):
  train = tmp_path / "train.json"
  train.write_text(
    json.dumps(
      [
        {"prompt": "p0", "image_path": ["a.jpg", "b.jpg"], "human_preference": [0, 1]},
        {"prompt": "p1", "image_path": ["c.jpg", "d.jpg"], "human_preference": [1, 0]},
        {"prompt": "p2", "image_path": ["e.jpg", "f.jpg"], "human_preference": [1, 1]},
      ]
    )
  )
  recs = readers.read_all(train, "hpdv2")
  assert [(r["caption"], r["chosen_image"], r["rejected_image"]) for r in recs] == [
    ("p0", "b.jpg", "a.jpg"),
    ("p1", "c.jpg", "d.jpg"),
  ]
  test = tmp_path / "test.json"
  test.write_text(
    json.dumps([{"id": "t", "prompt": "q", "image_path": ["x", "y", "z"], "rank": [2, 1, 2]}])
  )
  assert [
    (r["id"], r["chosen_image"], r["rejected_image"]) for r in readers.read_all(test, "hpdv2")
  ] == [("t:1-0", "y", "x"), ("t:1-2", "y", "z")]
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps([{"prompt": "q", "image_path": ["x", "y"], "human_preference": [1]}]))
  with pytest.raises(UserError, match=r"bad\.json:1: 'human_preference' must hold 2 numbers"):
    readers.read_all(bad, "hpdv2")


def test_imagereward_every_strictly_ordered_pair(tmp_path):
  f = tmp_path / "train.json"
  f.write_text(
    json.dumps(
      [
        {
          "id": "000",
          "prompt": "a fox",
          "generations": ["g0.webp", "g1.webp", "g2.webp", "g3.webp"],
          "ranking": [2, 1, 3, 2],
        }
      ]
    )
  )
  recs = readers.read_all(f, "imagereward")
  # ordered pairs (better, worse): ranks 2,1,3,2 → (1,0) (0,2) (1,2) (1,3) (3,2); (0,3) tie dropped
  assert [(r["id"], r["chosen_image"], r["rejected_image"]) for r in recs] == [
    ("000:1-0", "g1.webp", "g0.webp"),
    ("000:0-2", "g0.webp", "g2.webp"),
    ("000:1-2", "g1.webp", "g2.webp"),
    ("000:1-3", "g1.webp", "g3.webp"),
    ("000:3-2", "g3.webp", "g2.webp"),
  ]
  assert all(r["caption"] == "a fox" and r["source"] == "imagereward" for r in recs)


def test_llamafactory_json_list_and_unknown_format(tmp_path):
  f = tmp_path / "lf.json"
  f.write_text(
    json.dumps(
      [
        {
          "conversations": [{"from": "human", "value": "<image>Q"}],
          "chosen": {"from": "gpt", "value": "C"},
          "rejected": {"from": "gpt", "value": "R"},
          "images": ["a.png"],
        }
      ]
    )
  )
  assert readers.read_all(f, "llamafactory") == [
    {"id": "", "images": ["a.png"], "question": "<image>Q", "chosen": "C", "rejected": "R"}
  ]
  with pytest.raises(UserError, match="unknown format 'nope'"):
    readers.read_all(f, "nope")


def test_missing_input_and_empty_folder(tmp_path):
  with pytest.raises(UserError, match="no such file"):
    readers.read_all(tmp_path / "none.jsonl", "mm_rlhf")
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="no .parquet files in this folder"):
    readers.read_all(tmp_path / "empty", "pickapic")
