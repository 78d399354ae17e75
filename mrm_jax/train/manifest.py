"""`WORKDIR/manifest.json`: everything needed to say what a run was and to redo it."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax

from mrm_jax.config import config_to_dict
from mrm_jax.io import write_json

PACKAGES = (
  "mrm-jax",
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "numpy",
  "transformers",
  "tokenizers",
  "tensorflow",
  "tensorflow-cpu",
  "tensorflow-datasets",
  "ml_collections",
)


def package_versions() -> dict[str, str]:
  out = {}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
  return out


def git_revision() -> dict | None:
  """HEAD of the repository holding this package, and whether the tree had local changes."""
  root = Path(__file__).resolve().parents[2]
  try:
    rev = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
    )
    if rev.returncode:
      return None
    dirty = subprocess.run(
      ["git", "status", "--porcelain", "--untracked-files=no"],
      cwd=root,
      capture_output=True,
      text=True,
      timeout=10,
    )
    return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
  except (OSError, subprocess.SubprocessError):
    return None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def data_fingerprints(*specs: str) -> dict[str, str]:
  """sha256 of every data file named in `data.train` / `data.eval` (comma-separated); TFDS names
  and directories are recorded by name (their versions pin the content)."""
  out = {}
  for spec in specs:
    for item in (s.strip() for s in str(spec or "").split(",")):
      if not item:
        continue
      p = Path(item)
      out[item] = (
        sha256_file(p) if p.is_file() else ("tfds" if item.startswith("tfds:") else "not a file")
      )
  return out


def build_manifest(cfg, *, workdir, mesh, extra: dict | None = None) -> dict:
  return {
    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "command": sys.argv,
    "config": config_to_dict(cfg),
    "seeds": {"seed": int(cfg.seed)},
    "packages": package_versions(),
    "python": platform.python_version(),
    "git": git_revision(),
    "data": data_fingerprints(cfg.data.train, cfg.data.eval),
    "devices": {
      "platform": jax.default_backend(),
      "count": jax.device_count(),
      "kind": jax.devices()[0].device_kind,
      "processes": jax.process_count(),
    },
    "mesh": dict(mesh.shape),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "workdir": str(Path(workdir).resolve()),
    **(extra or {}),
  }


def write_manifest(path, manifest: dict) -> None:
  write_json(path, manifest)
