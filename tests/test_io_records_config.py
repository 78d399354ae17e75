"""The shared utilities every stage relies on: JSONL errors, atomic writes, resumable logs,
record conversions and the config loader."""

import json

import pytest

from mrm_jax import config as config_lib
from mrm_jax.data import records
from mrm_jax.errors import UserError
from mrm_jax.io import AppendLog, atomic_open, iter_jsonl, read_json_or_jsonl, write_jsonl


def test_malformed_jsonl_names_file_and_line(tmp_path):
  p = tmp_path / "in.jsonl"
  p.write_text('{"a": 1}\n\n{"a": 2,}\n')
  with pytest.raises(UserError, match=r"in\.jsonl:3: malformed JSON"):
    list(iter_jsonl(p))


def test_non_object_line_is_an_error(tmp_path):
  p = tmp_path / "in.jsonl"
  p.write_text("[1, 2]\n")
  with pytest.raises(UserError, match=r"in\.jsonl:1: expected a JSON object"):
    list(iter_jsonl(p))


def test_json_list_and_jsonl_read_alike(tmp_path):
  a, b = tmp_path / "a.json", tmp_path / "b.jsonl"
  items = [{"x": 1}, {"x": 2}]
  a.write_text(json.dumps(items))
  b.write_text("\n".join(json.dumps(i) for i in items) + "\n")
  assert [r for _, r in read_json_or_jsonl(a)] == [r for _, r in read_json_or_jsonl(b)] == items


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
  p = tmp_path / "out.jsonl"
  write_jsonl(p, [{"ok": 1}])
  with pytest.raises(RuntimeError):
    with atomic_open(p) as f:
      f.write("half")
      raise RuntimeError("crash")
  assert p.read_text() == '{"ok": 1}\n'
  assert [f.name for f in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left behind


def test_append_log_repairs_torn_last_line(tmp_path):
  p = tmp_path / "log.jsonl"
  p.write_text('{"i": 0}\n{"i": 1}\n{"i": 2, "tor')
  log = AppendLog(p)
  assert log.records == [{"i": 0}, {"i": 1}]
  log.append({"i": 2})
  log.close()
  assert [json.loads(l) for l in p.read_text().splitlines()] == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_llamafactory_round_trip():
  lf = {
    "conversations": [{"from": "human", "value": "<image>What colour?"}],
    "chosen": {"from": "gpt", "value": "Red."},
    "rejected": {"from": "gpt", "value": "Blue."},
    "images": ["a.png"],
    "system": "sys",
    "extra_field": [1, 2],
  }
  pair = records.normalize_pair(lf)
  assert (
    pair["question"] == "<image>What colour?"
    and pair["chosen"] == "Red."
    and pair["images"] == ["a.png"]
  )
  assert records.to_llamafactory(pair) == lf


def test_pair_validation_names_the_field():
  with pytest.raises(UserError, match="f.jsonl:7: missing field 'rejected'"):
    records.normalize_pair({"id": "x", "question": "q", "chosen": "a"}, "f.jsonl:7")


def test_score_key_ignores_placeholders_and_whitespace():
  assert records.score_key(["a.png"], " <image>\nWhat is it? ", "x") == records.score_key(
    "a.png", "What is it?", "x"
  )


def test_resolve_image_refuses_escapes(tmp_path):
  (tmp_path / "img").mkdir()
  assert records.resolve_image("a.png", tmp_path / "img") == (tmp_path / "img" / "a.png").resolve()
  with pytest.raises(UserError, match="outside the image root"):
    records.resolve_image("../secret.png", tmp_path / "img", "in.jsonl:3")
  with pytest.raises(UserError, match="outside the image root"):
    records.resolve_image("/etc/passwd", tmp_path / "img")


def test_config_overrides_typed_and_unknown_keys_fail():
  cfg = config_lib.load_config(
    "configs/demo.py",
    [
      "--config.train.num_steps=7",
      "--config.train.learning_rate",
      "0.5",
      "--config.model.freeze_vision=false",
      "--config.data.seq_buckets=(64,128)",
    ],
  )
  assert (
    cfg.train.num_steps == 7 and cfg.train.learning_rate == 0.5 and cfg.model.freeze_vision is False
  )
  assert tuple(cfg.data.seq_buckets) == (64, 128)
  with pytest.raises(UserError, match="unknown config key 'train.num_stepz'"):
    config_lib.load_config("configs/demo.py", ["--config.train.num_stepz=3"])
  with pytest.raises(UserError, match="expected an integer"):
    config_lib.load_config("configs/demo.py", ["--config.train.num_steps=many"])


def test_every_config_file_loads_with_the_contract_keys():
  keys = [
    "seed",
    "model.family",
    "model.path",
    "data.train",
    "data.eval",
    "train.num_steps",
    "train.batch_size",
    "train.learning_rate",
    "train.warmup_ratio",
    "train.log_every",
    "train.checkpoint_every",
    "train.eval_every",
    "mesh.data",
    "mesh.fsdp",
    "mesh.tensor",
    "loss.margin_scale",
  ]
  for path in sorted(config_lib.REPO_CONFIGS.glob("*.py")):
    cfg = config_lib.load_config(str(path))
    for key in keys:
      node = cfg
      for part in key.split("."):
        assert part in node, f"{path.name} lacks {key}"
        node = node[part]


def test_missing_config_is_a_clear_error():
  with pytest.raises(UserError, match="config 'nope' not found"):
    config_lib.load_config("nope")


def test_append_log_keeps_the_records_after_a_damaged_line(tmp_path, caplog):
  """A complete line that is not a record (damaged on disk, edited by hand) drops only itself: the
  work recorded after it is kept; a torn last line (a kill mid-write) is cut as before."""
  from mrm_jax.io import AppendLog

  path = tmp_path / "log.jsonl"
  path.write_bytes(b'{"id": "a"}\n\xff\xfegarbage\n{"id": "b"}\n[1, 2]\n{"id": "c"}\n{"id": "torn')
  with caplog.at_level("WARNING"):
    with AppendLog(path) as log:
      assert [r["id"] for r in log.records] == ["a", "b", "c"]
      log.append({"id": "d"})
  assert "dropped 2 unreadable line(s) (line 2, 4)" in caplog.text
  assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n{"id": "d"}\n'
