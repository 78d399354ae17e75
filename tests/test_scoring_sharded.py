"""Scoring at scale: deduplicated, length-sorted, padded batches sharded over the 8 fake CPU devices
give the rewards of scoring each record alone (unpadded, eager, one device); `mrm-jax score` streams
chunks to a progress log and a stopped run resumes to a byte-identical output."""

import json

import jax
import model_fixtures as mf
import numpy as np
import pytest
from PIL import Image

from mrm_jax import cli
from mrm_jax.data.records import normalize_scoring
from mrm_jax.evaluate import score_file, scoring
from mrm_jax.models import load_reward_model
from mrm_jax.train import sharding as shd

pytest.importorskip("torch")  # only to build the tiny HF model directory

RECORDS = [
  {"id": "t1", "images": [], "question": "What is 2 + 2?", "answer": "The answer is 4."},
  {"id": "i1", "images": ["imgs/a.png"], "question": "What is shown?", "answer": "A red circle."},
  {
    "id": "i2",
    "images": ["imgs/a.png", "imgs/b.png"],
    "question": "Image 1: <image> Image 2: <image> Better?",
    "answer": "Image 2 is better.",
    "system": "You are a judge.",
  },
  {
    "id": "t2",
    "images": [],
    "question": "Describe " * 12,
    "answer": "No, the object is a green square.",
  },
  {"id": "i3", "images": ["imgs/b.png"], "question": "Which image is better?", "answer": "Yes."},
  {
    "id": "d1",
    "images": "imgs/a.png",
    "question": "What is shown?",
    "answer": "A red circle.",
  },  # = i1
  {
    "id": "s1",
    "images": ["imgs/a.png"],
    "question": "What is shown?",
    "answer": "A red circle.",
    "system": "You are a judge.",
  },  # i1 with a system prompt: not a duplicate
  {
    "id": "p1",
    "images": ["imgs/a.png"],
    "question": "What is shown?<image>",
    "answer": "A red circle.",
  },
  {"id": "t3", "images": [], "question": "Hi", "answer": "Hello!"},
  {"id": "d2", "images": [], "question": "What is 2 + 2?", "answer": "The answer is 4."},  # = t1
  {
    "id": "i4",
    "images": ["imgs/b.png", "imgs/a.png"],
    "question": "Compare.",
    "answer": "The cat sits on the mat.",
  },
  {
    "id": "d3",
    "images": ["imgs/a.png", "imgs/b.png"],
    "question": "Image 1: <image> Image 2: <image> Better?",
    "answer": "Image 2 is better.",
    "system": "You are a judge.",
  },  # = i2
]
UNIQUE = 9


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("sharded")
  mf.save_tiny_qwen2_vl(root / "model", seed=3)
  data = root / "data"
  (data / "imgs").mkdir(parents=True)
  rng = np.random.default_rng(3)
  for name, (w, h) in {"a.png": (37, 53), "b.png": (300, 97)}.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(data / "imgs" / name)
  (data / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
  model, proc = load_reward_model(root / "model")
  recs = [normalize_scoring(r) for r in RECORDS]
  # the oracle: each record alone, exactly its own length and patches (no padding, no vmap), one
  # device
  alone = jax.jit(lambda m, b: m(b))
  ref = []
  for r in recs:
    e = proc.encode(r, data, 4096)
    ref.append(float(alone(model, proc.collate([e], seq_len=e.length))[0]))
  return dict(root=root, data=data, model=model, proc=proc, recs=recs, ref=np.asarray(ref))


class CountingProcessor:
  """The real processor, counting `encode` calls."""

  def __init__(self, proc):
    self.proc, self.encoded = proc, []

  def __getattr__(self, name):
    return getattr(self.proc, name)

  def encode(self, record, *args, **kw):
    self.encoded.append(record["id"])
    return self.proc.encode(record, *args, **kw)


def test_oracle_rewards_are_distinct(world):
  ref = world["ref"]
  assert ref[5] == ref[1] and ref[9] == ref[0] and ref[11] == ref[2]
  assert len(set(np.round(ref, 5))) == UNIQUE  # a misplaced score cannot go unnoticed


@pytest.mark.parametrize(
  "batch_size,mesh_cfg",
  [(8, {"data": 8}), (11, {"data": 8}), (6, {"data": 2, "fsdp": 2, "tensor": 2})],
)
def test_sharded_padded_batches_equal_one_at_a_time(world, batch_size, mesh_cfg):
  mesh = shd.make_mesh(mesh_cfg, jax.devices())
  proc = CountingProcessor(world["proc"])
  got = scoring.score_records(
    world["model"],
    proc,
    world["recs"],
    world["data"],
    batch_size,
    mesh=mesh,
    seq_bucket=128,
    progress=False,
  )
  np.testing.assert_allclose(got, world["ref"], atol=1e-5, rtol=0)
  # duplicates are encoded (and scored) once and get the very same reward
  assert len(proc.encoded) == UNIQUE and sorted(set(proc.encoded)) == sorted(proc.encoded)
  assert got[5] == got[1] and got[9] == got[0] and got[11] == got[2]


def test_step_rows_round_up_to_the_data_shards():
  mesh = shd.make_mesh({"data": 8}, jax.devices())
  assert scoring.step_rows(1, mesh) == (8, 1)
  assert scoring.step_rows(8, mesh) == (8, 1)
  assert scoring.step_rows(9, mesh) == (16, 2)
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
  assert scoring.step_rows(5, mesh) == (8, 2)  # the tensor axis does not split rows


def test_small_chunks_and_default_devices_keep_input_order(world):
  """Chunks of 5 records (duplicates of earlier chunks reuse their scores), default devices."""
  proc = CountingProcessor(world["proc"])
  got = scoring.score_records(
    world["model"], proc, world["recs"], world["data"], 3, chunk=5, seq_bucket=128, progress=False
  )
  np.testing.assert_allclose(got, world["ref"], atol=1e-5, rtol=0)
  assert len(proc.encoded) == UNIQUE
  assert scoring.scoring_key(
    {"images": "x.png", "question": "q", "answer": "a"}
  ) == scoring.scoring_key({"images": ["x.png"], "question": "q", "answer": "a", "id": "other"})
  assert scoring.scoring_key({"images": [], "question": "q", "answer": "a"}) != scoring.scoring_key(
    {"images": [], "question": "q", "answer": "a", "system": ""}
  )


def _score(world, out, *extra):
  return cli.main(
    [
      "score",
      "--model",
      str(world["root"] / "model"),
      "--input",
      str(world["data"] / "in.jsonl"),
      "--output",
      str(out),
      "--batch-size",
      "2",
      "--chunk-size",
      "3",
      *extra,
    ]
  )


def test_cli_stopped_and_resumed_run_is_byte_identical(world, tmp_path, monkeypatch):
  from mrm_jax.models.processor import Processor

  calls = []
  encode = Processor.encode

  def counting(self, rec, *args, **kw):
    calls.append(rec["id"])
    return encode(self, rec, *args, **kw)

  monkeypatch.setattr(Processor, "encode", counting)

  ref = tmp_path / "ref.jsonl"
  assert _score(world, ref) == 0
  assert not (tmp_path / "ref.jsonl.progress").exists()  # removed once the output is written
  lines = [json.loads(x) for x in ref.read_text().splitlines()]
  assert [{k: v for k, v in r.items() if k != "score"} for r in lines] == RECORDS
  np.testing.assert_allclose([r["score"] for r in lines], world["ref"], atol=1e-5, rtol=0)
  assert len(calls) == UNIQUE

  out = tmp_path / "out.jsonl"
  progress = tmp_path / "out.jsonl.progress"
  monkeypatch.setenv(score_file.FAULT_ENV, "2")
  with pytest.raises(RuntimeError, match="stopped after 2 chunks"):
    _score(world, out)
  monkeypatch.delenv(score_file.FAULT_ENV)
  assert not out.exists()
  logged = [json.loads(x) for x in progress.read_text().splitlines()]
  assert "settings" in logged[0] and [e["start"] for e in logged[1:]] == [0, 3]
  with open(progress, "a") as f:
    f.write('{"start": 6, "digest": "ab')  # a torn line, as a kill mid-write leaves it
  calls.clear()
  assert _score(world, out) == 0
  assert out.read_bytes() == ref.read_bytes()
  assert not progress.exists()
  # only records after the two logged chunks were encoded; d2 and d3 reused their originals' logged
  # scores
  assert calls == ["s1", "p1", "t3", "i4"]

  # a log written with other settings is not reused
  monkeypatch.setenv(score_file.FAULT_ENV, "1")
  with pytest.raises(RuntimeError):
    _score(world, out, "--max-len", "2048")
  monkeypatch.delenv(score_file.FAULT_ENV)
  calls.clear()
  assert _score(world, out) == 0
  assert out.read_bytes() == ref.read_bytes() and len(calls) == UNIQUE
