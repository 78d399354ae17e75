"""`mrm-jax demo`: config overrides, the world in the workdir (`--world-only`), clean one-line
errors.

The whole pipeline (`mrm-jax demo` without `--world-only`) is tested in tests/test_demo_pipeline.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mrm_jax.cli import main
from mrm_jax.demo.config import load_demo_config
from mrm_jax.errors import UserError

REPO = Path(__file__).resolve().parent.parent
TINY = [
  "--size",
  "small",
  "--config.world.n_candidates=6",
  "--config.world.n_t2i=2",
  "--config.world.n_noisy=10",
  "--config.world.n_heldout=4",
]
WORLD_ONLY = ["--world-only", *TINY]


def _cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-m", "mrm_jax.cli", "demo", *args],
    capture_output=True,
    text=True,
    cwd=REPO,
    env=env,
    timeout=120,
  )


def test_config_overrides_apply_to_the_demo_config():
  cfg = load_demo_config(
    "demo",
    [
      "--config.world.flip_fraction=0.35",
      "--config.train.num_steps=7",
      "--config.world.size",
      "small",
    ],
    seed=5,
  )
  assert cfg.world.flip_fraction == 0.35 and cfg.world.size == "small"
  assert cfg.train.num_steps == 7 and cfg.seed == 5
  assert cfg.model.family == "qwen2_vl"  # the rest of configs/demo.py is kept
  assert (
    cfg.curate.judge.kind == "simulated" and cfg.curate.rounds >= 1
  )  # a curate section is added
  with pytest.raises(UserError, match="unknown config key 'world.flip_fractoin'"):
    load_demo_config("demo", ["--config.world.flip_fractoin=0.3"])
  with pytest.raises(UserError, match="expected a number"):
    load_demo_config("demo", ["--config.world.flip_fraction=lots"])


def test_demo_arguments_default_to_the_full_pipeline():
  import argparse

  from mrm_jax.commands import demo as cli

  p = argparse.ArgumentParser()
  cli.add_arguments(p)
  args = p.parse_args([])
  assert (args.workdir, args.size, args.config, args.world_only, args.progress) == (
    "runs/demo",
    "full",
    "curate_demo",
    False,
    True,
  )
  assert "summary.json" in p.description and "held-out" in p.description


def test_demo_writes_the_world_and_reuses_it(tmp_path, capsys):
  workdir = tmp_path / "w"
  assert (
    main(["demo", "--workdir", str(workdir), *WORLD_ONLY, "--config.world.flip_fraction=0.3"]) == 0
  )
  out = capsys.readouterr().out
  assert "world written" in out
  assert "noisy pairs" in out and "3 flipped (30%)" in out and "candidate sets" in out
  stats = json.loads((workdir / "world" / "world.json").read_text())
  assert stats["noisy"]["n"] == 10 and stats["candidates"]["n"] == 6
  assert not (workdir / ".world.partial").exists()
  before = (workdir / "world" / "noisy_pairs.jsonl").read_bytes()
  assert (
    main(["demo", "--workdir", str(workdir), *WORLD_ONLY, "--config.world.flip_fraction=0.3"]) == 0
  )
  assert "world reused" in capsys.readouterr().out
  # Other settings → a new world replaces the old one.
  assert (
    main(["demo", "--workdir", str(workdir), *WORLD_ONLY, "--config.world.flip_fraction=0.5"]) == 0
  )
  assert "world written" in capsys.readouterr().out
  assert (workdir / "world" / "noisy_pairs.jsonl").read_bytes() != before
  assert json.loads((workdir / "world" / "noisy_truth.json").read_text())["n_flipped"] == 5


def test_unwritable_workdir_is_one_clean_line(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  r = _cli("--workdir", str(blocker / "w"), *TINY)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert (
    len(lines) == 1 and lines[0].startswith("mrm-jax demo: error:") and str(blocker) in lines[0]
  ), r.stderr
  assert "Traceback" not in r.stderr


def test_unknown_config_key_is_one_clean_line(tmp_path):
  r = _cli("--workdir", str(tmp_path / "w"), "--config.world.nope=1")
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert lines == [lines[0]] and "unknown config key 'world.nope'" in lines[0], r.stderr
  assert not (tmp_path / "w").exists()  # nothing written before the config is known to be good
