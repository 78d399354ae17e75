"""The README's commands and its Python example are what CI and users run: keep them true."""

import re
import subprocess
from pathlib import Path

import numpy as np
from model_fixtures import save_tiny_qwen2_vl
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
  ci = (ROOT / ".ci" / "run").read_text()
  readme_test = re.search(
    r'python -m pip install -e "\.\[test\]" && (python -m pytest[^\n`]*)', README
  ).group(1)
  assert readme_test.strip() in ci


def test_python_example_runs_on_a_saved_checkpoint(tmp_path):
  model_dir = tmp_path / "model"
  save_tiny_qwen2_vl(model_dir)
  data = tmp_path / "data"
  data.mkdir()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(
    data / "cat.png"
  )
  code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
  code = code.replace("/models/Qwen2-VL-2B-RM", str(model_dir)).replace('"/data"', repr(str(data)))
  scope: dict = {}
  exec(compile(code, "README.md", "exec"), scope)
  rewards = np.asarray(scope["rewards"])
  assert rewards.shape == (1,) and np.isfinite(rewards).all()
  assert "backbone" in scope


def test_every_command_in_the_table_is_registered():
  from mrm_jax.cli import COMMANDS

  listed = set(re.findall(r"^\| `mrm-jax ([a-z0-9-]+)", README, re.M))
  assert listed == set(COMMANDS), listed ^ set(COMMANDS)


def test_help_lists_the_commands():
  out = subprocess.run(["mrm-jax", "--help"], capture_output=True, text=True, timeout=60).stdout
  from mrm_jax.cli import COMMANDS

  for name in COMMANDS:
    assert name in out
