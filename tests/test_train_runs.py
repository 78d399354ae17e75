"""End-to-end `mrm-jax train` runs of the real tiny Qwen2-VL reward model (hidden 32, 2 layers) on
a small image-pair world: determinism, kill -9 + resume, multi-process (explicit flags and
SLURM), restore onto another device count, and the NaN stop.

Each run is a subprocess with its own fake CPU device count. The reference is one process with
4 devices on mesh (data=2, fsdp=2, tensor=1); the others must reproduce its losses.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mrm_jax.errors import UserError

REPO = Path(__file__).resolve().parent.parent
COLOURS = {
  "red": (220, 30, 30),
  "blue": (30, 30, 220),
  "green": (30, 200, 30),
  "yellow": (230, 220, 40),
}
STEPS = 6


def make_world(root: Path, n_train: int = 32, n_eval: int = 6, seed: int = 0):
  """A tiny Qwen2-VL model directory (config + tokenizer, random weights) and image pair files."""
  from mrm_jax.demo.model_dir import write_model_dir

  md = root / "model"
  write_model_dir(md)
  c = json.loads((md / "config.json").read_text())
  c["text_config"].update(
    hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1
  )
  c["vision_config"].update(embed_dim=32, hidden_size=32, num_heads=2)
  (md / "config.json").write_text(json.dumps(c))
  rng = np.random.default_rng(seed)
  (root / "img").mkdir(exist_ok=True)
  names = list(COLOURS)
  for split, n in (("train", n_train), ("eval", n_eval)):
    with open(root / f"{split}.jsonl", "w") as f:
      for i in range(n):
        col = names[rng.integers(len(names))]
        wrong = names[(names.index(col) + 1 + rng.integers(len(names) - 1)) % len(names)]
        a = np.full((56, 56, 3), 255, np.uint8)
        a[14:42, 14:42] = COLOURS[col]
        Image.fromarray(a).save(root / "img" / f"{split}{i}.png")
        f.write(
          json.dumps(
            {
              "id": f"{split}{i}",
              "images": [f"img/{split}{i}.png"],
              "question": "<image>What colour is the square?",
              "chosen": f"The square is {col}.",
              "rejected": f"The square is {wrong}.",
              "strength": float(rng.uniform(0, 2)),
            }
          )
          + "\n"
        )
  return md


def overrides(world: Path, **extra) -> list[str]:
  o = {
    "model.path": world / "model",
    "data.train": world / "train.jsonl",
    "data.eval": world / "eval.jsonl",
    "train.num_steps": STEPS,
    "train.batch_size": 4,
    "train.log_every": 1,
    "train.checkpoint_every": 2,
    "train.keep_checkpoints": 3,
    "data.max_seq_len": 64,
    "data.num_workers": 2,
    "mesh.data": 2,
    "mesh.fsdp": 2,
    "mesh.tensor": 1,
  }
  o.update(extra)
  return [f"--config.{k}={v}" for k, v in o.items()]


def train_env(world: Path, devices: int, env=None) -> dict:
  # runs with the same device count share compiled programs through JAX's persistent cache
  e = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    TF_CPP_MIN_LOG_LEVEL="3",
    TOKENIZERS_PARALLELISM="false",
    JAX_DEFAULT_MATMUL_PRECISION="highest",
    JAX_COMPILATION_CACHE_DIR=str(world / "jax_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  for k in [k for k in e if k.startswith("SLURM_") or k == "MRM_JAX_FAULT_KILL_AT_STEP"]:
    del e[k]
  e.update(env or {})
  return e


def train_command(world: Path, workdir: Path, args=(), extra=None) -> list[str]:
  return [
    sys.executable,
    "-m",
    "mrm_jax.cli",
    "train",
    "--config",
    str(REPO / "configs" / "demo.py"),
    "--workdir",
    str(workdir),
    "--no-progress",
    *args,
    *overrides(world, **(extra or {})),
  ]


def run_train(
  world: Path, workdir: Path, devices: int, *, args=(), env=None, extra=None, wait=True
):
  p = subprocess.Popen(
    train_command(world, workdir, args, extra),
    env=train_env(world, devices, env),
    cwd=world,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  if not wait:
    return p
  out, _ = p.communicate(timeout=600)
  return p.returncode, out


def train_losses(workdir: Path) -> dict[int, float]:
  recs = [
    json.loads(line)
    for line in (workdir / "metrics.jsonl").read_text().splitlines()
    if line.strip()
  ]
  return {r["step"]: r["loss"] for r in recs if r.get("split") != "eval"}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("trainworld")
  make_world(root)
  return root


@pytest.fixture(scope="module")
def reference(world):
  wd = world / "ref"
  rc, out = run_train(world, wd, 4)
  assert rc == 0, out
  return wd


def test_reference_run_leaves_metrics_manifest_checkpoints(reference, world):
  recs = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in recs if r.get("split") != "eval"]
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  for r in train:
    assert {
      "loss",
      "accuracy",
      "learning_rate",
      "grad_norm",
      "reward_margin",
      "tokens_per_s",
    } <= r.keys()
    assert np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1
  assert train[0]["learning_rate"] == 0.0 and train[1]["learning_rate"] > 0  # linear warmup from 0
  (ev,) = [r for r in recs if r.get("split") == "eval"]
  assert ev["step"] == STEPS and ev["count"] == 6
  man = json.loads((reference / "manifest.json").read_text())
  assert man["config"]["train"]["num_steps"] == STEPS and man["seeds"]["seed"] == 0
  assert man["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1} and man["devices"]["count"] == 4
  import hashlib

  train_file = str(world / "train.jsonl")
  assert man["data"][train_file] == hashlib.sha256(Path(train_file).read_bytes()).hexdigest()
  assert {"jax", "flax", "optax", "orbax-checkpoint"} <= man["packages"].keys()
  assert sorted(int(p.name) for p in (reference / "checkpoints").iterdir() if p.name.isdigit()) == [
    2,
    4,
    6,
  ]
  assert any((reference / "tensorboard").iterdir())
  # the demo config trains the (random) vision tower too: every parameter is trainable
  assert man["num_trainable_params"] == man["num_params"]


def test_sigkill_after_second_checkpoint_then_resume_matches(reference, world):
  wd = world / "killed"
  rc, out = run_train(world, wd, 4, env={"MRM_JAX_FAULT_KILL_AT_STEP": "5"})
  assert rc == -9, out
  ref = train_losses(reference)
  before = train_losses(wd)
  assert sorted(before) == [1, 2, 3, 4, 5]
  # same seed, fresh run: bit-identical losses
  assert all(before[s] == ref[s] for s in before)
  rc, out = run_train(world, wd, 4)
  assert rc == 0, out
  assert json.loads(out[out.index("{") :])["resumed_from"] == 4
  assert train_losses(wd) == ref  # steps 5-6 replayed from the step-4 checkpoint: identical


def test_the_unshared_layout_trains_to_the_same_losses(reference, world):
  """The reference run packs each pair into one row (data.share_prompt, the default); the
  two-rows-per-pair layout must give the same losses and evaluation at every step."""
  man = json.loads((reference / "manifest.json").read_text())
  assert man["config"]["data"]["share_prompt"] is True
  wd = world / "unshared"
  rc, out = run_train(world, wd, 4, extra={"data.share_prompt": False})
  assert rc == 0, out
  ref, got = train_losses(reference), train_losses(wd)
  assert sorted(got) == sorted(ref)
  np.testing.assert_allclose(
    [got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], atol=1e-5
  )

  def evals(w):
    lines = (w / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if json.loads(x).get("split") == "eval"]

  (e_ref,), (e_got,) = evals(reference), evals(wd)
  for k in ("loss", "accuracy", "reward_margin"):
    np.testing.assert_allclose(e_got[k], e_ref[k], atol=1e-5, err_msg=k)


def launch(world: Path, command: list[str], logs: Path, processes: int, devices: int, env=None):
  """`command` as `processes` local processes of `devices` CPU devices each (launch/local.sh)."""
  return subprocess.run(
    [
      "bash",
      str(REPO / "launch" / "local.sh"),
      "-n",
      str(processes),
      "-d",
      str(devices),
      "-p",
      str(free_port()),
      "-l",
      str(logs),
      "--",
      *command,
    ],
    env=train_env(world, devices, env),
    cwd=world,
    capture_output=True,
    text=True,
    timeout=600,
  )


def logs_text(logs: Path) -> str:
  return "".join(f.read_text() for f in sorted(logs.glob("*.log")))


def encoded_pairs(logs: Path) -> dict[int, int]:
  """`input: process I encoded K pairs`, the line each process logs at the end of a run."""
  return {
    int(m[1]): int(m[2])
    for m in re.finditer(r"input: process (\d+) encoded (\d+) pairs", logs_text(logs))
  }


def eval_metrics(workdir: Path) -> list[dict]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(x) for x in lines if json.loads(x).get("split") == "eval"]


def assert_same_losses(got: dict, ref: dict) -> None:
  assert sorted(got) == sorted(ref)
  np.testing.assert_allclose(
    [got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], atol=1e-5
  )


@pytest.fixture(scope="module")
def two_processes(world):
  """The reference run on 2 processes x 2 CPU devices (launch/local.sh, jax.distributed on
  loopback): (workdir, logs)."""
  wd, logs = world / "two_proc", world / "two_proc_logs"
  r = launch(world, train_command(world, wd), logs, 2, 2)
  assert r.returncode == 0, r.stderr + logs_text(logs)
  return wd, logs


def test_two_processes_via_launch_local_match_one_process(reference, two_processes):
  """Two processes must train to the losses and evaluation of 1 process x 4 devices, each
  encoding only its half of the pairs (6 steps of 4 pairs, then the 6 evaluation pairs)."""
  wd, logs = two_processes
  assert sorted(f.name for f in logs.iterdir()) == ["process-0.log", "process-1.log"]
  assert_same_losses(train_losses(wd), train_losses(reference))
  (e_ref,), (e_got,) = eval_metrics(reference), eval_metrics(wd)
  assert e_got["count"] == e_ref["count"] == 6
  for k in ("loss", "accuracy", "reward_margin"):
    np.testing.assert_allclose(e_got[k], e_ref[k], atol=1e-5, err_msg=k)
  assert json.loads((wd / "manifest.json").read_text())["devices"]["processes"] == 2
  # training: 12 pairs each; evaluation: batches of 4 pairs, the second half empty: 4 and 2
  assert encoded_pairs(logs) == {0: 12 + 4, 1: 12 + 2}


def test_two_process_run_killed_resumes_on_four_processes(reference, world, tmp_path):
  """A run on 2 processes x 2 devices, SIGKILLed right after step 5 (its step-4 checkpoint
  committed), resumes on 4 processes of one device each: they train on from step 4 to the losses
  of the uninterrupted single-process run, each encoding a quarter of the pairs. (Evaluation is
  off: the two-process run above checks its split.)"""
  wd = tmp_path / "two_then_four"
  command = train_command(world, wd, extra={"data.eval": ""})
  logs = tmp_path / "logs_two"
  r = launch(world, command, logs, 2, 2, env={"MRM_JAX_FAULT_KILL_AT_STEP": "5"})
  assert r.returncode != 0 and "failed" in r.stderr, r.stderr + logs_text(logs)
  assert sorted(train_losses(wd)) == [1, 2, 3, 4, 5]
  assert "6" not in os.listdir(wd / "checkpoints")
  logs = tmp_path / "logs_four"
  r = launch(world, command, logs, 4, 1)
  assert r.returncode == 0, r.stderr + logs_text(logs)
  assert "at step 4" in logs_text(logs)
  assert_same_losses(train_losses(wd), train_losses(reference))
  # steps 5 and 6: 4 pairs each, one per process and step
  assert encoded_pairs(logs) == {0: 2, 1: 2, 2: 2, 3: 2}


def test_scoring_on_two_processes_writes_what_one_process_writes(reference, world, tmp_path):
  """`mrm-jax score` on 2 processes x 1 device (each encodes the records of its own sub-batches)
  writes the bytes 1 process x 2 devices writes: the same sub-batches, padded to the same shapes."""
  pairs = [json.loads(line) for line in (world / "eval.jsonl").read_text().splitlines()]
  records = [
    {"id": f"{p['id']}:{k}", "images": p["images"], "question": p["question"], "answer": p[k]}
    for p in pairs
    for k in ("chosen", "rejected")
  ]
  records[3]["question"] = "<image>" + "Look closely. " * 6 + "What colour is the square?"
  (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

  def command(out: str) -> list[str]:
    return [
      sys.executable,
      "-m",
      "mrm_jax.cli",
      "score",
      "--model",
      str(reference),
      "--input",
      str(tmp_path / "records.jsonl"),
      "--image-root",
      str(world),
      "--output",
      str(tmp_path / out),
      "--batch-size",
      "4",
      "--chunk-size",
      "8",
    ]

  one = subprocess.run(
    command("one.jsonl"), env=train_env(world, 2), cwd=world, capture_output=True, text=True
  )
  assert one.returncode == 0, one.stderr
  logs = tmp_path / "logs"
  two = launch(world, command("two.jsonl"), logs, 2, 1)
  assert two.returncode == 0, two.stderr + logs_text(logs)
  assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
  assert len((tmp_path / "one.jsonl").read_text().splitlines()) == len(records)
  # 12 records in steps of 4, 2 per process and step
  found = re.findall(r"input: process (\d) encoded (\d+) records", logs_text(logs))
  assert sorted(found) == [("0", "6"), ("1", "6")]


SLURM_PROBE = """
import sys
from mrm_jax import distributed
settings = distributed.initialize(None)
import jax
import numpy as np
from jax.experimental import multihost_utils
got = multihost_utils.process_allgather(np.array([jax.process_index() + 10]))
counts = jax.process_count(), jax.device_count()
print("JOINED", settings["process_id"], *counts, got.ravel().tolist())
"""


def test_slurm_environment_is_detected_and_joins(tmp_path):
  """Two local processes with hand-set SLURM variables find the coordinator (first node of the
  nodelist), take their ranks from SLURM_PROCID and exchange data over gloo."""
  port = free_port()
  procs = []
  for i in range(2):
    env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      SLURM_JOB_ID="4242",
      SLURM_PROCID=str(i),
      SLURM_NTASKS="2",
      SLURM_JOB_NODELIST="localhost",
      MRM_JAX_COORDINATOR_PORT=str(port),
    )
    procs.append(
      subprocess.Popen(
        [sys.executable, "-c", SLURM_PROBE],
        env=env,
        cwd=tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
      )
    )
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  for i, out in enumerate(outs):
    line = next(x for x in out.splitlines() if x.startswith("JOINED"))
    assert line.split(maxsplit=1)[1] == f"{i} 2 4 [10, 11]"


def test_restore_onto_another_device_count_reproduces_eval(reference, world, tmp_path):
  """The 4-device checkpoint loads onto this process's 8 devices and gives the logged eval loss."""
  from mrm_jax.train import loop
  from mrm_jax.train.data import eval_batches, make_processor

  model, cfg = loop.load_model_from_workdir(reference)
  cfg.data.eval = str(world / "eval.jsonl")
  proc = make_processor(cfg, str(world / "model"))
  import jax.numpy as jnp

  from mrm_jax.train.loss import pair_loss

  total, n = 0.0, 0.0
  for b in eval_batches(cfg, proc):
    rewards = model({k: jnp.asarray(v) for k, v in b.items()})
    loss, _ = pair_loss(rewards, weights=jnp.asarray(b["pair_mask"]))
    total += float(loss) * float(b["pair_mask"].sum())
    n += float(b["pair_mask"].sum())
  ev = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()][-1]
  assert ev["split"] == "eval"
  assert total / n == pytest.approx(ev["loss"], abs=1e-5)
  # `mrm-jax export --checkpoint WORKDIR` writes an HF directory that scores identically
  from mrm_jax.cli import main

  assert main(["export", "--checkpoint", str(reference), "--output", str(tmp_path / "hf")]) == 0
  from mrm_jax.models import hf_io

  hf_model = hf_io.load_hf(tmp_path / "hf")
  b = {k: jnp.asarray(v) for k, v in next(iter(eval_batches(cfg, proc))).items()}
  np.testing.assert_allclose(np.asarray(hf_model(b)), np.asarray(model(b)), atol=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(world, tmp_path):
  from mrm_jax.config import apply_overrides, load_config_file
  from mrm_jax.train.loop import train

  cfg = load_config_file(str(REPO / "configs" / "demo.py"))
  apply_overrides(
    cfg,
    overrides(
      world,
      **{
        "train.learning_rate": 1e35,
        "train.warmup_ratio": 0.0,
        "train.checkpoint_every": 1,
        "train.grad_clip": 0.0,
        "data.eval": "",
        "mesh.data": 1,
        "mesh.fsdp": 1,
      },
    ),
  )
  import jax

  with pytest.raises(
    UserError, match=r"loss is (nan|inf).*last good checkpoint is step (\d+)"
  ) as e:
    train(cfg, tmp_path / "nan", progress=False, devices=jax.devices()[:1])
  good = int(str(e.value).rsplit("step ", 1)[1].split()[0])
  steps = sorted(
    int(p.name) for p in (tmp_path / "nan" / "checkpoints").iterdir() if p.name.isdigit()
  )
  assert steps and steps[-1] == good
  losses = train_losses(tmp_path / "nan")
  assert all(np.isfinite(v) for v in losses.values()) and max(losses) == good


def test_score_evaluate_and_best_of_n_take_a_training_workdir(reference, world, tmp_path):
  """`--model WORKDIR` loads the latest checkpoint with the run's processor: the same rewards as
  the HF directory `mrm-jax export` writes from it."""
  from mrm_jax.cli import main

  hf = tmp_path / "hf"
  assert main(["export", "--checkpoint", str(reference), "--output", str(hf)]) == 0
  pairs = [json.loads(line) for line in (world / "eval.jsonl").read_text().splitlines()]
  from mrm_jax.data.records import (
    REWARD_SYSTEM_PROMPT,
  )  # what best-of-n shows when a record has none

  records = [
    {
      "id": f"{p['id']}:{side}",
      "images": p["images"],
      "question": p["question"],
      "answer": p[side],
      "system": REWARD_SYSTEM_PROMPT,
    }
    for p in pairs
    for side in ("chosen", "rejected")
  ]
  (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  cands = [
    {
      "id": p["id"],
      "images": p["images"],
      "question": p["question"],
      "responses": [p["rejected"], p["chosen"]],
    }
    for p in pairs
  ]
  (tmp_path / "cands.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cands))
  got = {}
  for name, model in (("workdir", reference), ("hf", hf)):
    out = tmp_path / f"with_{name}"
    out.mkdir()
    common = ["--model", str(model)]
    assert (
      main(
        [
          "score",
          *common,
          "--input",
          str(tmp_path / "records.jsonl"),
          "--image-root",
          str(world),
          "--output",
          str(out / "scores.jsonl"),
        ]
      )
      == 0
    )
    assert (
      main(
        [
          "evaluate",
          "--benchmark",
          "pairs",
          "--data",
          str(world / "eval.jsonl"),
          *common,
          "--output",
          str(out / "report.json"),
        ]
      )
      == 0
    )
    assert (
      main(
        [
          "best-of-n",
          *common,
          "--input",
          str(tmp_path / "cands.jsonl"),
          "--image-root",
          str(world),
          "--output",
          str(out / "best.jsonl"),
        ]
      )
      == 0
    )
    got[name] = {
      "scores": [json.loads(x)["score"] for x in (out / "scores.jsonl").read_text().splitlines()],
      "accuracy": json.loads((out / "report.json").read_text())["accuracy"],
      "best": [json.loads(x)["scores"] for x in (out / "best.jsonl").read_text().splitlines()],
    }
  assert len(got["workdir"]["scores"]) == 2 * len(pairs)
  np.testing.assert_allclose(got["workdir"]["scores"], got["hf"]["scores"], atol=1e-5)
  np.testing.assert_allclose(got["workdir"]["best"], got["hf"]["best"], atol=1e-5)
  assert got["workdir"]["accuracy"] == got["hf"]["accuracy"]
  # and the scores of one pair are the best-of-n scores of its two responses
  np.testing.assert_allclose(got["workdir"]["best"][0], got["workdir"]["scores"][1::-1], atol=1e-5)


def test_a_workdir_without_checkpoints_is_named(reference, tmp_path, capsys):
  from mrm_jax.cli import main

  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "manifest.json").write_bytes((reference / "manifest.json").read_bytes())
  (tmp_path / "r.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
  assert (
    main(
      [
        "score",
        "--model",
        str(tmp_path / "run"),
        "--input",
        str(tmp_path / "r.jsonl"),
        "--output",
        str(tmp_path / "o.jsonl"),
      ]
    )
    == 2
  )
  assert "no checkpoint found under" in capsys.readouterr().err
