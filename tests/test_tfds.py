"""TFDS builders: local files only, versioned, images kept as their original encoded bytes."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mrm_jax.data import tfds_builders as tb
from mrm_jax.errors import UserError


def _png(color, size=(5, 3)):
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, format="PNG")
  return buf.getvalue()


def _prepare(tmp_path, manual, config):
  builder = tb.MrmPairs(data_dir=str(tmp_path / "tfds"), config=config)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return builder


def _split(builder, split):
  return [
    (tb.example_to_pair(ex), [bytes(b) for b in ex["images"]])
    for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
  ]


def test_pairs_config_discovers_pair_files_and_keeps_bytes(tmp_path):
  manual = tmp_path / "manual"
  (manual / "img").mkdir(parents=True)
  red, blue = _png("red"), _png("blue")
  (manual / "img" / "r.png").write_bytes(red)
  (manual / "img" / "b.png").write_bytes(blue)
  train = [
    {
      "id": "a",
      "images": ["img/r.png"],
      "question": "<image>Q1",
      "chosen": "C1",
      "rejected": "R1",
      "strength": 1.5,
      "source": "demo",
      "meta": {"k": 1},
    },
    {
      "id": "b",
      "images": ["img/r.png", "img/b.png"],
      "question": "Q2",
      "chosen": "C2",
      "rejected": "R2",
      "system": "S",
    },
  ]
  (manual / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
  lf = [
    {
      "conversations": [{"from": "human", "value": "<image>Q3"}],
      "chosen": {"from": "gpt", "value": "C3"},
      "rejected": {"from": "gpt", "value": "R3"},
      "images": ["img/b.png"],
      "id": "c",
    }
  ]
  (manual / "eval.json").write_text(json.dumps(lf))
  (manual / "candidates.jsonl").write_text(
    json.dumps({"id": "x", "responses": ["a", "b"]}) + "\n"
  )  # not pairs
  builder = _prepare(tmp_path, manual, "pairs")
  assert set(builder.info.splits) == {"train", "eval"}
  assert str(builder.info.version) == "1.0.0"
  got = sorted(_split(builder, "train"), key=lambda x: x[0]["id"])
  assert got[0] == (
    {
      "id": "a",
      "images": ["img/r.png"],
      "question": "<image>Q1",
      "chosen": "C1",
      "rejected": "R1",
      "strength": 1.5,
      "source": "demo",
      "meta": {"k": 1},
    },
    [red],
  )
  assert got[1] == (
    {
      "id": "b",
      "images": ["img/r.png", "img/b.png"],
      "question": "Q2",
      "chosen": "C2",
      "rejected": "R2",
      "strength": 0.0,
      "system": "S",
    },
    [red, blue],
  )
  ((pair, imgs),) = _split(builder, "eval")
  assert (pair["question"], pair["chosen"], imgs) == ("<image>Q3", "C3", [blue])


def test_native_format_config_with_embedded_bytes(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  img = _png("green")
  pq.write_table(
    pa.table(
      {
        "image": [{"bytes": img, "path": None}],
        "question": ["Q"],
        "chosen": ["C"],
        "rejected": ["R"],
        "idx": ["9"],
      }
    ),
    manual / "train.parquet",
  )
  config = tb.PairsConfig(name="rlaif_v_local", fmt="rlaif_v", splits={"train": "train.parquet"})
  ((pair, imgs),) = _split(_prepare(tmp_path, manual, config), "train")
  assert imgs == [img] and pair["id"] == "9" and pair["source"] == "rlaif_v"


def test_demo_world_config_and_entries_for_the_pipeline(tmp_path):
  from mrm_jax.data.pipeline import check_pair

  manual = tmp_path / "world"
  (manual / "images").mkdir(parents=True)
  img = _png("white")
  (manual / "images" / "s0.png").write_bytes(img)
  rec = {
    "id": "n0",
    "images": ["images/s0.png"],
    "question": "<image>Colour?",
    "chosen": "White.",
    "rejected": "Red.",
  }
  (manual / "noisy_pairs.jsonl").write_text(json.dumps(rec) + "\n")
  (manual / "heldout_pairs.jsonl").write_text(json.dumps({**rec, "id": "h0"}) + "\n")
  builder = _prepare(tmp_path, manual, "demo_world")
  assert set(builder.info.splits) == {"train", "test"}
  entries = tb.entries_from_tfds(
    "mrm_pairs/demo_world", "train", str(tmp_path / "tfds"), tmp_path / "cache"
  )
  (entry,) = entries
  pair, paths = check_pair(entry)
  assert (
    pair["chosen"] == "White."
    and paths[0].read_bytes() == img
    and paths[0].parent == tmp_path / "cache"
  )


def test_missing_manual_files_are_user_errors(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="manual_dir is missing or empty"):
    _prepare(tmp_path, tmp_path / "empty", "pairs")
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "candidates.jsonl").write_text(
    json.dumps({"id": "x", "responses": []}) + "\n"
  )
  with pytest.raises(UserError, match="no pair files found"):
    _prepare(tmp_path, tmp_path / "other", "pairs")
  with pytest.raises(UserError, match="noisy_pairs.jsonl: no such file"):
    _prepare(tmp_path, tmp_path / "other", "demo_world")
