"""Who encodes what when `mrm-jax train` runs on several processes (issue 22): the same run as
1 process x 4 devices, 2 x 2 and 4 x 1 (launch/local.sh, CPU devices), each process's
`input: process I encoded K pairs` line, its CPU time, the run's wall time, and whether the losses
agree. Prints one JSON line per layout.

  python benchmarks/scale_out.py                       # 20 steps of 8 pairs, 224² images
  python benchmarks/scale_out.py --img 448 --seq 320   # 448² images (256 tokens each)
  python benchmarks/scale_out.py --steps 4 --img 56    # quick look
  python benchmarks/scale_out.py --pythonpath /tmp/old # another checkout (e.g. `git archive` of
                                                       # the code before issue 22), same runs

The world: a tiny Qwen2-VL-shaped model directory (random weights, the demo tokenizer) and pairs
"what colour is the square" with one image each. Every process pays the same start-up and
compilation, so on a small machine the wall time says little; the CPU time and the pairs encoded
per process show the split of the input work.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mrm_jax.demo.model_dir import write_model_dir

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def make_world(root: Path, n: int, img: int) -> None:
  md = root / "model"
  write_model_dir(md)
  c = json.loads((md / "config.json").read_text())
  c["text_config"].update(
    hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1
  )
  c["vision_config"].update(embed_dim=32, hidden_size=32, num_heads=2)
  (md / "config.json").write_text(json.dumps(c))
  (root / "img").mkdir(exist_ok=True)
  rng = np.random.default_rng(0)
  names = list(COLOURS)
  with open(root / "train.jsonl", "w") as f:
    for i in range(n):
      col, wrong = rng.choice(names, 2, replace=False)
      a = rng.integers(0, 256, (img, img, 3), dtype=np.uint8)
      a[img // 4 : 3 * img // 4, img // 4 : 3 * img // 4] = COLOURS[col]
      Image.fromarray(a).save(root / "img" / f"{i}.png")
      pair = {
        "id": str(i),
        "images": [f"img/{i}.png"],
        "question": "<image>What colour is the square?",
        "chosen": f"The square is {col}.",
        "rejected": f"The square is {wrong}.",
      }
      f.write(json.dumps(pair) + "\n")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run(root: Path, processes: int, devices: int, args, pythonpath: str | None) -> dict:
  wd, logs = root / f"run_{processes}x{devices}", root / f"logs_{processes}x{devices}"
  o = {
    "model.path": root / "model",
    "data.train": root / "train.jsonl",
    "data.eval": "",
    "data.max_pixels": args.img * args.img,
    "data.max_seq_len": args.seq,
    "data.seq_buckets": f"({args.seq},)",
    "data.num_workers": 2,
    "train.num_steps": args.steps,
    "train.batch_size": args.batch,
    "train.log_every": 1,
    "train.checkpoint_every": 10**6,
    "train.tensorboard": False,
    "mesh.data": 4,
    "mesh.fsdp": 1,
    "mesh.tensor": 1,
  }
  command = [
    "/usr/bin/time",
    "-f",
    "cpu-seconds %U %S",
    sys.executable,
    "-m",
    "mrm_jax.cli",
    "train",
    "--config",
    str(REPO / "configs" / "demo.py"),
    "--workdir",
    str(wd),
    "--no-progress",
    *[f"--config.{k}={v}" for k, v in o.items()],
  ]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_DEFAULT_MATMUL_PRECISION="highest")
  if pythonpath:
    env["PYTHONPATH"] = pythonpath
  t0 = time.time()
  launcher = ["bash", str(REPO / "launch" / "local.sh"), "-n", str(processes), "-d", str(devices)]
  r = subprocess.run(
    [*launcher, "-p", str(free_port()), "-l", str(logs), "--", *command],
    env=env,
    cwd=root,  # `python -m` puts the working directory first on sys.path
    capture_output=True,
    text=True,
  )
  wall = time.time() - t0
  text = "".join(f.read_text() for f in sorted(logs.glob("*.log")))
  if r.returncode:
    raise SystemExit(r.stderr + text[-3000:])
  cpu = [
    round(float(u) + float(s), 1) for u, s in re.findall(r"cpu-seconds ([\d.]+) ([\d.]+)", text)
  ]
  encoded = {
    int(p): int(k) for p, k in re.findall(r"input: process (\d+) encoded (\d+) pairs", text)
  }
  recs = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
  return {
    "layout": f"{processes}x{devices}",
    "wall_s": round(wall, 1),
    "cpu_s_per_process": cpu,
    "pairs_encoded_per_process": [encoded[p] for p in sorted(encoded)] or None,
    "losses": [round(r["loss"], 6) for r in recs if r.get("split") != "eval"],
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--batch", type=int, default=8, help="pairs per step (global)")
  ap.add_argument("--img", type=int, default=224, help="image side (pixels)")
  ap.add_argument("--seq", type=int, default=128, help="sequence length (one bucket)")
  ap.add_argument("--layouts", nargs="+", default=["1x4", "2x2", "4x1"])
  ap.add_argument("--pythonpath", default=None, help="run this checkout's mrm_jax instead")
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as d:
    root = Path(d)
    make_world(root, args.steps * args.batch, args.img)
    first = None
    for layout in args.layouts:
      processes, devices = (int(x) for x in layout.split("x"))
      got = run(root, processes, devices, args, args.pythonpath)
      first = first or got["losses"]
      got["max_loss_diff"] = float(np.max(np.abs(np.subtract(got.pop("losses"), first))))
      print(json.dumps(got), flush=True)


if __name__ == "__main__":
  main()
