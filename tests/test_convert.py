"""`mrm-jax convert`: round trips, output formats, atomic failure, CLI errors."""

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mrm_jax import cli
from mrm_jax.construct import convert as convert_lib
from mrm_jax.data import records
from mrm_jax.errors import UserError

LF_RECORDS = [
  {
    "conversations": [{"from": "human", "value": "<image>What colour is the cube?"}],
    "chosen": {"from": "gpt", "value": "Red."},
    "rejected": {"from": "gpt", "value": "Blue."},
    "images": ["scenes/1.png"],
  },
  {
    "id": "p2",
    "conversations": [{"from": "human", "value": "Image 1: <image>\nImage 2: <image>\nWhich?"}],
    "chosen": {"from": "gpt", "value": "Image 2 is better than Image 1."},
    "rejected": {"from": "gpt", "value": "Image 1 is better than Image 2."},
    "images": ["a.png", "b.png"],
    "system": "You judge images.",
    "tag": {"round": 1},
  },
  {
    "conversations": [{"from": "human", "value": "No image here"}],
    "chosen": {"from": "gpt", "value": "ok"},
    "rejected": {"from": "gpt", "value": ""},
    "images": [],
  },
]


def _read(path):
  return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("as_list", [True, False])
def test_llamafactory_canonical_llamafactory_round_trip(tmp_path, as_list):
  src = tmp_path / ("lf.json" if as_list else "lf.jsonl")
  src.write_text(
    json.dumps(LF_RECORDS) if as_list else "".join(json.dumps(r) + "\n" for r in LF_RECORDS)
  )
  assert (
    cli.main(
      [
        "convert",
        "--input",
        str(src),
        "--from",
        "llamafactory",
        "--output",
        str(tmp_path / "c.jsonl"),
      ]
    )
    == 0
  )
  canonical = _read(tmp_path / "c.jsonl")
  assert canonical[1] == {
    "id": "p2",
    "images": ["a.png", "b.png"],
    "question": LF_RECORDS[1]["conversations"][0]["value"],
    "chosen": "Image 2 is better than Image 1.",
    "rejected": "Image 1 is better than Image 2.",
    "system": "You judge images.",
    "meta": {"llamafactory": {"tag": {"round": 1}}},
  }
  assert (
    cli.main(
      [
        "convert",
        "--input",
        str(tmp_path / "c.jsonl"),
        "--from",
        "canonical",
        "--output",
        str(tmp_path / "back.jsonl"),
        "--format",
        "llamafactory",
      ]
    )
    == 0
  )
  # `system` is always written ("" = none), so a dataset_info.json mapping it works on every file
  assert _read(tmp_path / "back.jsonl") == [
    {**r, "system": r.get("system", "")} for r in LF_RECORDS
  ]


def test_llamafactory_output_adds_missing_placeholders(tmp_path):
  src = tmp_path / "mm.jsonl"
  src.write_text(
    json.dumps({"id": "a", "image": "x.jpg", "prompt": "Describe.", "chosen": "C", "rejected": "R"})
    + "\n"
  )
  convert_lib.convert(src, "mm_rlhf", tmp_path / "lf.jsonl", "llamafactory")
  (rec,) = _read(tmp_path / "lf.jsonl")
  assert rec["conversations"] == [{"from": "human", "value": "<image>Describe."}]
  assert rec["images"] == ["x.jpg"] and rec["chosen"] == {"from": "gpt", "value": "C"}


def _jpeg(color):
  buf = io.BytesIO()
  Image.new("RGB", (4, 4), color).save(buf, format="JPEG")
  return buf.getvalue()


def test_embedded_images_extracted_beside_output(tmp_path):
  img = _jpeg("red")
  pq.write_table(
    pa.table(
      {
        "image": [{"bytes": img, "path": None}],
        "question": ["Q"],
        "chosen": ["C"],
        "rejected": ["R"],
        "idx": [3],
      }
    ),
    tmp_path / "r.parquet",
  )
  out = tmp_path / "out" / "pairs.jsonl"
  assert (
    cli.main(
      ["convert", "--input", str(tmp_path / "r.parquet"), "--from", "rlaif_v", "--output", str(out)]
    )
    == 0
  )
  (pair,) = _read(out)
  assert pair["images"][0].startswith("images/") and pair["images"][0].endswith(".jpg")
  assert (out.parent / pair["images"][0]).read_bytes() == img


def test_failed_conversion_leaves_nothing(tmp_path, capsys):
  good = {
    "image": {"bytes": _jpeg("blue"), "path": None},
    "question": "Q",
    "chosen": "C",
    "rejected": "R",
    "idx": 1,
  }
  bad = {
    "image": {"bytes": _jpeg("green"), "path": None},
    "question": None,
    "chosen": "C",
    "rejected": "R",
    "idx": 2,
  }
  pq.write_table(pa.Table.from_pylist([good, bad]), tmp_path / "r.parquet")
  out = tmp_path / "out" / "pairs.jsonl"
  out.parent.mkdir()
  out.write_text("previous good output\n")
  rc = cli.main(
    ["convert", "--input", str(tmp_path / "r.parquet"), "--from", "rlaif_v", "--output", str(out)]
  )
  err = capsys.readouterr().err.strip()
  assert (
    rc == 2
    and err == f"mrm-jax convert: error: {tmp_path / 'r.parquet'}:2: missing field 'question'"
  )
  assert out.read_text() == "previous good output\n"
  assert sorted(p.name for p in out.parent.iterdir()) == ["images", "pairs.jsonl"]
  assert list((out.parent / "images").iterdir()) == []  # the image extracted for row 1 was removed


def test_malformed_json_error_names_line(tmp_path, capsys):
  src = tmp_path / "pairs.jsonl"
  src.write_text(json.dumps({"question": "Q", "chosen": "C", "rejected": "R"}) + "\n{broken\n")
  rc = cli.main(
    ["convert", "--input", str(src), "--from", "canonical", "--output", str(tmp_path / "o.jsonl")]
  )
  assert rc == 2 and f"{src}:2: malformed JSON" in capsys.readouterr().err
  assert not (tmp_path / "o.jsonl").exists()


def test_image_dir_must_be_inside_output_folder(tmp_path):
  src = tmp_path / "p.jsonl"
  src.write_text(json.dumps({"question": "Q", "chosen": "C", "rejected": "R"}) + "\n")
  with pytest.raises(UserError, match="must lie inside the output's folder"):
    convert_lib.convert(
      src, "canonical", tmp_path / "o" / "x.jsonl", image_dir=tmp_path / "elsewhere"
    )


def test_help_lists_formats(capsys):
  with pytest.raises(SystemExit):
    cli.main(["convert", "--help"])
  out = capsys.readouterr().out
  assert "--from" in out and "multimodal_rewardbench" in out and "llamafactory" in out


def test_t2i_native_format_becomes_balanced_two_image_pairs(tmp_path):
  imgs = [_jpeg(c) for c in ("red", "green", "blue", "white", "black", "gray")]
  pq.write_table(
    pa.table(
      {
        "ranking_id": [1, 2, 3],
        "caption": ["a cat", "a dog", "a fox"],
        "jpg_0": imgs[0:6:2],
        "jpg_1": imgs[1:6:2],
        "label_0": [1.0, 0.0, 1.0],
        "label_1": [0.0, 1.0, 0.0],
      }
    ),
    tmp_path / "pick.parquet",
  )
  out = tmp_path / "out" / "pairs.jsonl"
  assert (
    cli.main(
      [
        "convert",
        "--input",
        str(tmp_path / "pick.parquet"),
        "--from",
        "pickapic",
        "--output",
        str(out),
        "--seed",
        "3",
      ]
    )
    == 0
  )
  pairs = _read(out)
  assert [p["id"] for p in pairs] == ["1", "2", "3"]
  preferred = {"1": imgs[0], "2": imgs[3], "3": imgs[4]}
  firsts = 0
  for p in pairs:
    assert (
      len(p["images"]) == 2
      and p["question"].count("<image>") == 2
      and p["meta"]["caption"] in p["question"]
    )
    pos = [(out.parent / im).read_bytes() for im in p["images"]].index(preferred[p["id"]]) + 1
    assert p["chosen"].startswith(f"Image {pos} is better") and p["rejected"].startswith(
      f"Image {3 - pos} is better"
    )
    firsts += pos == 1
  assert firsts in (1, 2)  # floor(3/2) or ceil(3/2) shown first


CANONICAL_PAIRS = [
  {
    "id": "c1",
    "images": ["img/a.png"],
    "question": "<image>Which colour?",
    "chosen": "Red.",
    "rejected": "Blue.",
    "strength": 1.75,
    "source": "debiased",
    "meta": {"candidate": "x", "n": [1, 2]},
  },
  {
    "id": "c2",
    "images": ["img/a.png", "img/b.png"],
    "system": "S",
    "question": "Compare.",
    "chosen": "A",
    "rejected": "B",
    "flipped": True,
    "meta": {"llamafactory": {"tag": 1}, "k": 2},
  },
  {"id": "", "images": [], "system": "", "question": "Text only", "chosen": "y", "rejected": "n"},
]


def test_canonical_llamafactory_canonical_is_lossless(tmp_path):
  """strength / source / meta / any other field travel in a side field LLaMA-Factory drops; every
  record has `system`; placeholders added for LLaMA-Factory are taken off again."""
  src = tmp_path / "c.jsonl"
  src.write_text("".join(json.dumps(r) + "\n" for r in CANONICAL_PAIRS))
  lf = tmp_path / "lf.jsonl"
  assert (
    cli.main(
      [
        "convert",
        "--input",
        str(src),
        "--from",
        "canonical",
        "--output",
        str(lf),
        "--format",
        "llamafactory",
      ]
    )
    == 0
  )
  recs = _read(lf)
  assert [r["system"] for r in recs] == ["", "S", ""]
  assert recs[1]["conversations"][0]["value"] == "<image><image>Compare." and recs[1]["tag"] == 1
  assert all(isinstance(r[records.SIDE_FIELD], str) for r in recs)  # one string column for Arrow
  assert json.loads(recs[0][records.SIDE_FIELD]) == {
    "strength": 1.75,
    "source": "debiased",
    "meta": {"candidate": "x", "n": [1, 2]},
  }
  back = tmp_path / "back.jsonl"
  assert (
    cli.main(["convert", "--input", str(lf), "--from", "llamafactory", "--output", str(back)]) == 0
  )
  assert _read(back) == CANONICAL_PAIRS
  assert records.read_pairs(lf) == CANONICAL_PAIRS


def test_side_field_must_be_json_object_text(tmp_path):
  rec = dict(LF_RECORDS[0], mrm_jax="[1]")
  with pytest.raises(UserError, match="r:1: field 'mrm_jax' should be the JSON text of an object"):
    records.normalize_pair(rec, "r:1")
  with pytest.raises(UserError, match="field 'strength'"):
    records.normalize_pair(dict(LF_RECORDS[0], mrm_jax='{"strength": "big"}'), "r:1")


@pytest.mark.parametrize("fmt", ["canonical", "llamafactory"])
def test_output_in_another_folder_rebases_image_paths(tmp_path, fmt):
  data = tmp_path / "data"
  (data / "img").mkdir(parents=True)
  src = data / "raw" / "c.jsonl"
  src.parent.mkdir()
  pair = dict(CANONICAL_PAIRS[1], images=["../img/a.png", "b.png"])
  src.write_text(json.dumps(pair) + "\n")
  out = data / "pairs.jsonl"
  assert (
    cli.main(
      ["convert", "--input", str(src), "--from", "canonical", "--output", str(out), "--format", fmt]
    )
    == 0
  )
  (rec,) = records.read_pairs(out)
  assert rec["images"] == ["img/a.png", "raw/b.png"]
  assert [(data / p).resolve() for p in rec["images"]] == [
    (src.parent / p).resolve() for p in pair["images"]
  ]


def test_output_outside_the_images_folder_is_refused(tmp_path, capsys):
  src = tmp_path / "in" / "c.jsonl"
  src.parent.mkdir()
  src.write_text(json.dumps(CANONICAL_PAIRS[0]) + "\n")
  out = tmp_path / "elsewhere" / "pairs.jsonl"
  out.parent.mkdir()
  assert (
    cli.main(["convert", "--input", str(src), "--from", "canonical", "--output", str(out)]) == 2
  )
  err = capsys.readouterr().err
  assert f"{out}: image 'img/a.png'" in err and "outside the output's folder" in err
  assert not out.exists()
