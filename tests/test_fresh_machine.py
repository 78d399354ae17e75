"""A new user's first minutes: every runtime import declared, `mrm-jax train --config
configs/demo.py` working as written, and nothing on stderr a user would have to wonder about.

(`.ci/run` also runs README command 1 in a virtualenv made without the test extra and without system
site
packages: the check that no dependency hides behind torch.)"""

from __future__ import annotations

import ast
import importlib.metadata
import io
import json
import logging
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from quiet_output import unexpected_lines

ROOT = Path(__file__).resolve().parents[1]


def _declared_distributions() -> set[str]:
  deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
  return {re.split(r"[\s<>=!;\[~]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}


def _imported_top_level_modules() -> set[str]:
  modules = set()
  for path in [*(ROOT / "mrm_jax").rglob("*.py"), *(ROOT / "configs").glob("*.py")]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.Import):
        modules.update(a.name.split(".")[0] for a in node.names)
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        modules.add(node.module.split(".")[0])
  return {
    m for m in modules if m not in sys.stdlib_module_names and m not in ("mrm_jax", "__future__")
  }


def test_every_third_party_import_is_a_declared_dependency():
  declared = _declared_distributions()
  owners = importlib.metadata.packages_distributions()
  undeclared = {}
  for module in sorted(_imported_top_level_modules()):
    dists = {d.lower().replace("_", "-") for d in owners.get(module, [])}
    # tensorflow is declared per platform as tensorflow-cpu / tensorflow: either name counts
    if not dists & declared and not (
      module == "tensorflow" and {"tensorflow", "tensorflow-cpu"} & declared
    ):
      undeclared[module] = sorted(dists) or ["not installed"]
  assert not undeclared, f"imported by mrm_jax but not in pyproject's dependencies: {undeclared}"


def test_packages_used_through_other_libraries_are_declared():
  # transformers renders chat templates with jinja2 but does not depend on it; without it the
  # demo's first tokenizer call fails (a clean venv showed it; the test extra's torch hides it).
  assert "jinja2" in _declared_distributions()


def test_log_lines_land_above_an_open_progress_bar():
  from tqdm import tqdm

  from mrm_jax import console

  stream = io.StringIO()
  handler = console._BarAwareHandler(stream)
  handler.setFormatter(logging.Formatter("%(message)s"))
  record = logging.LogRecord("mrm_jax.x", logging.INFO, __file__, 1, "eval @ step 9", None, None)
  with tqdm(total=3, file=stream, desc="train", mininterval=0) as bar:
    bar.update(1)
    handler.emit(record)
  pieces = re.split(r"[\r\n]", stream.getvalue())
  assert "eval @ step 9" in pieces, stream.getvalue()  # a line of its own, not glued onto the bar


def test_an_error_closes_open_bars_first(capsys):
  from tqdm import tqdm

  from mrm_jax import console

  bar = tqdm(total=3, desc="score", mininterval=0)
  bar.update(1)
  console.print_error("mrm-jax score: error: x.jsonl:3: malformed JSON")
  assert bar.disable or bar not in getattr(tqdm, "_instances", set())
  err = capsys.readouterr().err
  assert "\nmrm-jax score: error: x.jsonl:3: malformed JSON\n" in err


@pytest.mark.slow
def test_train_on_the_embedded_world_as_written(tmp_path):
  """README: `mrm-jax train --config configs/demo.py --workdir W` with no model.path / data.train
  trains the tiny model on the embedded world; its stderr holds only the project's own lines (no
  libtpu, TF,
  absl, transformers notices, no GeneratorDataset finalisation errors at exit)."""
  env = {
    k: v for k, v in os.environ.items() if not k.startswith(("TF_", "TRANSFORMERS_", "XLA_FLAGS"))
  }
  workdir = tmp_path / "w"
  cmd = [
    sys.executable,
    "-m",
    "mrm_jax.cli",
    "train",
    "--config",
    str(ROOT / "configs" / "demo.py"),
    "--workdir",
    str(workdir),
    "--no-progress",
    "--config.world.size=small",
    "--config.train.num_steps=3",
    "--config.train.log_every=3",
  ]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not unexpected_lines(proc.stderr), proc.stderr
  summary = json.loads(proc.stdout)
  assert summary["steps"] == 3
  assert summary["eval"]["count"] == 40  # the small world's held-out pairs
  assert (workdir / "world" / "world.json").is_file()
  assert sum(1 for _ in open(workdir / "world_pairs" / "t2i.jsonl")) == 10


def test_train_without_data_on_a_big_config_says_what_to_set(tmp_path, capsys):
  from mrm_jax.cli import main

  rc = main(
    [
      "train",
      "--config",
      str(ROOT / "configs" / "qwen2_vl_2b.py"),
      "--workdir",
      str(tmp_path / "w"),
    ]
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1
  assert "set data.train" in err[0] and "model.path" in err[0]
