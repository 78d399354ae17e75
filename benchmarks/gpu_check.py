"""The H200 check of issue 21 in one command: every accelerator measurement, each in its own
subprocess under its own time limit, one JSON line per step appended to OUT/gpu_check.jsonl as soon
as it ends (so a step that crashes or times out loses only itself), all output in OUT/gpu_check.log.

  python benchmarks/gpu_check.py --out $OUT               # on the GPU machine (gpu_check.sh)
  python benchmarks/gpu_check.py --dry-run --out /tmp/gc  # every step on CPU, tiny shapes (CI)
  python benchmarks/gpu_check.py --out $OUT --only 2.3,3  # rerun what failed (step ids or groups)

Steps (ids for --only; "2" selects 2.1-2.4):
  0    env               versions, devices, whether tensorflow is importable (it is not needed)
  1    bf16_rewards      tiny presets of qwen2_vl, qwen2_5_vl, qwen3_vl: bf16 rewards with
                         attention auto (and cudnn on a GPU) against fp32 on the CPU device at
                         highest matmul precision
  2.1  peer_train_gc0    shared/bench/peer_torch_rm_step.py --gc 0 (PyTorch + transformers)
  2.2  peer_train_gc1    ... --gc 1
  2.3  train_remat_none  benchmarks/train_step.py --preset qwen2vl_2b_shape --remat none
  2.4  train_remat_full  ... --remat full
  3.1  peer_score        the peer's --score 1 with 32 sequences per batch
  3.2  score             benchmarks/score.py, Qwen2-VL-2B shapes, bf16, batch 32
  4    input_encoding    benchmarks/input_pipeline.py --engine pool on every core: pairs/s
  and a last line `summary`: ratios against the peer and against the train step, from the newest
  line of each step in the file (so a partial rerun completes the picture).

The dry run runs the peer on CPU through `--inner peer-cpu`: the peer script hard-codes CUDA and the
2B dimensions and has no flags for either, so a torch function mode moves its tensors to the CPU and
its Qwen2VLConfig is shrunk (1 layer each; hidden 1536, which its value head hard-codes, kept).
A global `--budget` caps the whole run: a step's limit is cut to what is left, and a step with too
little left is recorded as skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_NAME = "peer_torch_rm_step.py"
# where the peer may lie: copied into the repo for the device (gpu_check.sh --prepare), a shared/
# inside the
# checkout (it travels to the device), or the shared/ beside the checkout (the development machine)
PEER_SEARCH = (
  ROOT / ".gpu_check" / "bench",
  ROOT / "shared" / "bench",
  ROOT.parent / "shared" / "bench",
)
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
MIN_STEP_S = 15  # a step is skipped rather than started with less than this left of the budget
TAIL = 3000  # characters of a failed step's output kept in its JSON line
LOG_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Step:
  id: str
  name: str
  cmd: str  # after the python executable; {peer}, {me} (this file) and {cores} are filled in
  dry_cmd: str  # the same on CPU with tiny shapes
  limit_s: int
  dry_limit_s: int = 120

  def argv(self, dry: bool, **fill) -> list[str]:
    return [x.format(**fill) for x in shlex.split(self.dry_cmd if dry else self.cmd)]

  @property
  def needs_peer(self) -> bool:
    return "{peer}" in self.cmd


PEER_TINY = "--pairs 1 --text 8 --img 28 --steps 1"  # with --inner peer-cpu's 1-layer model
PEER_CPU = "{me} --inner peer-cpu {peer}"
TRAIN = "benchmarks/train_step.py --preset qwen2vl_2b_shape"
TRAIN_TINY = "benchmarks/train_step.py --preset tiny --steps 1"
INPUT = "benchmarks/input_pipeline.py --engine pool --cores {cores}"
STEPS = (
  Step("0", "env", "{me} --inner env", "{me} --inner env", 60),
  Step("1", "bf16_rewards", "{me} --inner bf16", "{me} --inner bf16", 150),
  Step("2.1", "peer_train_gc0", "{peer} --gc 0", f"{PEER_CPU} --gc 0 {PEER_TINY}", 120),
  Step("2.2", "peer_train_gc1", "{peer} --gc 1", f"{PEER_CPU} --gc 1 {PEER_TINY}", 120),
  Step("2.3", "train_remat_none", f"{TRAIN} --remat none", f"{TRAIN_TINY} --remat none", 180),
  Step("2.4", "train_remat_full", f"{TRAIN} --remat full", f"{TRAIN_TINY} --remat full", 180),
  # 32 sequences per batch: the peer's batch is 2 * pairs rows
  Step(
    "3.1",
    "peer_score",
    "{peer} --score 1 --gc 0 --pairs 16",
    f"{PEER_CPU} --score 1 --gc 0 {PEER_TINY} --pairs 2",
    120,
  ),
  # the peer's sequences: one 448² image (256 merged tokens) and ~768 text tokens
  Step(
    "3.2",
    "score",
    "benchmarks/score.py --preset qwen2-vl-2b --dtype bfloat16 --n 128 --batch-size 32 "
    "--image-size 448 --text-tokens 700",
    "benchmarks/score.py --preset tiny --n 8 --batch-size 4",
    180,
  ),
  Step(
    "4",
    "input_encoding",
    f"{INPUT} --batch 8 --batches 8 --warmup 1 --pairs 128",
    f"{INPUT} --batch 2 --batches 2 --warmup 1 --pairs 8 --images 2 --image-size 112",
    120,
  ),
)


def select(only: str | None) -> list[Step]:
  """Steps named by `--only` ("1,2.3": a step id, or a group id that selects all its sub-steps)."""
  if not only:
    return list(STEPS)
  wanted = [w.strip() for w in only.split(",") if w.strip()]
  known = {s.id for s in STEPS} | {s.id.split(".")[0] for s in STEPS}
  bad = [w for w in wanted if w not in known]
  if bad:
    raise SystemExit(
      f"--only: unknown step {', '.join(bad)} (known: {', '.join(s.id for s in STEPS)})"
    )
  return [s for s in STEPS if s.id in wanted or s.id.split(".")[0] in wanted]


def find_peer(explicit: str | None) -> Path | None:
  if explicit:
    return Path(explicit)
  return next((d / PEER_NAME for d in PEER_SEARCH if (d / PEER_NAME).is_file()), None)


# -- running steps ---------------------------------------------------------------------------------


def last_json(text: str) -> dict | None:
  """The last line of `text` that is a JSON object (the figures a benchmark prints)."""
  for line in reversed(text.strip().splitlines()):
    line = line.strip()
    if line.startswith("{"):
      try:
        return json.loads(line)
      except ValueError:
        continue
  return None


def run_step(step: Step, argv: list[str], limit: float, env: dict, log) -> dict:
  """Runs one step in its own process group; on timeout the whole group is killed."""
  t0 = time.perf_counter()
  proc = subprocess.Popen(
    argv,
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=True,
  )
  timed_out = False
  try:
    out, _ = proc.communicate(timeout=limit)
  except subprocess.TimeoutExpired:
    timed_out = True
    os.killpg(proc.pid, signal.SIGKILL)  # the step's own process group, started above
    out, _ = proc.communicate()
  seconds = time.perf_counter() - t0
  with LOG_LOCK:  # whole steps at a time: with --jobs, steps end in any order
    log.write(
      f"\n===== step {step.id} {step.name}: {' '.join(argv)} "
      f"(limit {limit:.0f} s, took {seconds:.1f} s)\n"
    )
    log.write(out or "")
    log.flush()
  figures = last_json(out or "")
  ok = (
    not timed_out
    and proc.returncode == 0
    and figures is not None
    and figures.get("ok", True) is not False
  )
  rec = {
    "step": step.id,
    "name": step.name,
    "ok": ok,
    "seconds": round(seconds, 1),
    "limit_s": round(limit),
    "cmd": " ".join(argv[1:]),
    "figures": figures,
  }
  if not ok:
    why = f"timed out after {limit:.0f} s" if timed_out else f"exit status {proc.returncode}"
    if figures is None and not timed_out and proc.returncode == 0:
      why = "no JSON line in the output"
    rec["error"] = why + ": " + (out or "")[-TAIL:]
  return rec


def child_env(dry: bool) -> dict:
  env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
  # the project is not installed on the device machine: its checkout is the import root
  paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + paths)
  if dry:
    env["JAX_PLATFORMS"] = "cpu"
    env["CUDA_VISIBLE_DEVICES"] = ""
  return env


def newest_by_step(path: Path) -> dict[str, dict]:
  out = {}
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        rec = json.loads(line)
      except ValueError:
        continue
      if rec.get("step") not in (None, "summary"):
        out[rec["step"]] = rec
  return out


def summary(recs: dict[str, dict]) -> dict:
  """Ratios the issue asks for, from the newest ok line of each step."""
  fig = {k: r["figures"] for k, r in recs.items() if r.get("ok") and r.get("figures")}

  def get(k, name):
    return (fig.get(k) or {}).get(name)

  def best(ks, name):
    return max((get(k, name) for k in ks if get(k, name) is not None), default=None)

  def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None

  fams = get("1", "families") or {}
  peer_tok, jax_tok = best(("2.1", "2.2"), "tokens_per_s"), best(("2.3", "2.4"), "tokens_per_s")
  train_pairs = best(("2.3", "2.4"), "pairs_per_s")
  out = {
    "bf16_max_abs_diff": {f: fams.get(f, {}).get("bf16_auto_max_abs") for f in FAMILIES},
    "bf16_cudnn_max_abs_diff": {f: fams.get(f, {}).get("bf16_cudnn_max_abs") for f in FAMILIES},
    "peer_best_tokens_per_s": peer_tok,
    "train_best_tokens_per_s": jax_tok,
    "train_over_peer_tokens": ratio(jax_tok, peer_tok),
    "score_over_peer_sequences": ratio(
      get("3.2", "sequences_per_s"), get("3.1", "sequences_per_s")
    ),
    "input_pairs_per_s": get("4", "pairs_per_s"),
    "train_best_pairs_per_s": train_pairs,
    "input_over_train_pairs": ratio(get("4", "pairs_per_s"), train_pairs),
  }
  missing = [s.id for s in STEPS if not recs.get(s.id, {}).get("ok")]
  return {
    "step": "summary",
    "name": "summary",
    "ok": not missing,
    "figures": out,
    "not_ok": missing,
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=__doc__,
  )
  p.add_argument(
    "--out", help="folder for gpu_check.jsonl and gpu_check.log (default: $OUT, else gpu_check_out)"
  )
  p.add_argument(
    "--dry-run",
    "--cpu",
    dest="dry_run",
    action="store_true",
    help="every step on CPU with tiny shapes (what CI runs)",
  )
  p.add_argument("--only", help="comma-separated step ids or groups, e.g. 1,2.3 or 3")
  p.add_argument(
    "--budget", type=float, default=450.0, help="seconds for the whole run (default 450)"
  )
  p.add_argument(
    "--peer",
    help=f"path of {PEER_NAME} (default: the first of {', '.join(str(d) for d in PEER_SEARCH)})",
  )
  p.add_argument("--python", default=sys.executable, help="interpreter for the steps")
  p.add_argument(
    "--jobs",
    type=int,
    default=1,
    help="steps run at a time (CI's dry run: 2; on the device keep 1, the steps time the GPU)",
  )
  p.add_argument("--inner", help=argparse.SUPPRESS)
  a, rest = p.parse_known_args(argv)
  if a.inner:
    return INNER[a.inner](rest)
  if rest:
    p.error(f"unrecognized arguments: {' '.join(rest)}")

  out_dir = Path(a.out or os.environ.get("OUT") or "gpu_check_out")
  out_dir.mkdir(parents=True, exist_ok=True)
  jsonl = out_dir / "gpu_check.jsonl"
  peer = find_peer(a.peer)
  cores = str(len(os.sched_getaffinity(0)))
  env = child_env(a.dry_run)
  deadline = time.perf_counter() + a.budget

  def one(step: Step) -> dict:
    left = deadline - time.perf_counter()
    limit = min(step.dry_limit_s if a.dry_run else step.limit_s, left)
    base = {
      "step": step.id,
      "name": step.name,
      "dry_run": a.dry_run,
      "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if step.needs_peer and (peer is None or not peer.is_file()):
      rec = {
        "ok": False,
        "seconds": 0.0,
        "error": f"{PEER_NAME} not found (searched "
        f"{', '.join(str(d) for d in PEER_SEARCH)}; give --peer, or run gpu_check.sh --prepare)",
      }
    elif limit < MIN_STEP_S:
      rec = {
        "ok": False,
        "seconds": 0.0,
        "error": f"skipped: {left:.0f} s left of --budget {a.budget:.0f}",
      }
    else:
      cmd = [a.python] + step.argv(a.dry_run, peer=peer, cores=cores, me=Path(__file__).resolve())
      rec = run_step(step, cmd, limit, env, log)
    return dict(base, **rec)

  def record(rec: dict) -> None:
    with open(jsonl, "a") as f:  # at once: a later step's crash or timeout cannot lose this line
      f.write(json.dumps(rec) + "\n")
    print(json.dumps({k: rec.get(k) for k in ("step", "name", "ok", "seconds")}), flush=True)

  steps = select(a.only)
  with open(out_dir / "gpu_check.log", "a") as log:
    if a.jobs <= 1:
      for step in steps:
        record(one(step))
    else:  # lines still in step order, each written once it and every step before it have ended
      from concurrent.futures import ThreadPoolExecutor

      with ThreadPoolExecutor(a.jobs) as pool:
        for rec in pool.map(one, steps):
          record(rec)
  rec = dict(
    summary(newest_by_step(jsonl)), dry_run=a.dry_run, time=time.strftime("%Y-%m-%dT%H:%M:%S")
  )
  record(rec)
  print(json.dumps(rec), flush=True)
  return 0


# -- steps that run inside this file (--inner NAME) ------------------------------------------------


def inner_env(_argv) -> int:
  import importlib.metadata as md
  import platform

  import jax

  vers = {}
  for name in (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "transformers",
    "torch",
    "ml_collections",
    "numpy",
    "tensorflow",
  ):
    try:
      vers[name] = md.version(name)
    except md.PackageNotFoundError:
      vers[name] = None
  try:
    import tensorflow  # noqa: F401

    tf_ok = True
  except ImportError:
    tf_ok = False
  devs = jax.devices()
  print(
    json.dumps(
      {
        "python": platform.python_version(),
        "versions": vers,
        "tensorflow_importable": tf_ok,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in devs],
        "cpu_cores": len(os.sched_getaffinity(0)),
      }
    )
  )
  return 0


def tiny_batch(fam, cfg, seed: int = 0) -> dict:
  """Four rows (two pairs) of the tiny preset: images of two sizes, two images in a row, a text-only
  row,
  right padding; built with the family's own numpy hooks and `collate`, as the processor does."""
  import numpy as np

  from mrm_jax.models.processor import Encoded, collate

  rng = np.random.default_rng(seed)
  rows = [
    [("text", 7), ("image", (1, 4, 4)), ("text", 9)],
    [("text", 21)],
    [("text", 3), ("image", (1, 6, 4)), ("text", 4), ("image", (1, 2, 2)), ("text", 5)],
    [("text", 4), ("image", (1, 4, 4)), ("text", 12)],
  ]
  high = min(
    cfg.text.vocab_size,
    min(cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id),
  )
  examples = []
  for segments in rows:
    ids, grids, pixels = [], [], []
    for kind, arg in segments:
      if kind == "text":
        ids += rng.integers(1, high, size=arg).tolist()
        continue
      n = int(np.prod(arg)) // cfg.merge_size**2
      ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
      grids.append(arg)
      pixels.append(
        rng.standard_normal((int(np.prod(arg)), cfg.vision.patch_dim)).astype(np.float32)
      )
    ids = np.asarray(ids, np.int32)
    thw = np.asarray(grids, np.int32).reshape(-1, 3)
    px = np.concatenate(pixels) if pixels else np.zeros((0, cfg.vision.patch_dim), np.float32)
    examples.append(
      Encoded(
        ids,
        fam.rope_index(ids, thw, cfg).astype(np.int32),
        px,
        thw,
        fam.vision_patch_arrays(thw, cfg),
        vision_kinds=("image",) * len(grids),
      )
    )
  seq = max(e.length for e in examples) + 5
  return collate(examples, seq, None, merge_size=cfg.merge_size, patch_dim=cfg.vision.patch_dim)


def random_weights(graph, family, cfg, seed: int = 0):
  """Numpy random weights for the model's abstract state: norm scales near 1, the rest normal(0.05)
  (as the
  PyTorch parity fixtures randomise), so that rewards are O(1) and no initializer is compiled."""
  import jax
  import numpy as np
  from flax import nnx

  from mrm_jax.models import common, create_reward_model

  rng = np.random.default_rng(seed)
  with common.abstract_params():
    state = nnx.state(create_reward_model(family, cfg, nnx.Rngs(0)))

  def fill(path, x):
    noise = rng.standard_normal(x.shape).astype(np.float32)
    return 1.0 + 0.1 * noise if "scale" in jax.tree_util.keystr(path) else 0.05 * noise

  return jax.tree_util.tree_map_with_path(fill, state)


def inner_bf16(_argv) -> int:
  """Rewards of each family's tiny preset (same random weights): fp32 on the CPU device at highest
  matmul precision is the reference (the path the PyTorch parity tests check); against it fp32 and
  bf16 with
  attention auto on the default device, and bf16 with cuDNN attention where the device is a GPU."""
  import jax
  import numpy as np
  from flax import nnx

  from mrm_jax.models import common, create_reward_model, get_family

  cpu, dev = jax.devices("cpu")[0], jax.devices()[0]

  def graph(family, cfg, dtype, attention):
    # the compute dtype and attention live in the graph; the fp32 weights are shared (no second
    # init)
    with common.abstract_params():
      return nnx.split(
        create_reward_model(family, cfg, nnx.Rngs(0), dtype=dtype, attention=attention)
      )[0]

  def rewards(graphdef, state, batch, device, precision):
    with jax.default_matmul_precision(precision):
      fn = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b))
      return np.asarray(
        fn(jax.device_put(state, device), jax.device_put(batch, device)), np.float64
      )

  out, ok = {}, True
  for family in FAMILIES:
    fam = get_family(family)
    cfg = fam.PRESETS["tiny"]
    batch = tiny_batch(fam, cfg)
    graphdef, state = graph(family, cfg, "float32", None), random_weights(graph, family, cfg)
    ref = rewards(graphdef, state, batch, cpu, "highest")
    scale = float(np.max(np.abs(ref)))
    runs = {"bf16_auto": ("bfloat16", None, "default")}
    if (
      dev.platform != "cpu"
    ):  # on a CPU-only machine fp32 on the default device is the reference itself
      runs["fp32_auto"] = ("float32", None, "highest")
    if dev.platform == "gpu":
      runs["bf16_cudnn"] = ("bfloat16", "cudnn", "default")
    res = {"reference_max_abs": round(scale, 6)}
    # relative to the size of the rewards (a tiny random model's are ~0.1-0.3); bf16 keeps 8
    # mantissa bits
    tol = {"fp32": 1e-3 * scale + 1e-6, "bf16": 0.05 * scale + 1e-3}
    for name, (dtype, attention, precision) in runs.items():
      try:
        r = rewards(graph(family, cfg, dtype, attention), state, batch, dev, precision)
        diff = float(np.max(np.abs(r - ref))) if np.all(np.isfinite(r)) else float("inf")
        res[f"{name}_max_abs"] = round(diff, 6)
        ok &= diff <= tol[name[:4]]
      except Exception as e:  # one configuration failing must not hide the others' figures
        res[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        ok = False
    res["tolerance_bf16"], res["tolerance_fp32"] = round(tol["bf16"], 6), round(tol["fp32"], 8)
    out[family] = res
  print(
    json.dumps({"ok": ok, "device": dev.device_kind, "platform": dev.platform, "families": out})
  )
  return 0 if ok else 1


def inner_peer_cpu(argv) -> int:
  """Runs the PyTorch peer (argv[0], its flags after) on the CPU with a tiny model, without editing
  it."""
  import runpy

  import torch
  import transformers
  from torch.overrides import TorchFunctionMode

  vocab = 512
  special = dict(
    image_token_id=506, video_token_id=507, vision_start_token_id=504, vision_end_token_id=505
  )

  def cpu(x):
    if isinstance(x, str) and x.startswith("cuda"):
      return "cpu"
    return torch.device("cpu") if isinstance(x, torch.device) and x.type == "cuda" else x

  class ToCPU(TorchFunctionMode):
    """Every device argument "cuda" becomes "cpu"; random token ids stay inside the tiny
    vocabulary."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
      args, kwargs = [cpu(x) for x in args], {k: cpu(v) for k, v in (kwargs or {}).items()}
      if func is torch.randint and len(args) >= 2 and isinstance(args[1], int):
        args[1] = min(args[1], min(special.values()))
      return func(*args, **kwargs)

  real = transformers.Qwen2VLConfig

  def tiny_config(text_config, vision_config, **kw):
    # hidden 1536 and head_dim 128 stay: the peer's value head and mrope_section hard-code them
    text_config = dict(text_config, num_hidden_layers=1, intermediate_size=64, vocab_size=vocab)
    vision_config = dict(vision_config, depth=1, embed_dim=32, num_heads=2)
    return real(text_config=text_config, vision_config=vision_config, **dict(kw, **special))

  torch.cuda.synchronize = lambda *a, **k: None
  torch.cuda.max_memory_allocated = lambda *a, **k: 0
  transformers.Qwen2VLConfig = tiny_config
  sys.argv = list(argv)
  with ToCPU():
    runpy.run_path(argv[0], run_name="__main__")
  return 0


INNER = {"env": inner_env, "bf16": inner_bf16, "peer-cpu": inner_peer_cpu}

if __name__ == "__main__":
  sys.exit(main())
