"""External failures as one-line errors naming the file (issue 15): corrupt or truncated
safetensors, a malformed config.json, PIL's decompression-bomb limit, a damaged orbax checkpoint
(fall back to the
previous one), malformed manifests; and numeric options checked while the command line is parsed."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from cli_checks import one_error_line
from PIL import Image

from mrm_jax.cli import main
from mrm_jax.errors import UserError

# -- safetensors and config.json -------------------------------------------------------------------


def _weights(kind: str) -> bytes:
  from safetensors.numpy import save

  good = save({"embed.weight": np.zeros((32, 16), np.float32)})
  if kind == "truncated":
    return good[:-100]
  if kind == "garbage header":
    return (40).to_bytes(8, "little") + b"{this is not the JSON header at all!!!!!}"
  return b"\xff" * 64  # a header length far beyond the file


@pytest.mark.parametrize("kind", ["truncated", "garbage header", "random bytes"])
def test_export_of_a_corrupt_safetensors_names_the_file(tmp_path, capsys, kind):
  src = tmp_path / "hf"
  src.mkdir()
  (src / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
  (src / "model.safetensors").write_bytes(_weights(kind))
  out = tmp_path / "export"
  out.mkdir()
  (out / "config.json").write_text("previous export")
  assert main(["export", "--checkpoint", str(src), "--output", str(out)]) == 2
  one_error_line(capsys, src / "model.safetensors", "not a readable safetensors file")
  assert (out / "config.json").read_text() == "previous export"


@pytest.mark.parametrize(
  "text, needle",
  [
    ('{"model_type": ', "malformed JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"model_type": "qwen2_vl", "text_config": 5}', "invalid qwen2_vl config"),
  ],
)
def test_malformed_config_json_names_the_file(tmp_path, capsys, text, needle):
  src = tmp_path / "hf"
  src.mkdir()
  (src / "config.json").write_text(text)
  assert main(["export", "--checkpoint", str(src), "--output", str(tmp_path / "out")]) == 2
  one_error_line(capsys, src / "config.json", needle)


# -- images ----------------------------------------------------------------------------------------


# 56x56 = 3136 pixels: more than twice the limit (PIL raises), or less (PIL only warns)
@pytest.mark.parametrize("limit", [1000, 2000])
def test_decompression_bomb_is_a_user_error_naming_the_image(tmp_path, monkeypatch, limit):
  from mrm_jax.models.processor import load_image

  Image.fromarray(np.zeros((56, 56, 3), np.uint8)).save(tmp_path / "big.png")
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
  with pytest.raises(
    UserError, match=r"data.jsonl:3: image 'big.png' .* is too large to decode safely"
  ):
    load_image(tmp_path / "big.png", "data.jsonl:3", "big.png")
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
  assert load_image(tmp_path / "big.png", "data.jsonl:3").size == (56, 56)


def test_truncated_image_is_a_user_error(tmp_path):
  from mrm_jax.models.processor import load_image

  Image.fromarray(np.zeros((56, 56, 3), np.uint8)).save(tmp_path / "im.png")
  (tmp_path / "cut.png").write_bytes((tmp_path / "im.png").read_bytes()[:60])
  with pytest.raises(UserError, match=r"x.jsonl:1: image '.*cut.png' cannot be decoded"):
    load_image(tmp_path / "cut.png", "x.jsonl:1")


# -- orbax checkpoints -----------------------------------------------------------------------------


def _state(k: float):
  import jax.numpy as jnp

  return {"w": jnp.arange(4.0) * k, "step": jnp.int32(int(k))}


def _abstract():
  import jax
  import jax.numpy as jnp

  sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return {
    "w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sh),
    "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sh),
  }


def _damage(step_dir: Path) -> None:
  """Truncates every array data file of a saved step (as a full disk or a bad copy would)."""
  for f in (step_dir / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      with open(f, "r+b") as fh:
        fh.truncate(8)


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, capfd):
  from mrm_jax.train.checkpoint import Checkpointer

  ck = Checkpointer(tmp_path, keep=3, async_save=False)
  for s in (1, 2, 3):
    ck.save(s, _state(s), {"position": s})
  ck.close()
  _damage(tmp_path / "checkpoints" / "3")

  ck = Checkpointer(tmp_path, keep=3, async_save=False)
  with caplog.at_level(logging.WARNING, logger="mrm_jax.train.checkpoint"):
    assert ck.restore(None, _abstract())[1] == {
      "position": 2
    }  # read-only use (score, export): no move
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2", "3"]
  (warning,) = [r.getMessage() for r in caplog.records if r.name == "mrm_jax.train.checkpoint"]
  assert [r for r in caplog.records if r.name == "asyncio"] == []  # orbax's aborted reads
  assert f"{tmp_path / 'checkpoints' / '3'}: checkpoint cannot be restored" in warning
  assert "using step 2" in warning and "\n" not in warning
  err = capfd.readouterr().err  # orbax's aborted reads print nothing
  assert "Event loop is closed" not in err and "TensorStore" not in err

  # training: the damaged step is moved aside, so that step 3 can be saved again
  step, state, data = ck.restore_latest(_abstract(), set_aside=True)
  assert (step, int(state["step"]), data) == (2, 2, {"position": 2})
  ck.save(3, _state(30), {"position": 30})
  ck.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2", "3", "3.unreadable"]
  ck = Checkpointer(tmp_path, keep=3, async_save=False)
  assert ck.restore_latest(_abstract())[0] == 3
  ck.close()


def test_no_restorable_checkpoint_is_a_user_error(tmp_path):
  from mrm_jax.train.checkpoint import Checkpointer

  ck = Checkpointer(tmp_path, keep=2, async_save=False)
  for s in (1, 2):
    ck.save(s, _state(s), {})
  ck.close()
  for s in (1, 2):
    _damage(tmp_path / "checkpoints" / str(s))
  ck = Checkpointer(tmp_path, keep=2, async_save=False)
  with pytest.raises(
    UserError, match=r"checkpoints/2: checkpoint cannot be restored .*nor any older"
  ) as e:
    ck.restore_latest(_abstract(), set_aside=True)
  ck.close()
  assert "\n" not in str(e.value)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == [
    "1",
    "2",
  ]  # nothing renamed when nothing restores


# -- manifests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ['{"key": ', "[]", '{"key": "k", "outputs": {"pairs": 5}}'])
def test_malformed_stage_manifest_names_the_file(tmp_path, text):
  from mrm_jax.stages import Stage as _Stage

  stage = _Stage(tmp_path / "flip", "round_0/flip", {}, {})
  (tmp_path / "flip").mkdir()
  stage.manifest_path.write_text(text)
  with pytest.raises(UserError, match=str(stage.manifest_path)):
    stage.finished()


def test_malformed_training_manifest_names_the_file(tmp_path, capsys):
  wd = tmp_path / "run"
  (wd / "checkpoints").mkdir(parents=True)
  (wd / "manifest.json").write_text('{"config": {"model": ')
  assert main(["export", "--checkpoint", str(wd), "--output", str(tmp_path / "out")]) == 2
  one_error_line(capsys, wd / "manifest.json", "malformed JSON")


# -- numeric options -------------------------------------------------------------------------------

SCORE = ["score", "--model", "m", "--input", "i", "--output", "o"]
JUDGE = ["judge", "--input", "i", "--output", "o", "--base-url", "http://x", "--judge-model", "m"]
BAD_OPTIONS = [
  (SCORE, "--batch-size", "0"),
  (SCORE, "--max-pixels", "0"),
  (SCORE, "--max-len", "-3"),
  (SCORE, "--chunk-size", "x"),
  (["evaluate", "--benchmark", "pairs", "--data", "d", "--model", "m"], "--batch-size", "0"),
  (["best-of-n", "--model", "m", "--input", "i", "--output", "o"], "--batch-size", "-1"),
  (["construct", "--candidates", "c", "--judgments", "j", "--output", "o"], "--min-gap", "-0.5"),
  (["construct", "--candidates", "c", "--judgments", "j", "--output", "o"], "--min-gap", "nan"),
  (["curate", "flip", "--pairs", "p", "--scores", "s", "--output", "o"], "--flip-fraction", "1.5"),
  (["curate", "flip", "--pairs", "p", "--scores", "s", "--output", "o"], "--flip-fraction", "nan"),
  (["curate", "vote", "--queue", "q", "--judgments", "j", "--output", "o"], "--min-votes", "0"),
  (JUDGE, "--timeout", "inf"),
  (JUDGE, "--timeout", "0"),
  (JUDGE, "--concurrency", "0"),
  (JUDGE, "--repeats", "0"),
  (JUDGE, "--max-retries", "-1"),
]


@pytest.mark.parametrize(
  "argv, option, value", BAD_OPTIONS, ids=[f"{a[0]} {o} {v}" for a, o, v in BAD_OPTIONS]
)
def test_numeric_options_are_checked_while_parsing(argv, option, value, capsys):
  with pytest.raises(SystemExit) as e:
    main([*argv, option, value])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]  # argparse's usage lines, then its one error line
  prog = " ".join(argv[:2]) if argv[0] == "curate" else argv[0]
  assert last.startswith(f"mrm-jax {prog}: error: argument {option}: "), err


@pytest.mark.parametrize(
  "override, message",
  [
    ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
    ("data.max_pixels=-1", "data.max_pixels must be >= 1, got -1"),
    ("data.min_pixels=0", "data.min_pixels must be >= 1, got 0"),
    ("train.learning_rate=nan", "train.learning_rate must be a finite number"),
    ("mesh.fsdp=0", "mesh.fsdp must be -1"),
  ],
)
def test_config_values_are_checked_before_training(tmp_path, capsys, override, message):
  assert (
    main(
      [
        "train",
        "--config",
        "configs/demo.py",
        "--workdir",
        str(tmp_path / "w"),
        f"--config.{override}",
      ]
    )
    == 2
  )
  one_error_line(capsys, message)
  assert not (tmp_path / "w" / "checkpoints").exists()
