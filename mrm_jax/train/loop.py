"""The training loop: `train(cfg, workdir) -> summary` (used by `mrm-jax train` and `curate run`).

One run = build the mesh → build (or restore) the sharded train state → stream pair batches
→ jitted `train_step` → log / evaluate / checkpoint. A workdir that already holds
checkpoints is resumed from the latest one (parameters, optimizer, step, RNG and the input
iterator's position), so a killed run continues exactly where the uninterrupted one would.

With several processes each one encodes only its block of every global batch: the pairs of its
own devices (`sharding.process_block`; the input pipeline's lanes make the blocks' union the
batch one process would build). The processes agree once per step on the block's shapes (one
small allgather on the main thread, `train.data.agree`), shift their host-computed indices (vision
tokens, items, segment ids) to where their block lands, and `sharding.join_blocks` assembles the
global arrays on the devices, reordering a pair's rows when a block holds two per pair. The
iterator state names global positions, so a run resumes on another number of processes with the
batches an uninterrupted run would see; evaluation is split the same way. At the end each process
logs `input: process I encoded K pairs` (its share of the work). A data source without blocks
(`set_block`) yields the whole global batch on every process instead, as does a mesh that
interleaves processes along its batch axes.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from mrm_jax.errors import UserError
from mrm_jax.io import check_writable_dir, read_json_object
from mrm_jax.models import create_reward_model, get_family, hf_io, load_reward_model
from mrm_jax.train import metrics as mx
from mrm_jax.train import sharding as shd
from mrm_jax.train.checkpoint import Checkpointer
from mrm_jax.train.data import default_data_factory, stack_micro
from mrm_jax.train.manifest import build_manifest, write_manifest
from mrm_jax.train.optimizer import make_optimizer
from mrm_jax.train.step import Trainer, is_vision_path, split_model

log = logging.getLogger(__name__)

FAULT_ENV = "MRM_JAX_FAULT_KILL_AT_STEP"  # tests: SIGKILL this process right after that step


# -- model -----------------------------------------------------------------------------------------


def _attention(cfg) -> str | None:
  a = str(cfg.model.get("attention", "auto"))
  return None if a in ("", "auto") else a


class ModelSpec:
  """How to build the model of a run: `create()` gives random weights, `load()` the HF weights
  of `path`, and both agree on structure, so `nnx.eval_shape(create)` is the restore target."""

  def __init__(self, cfg, init_from: str | None = None):
    self.cfg = cfg
    self.path = init_from or cfg.model.path or ""
    self.kw = dict(
      dtype=cfg.model.dtype, param_dtype="float32", attention=_attention(cfg), remat=cfg.model.remat
    )
    if self.path:
      fam, self.model_config = hf_io.family_and_config(self.path)
      self.family = fam.MODEL_TYPE
    else:
      fam = get_family(cfg.model.family)
      self.family = fam.MODEL_TYPE
      if cfg.model.preset not in fam.PRESETS:
        raise UserError(
          f"unknown model.preset '{cfg.model.preset}' for {self.family} "
          f"(known: {', '.join(fam.PRESETS)})"
        )
      self.model_config = fam.PRESETS[cfg.model.preset]

  def has_weights(self) -> bool:
    """An HF directory may hold only config + tokenizer (the demo world's): then weights are
    random."""
    if not self.path:
      return False
    try:
      return bool(hf_io.weight_files(Path(self.path)))
    except UserError:
      return False

  def create(self, seed: int):
    return create_reward_model(self.family, self.model_config, nnx.Rngs(seed), **self.kw)

  def load(self):
    model, _ = load_reward_model(self.path, **self.kw)
    return model


# -- state -----------------------------------------------------------------------------------------


def _state_shardings(trainer_tx, params, frozen, rest, mesh):
  ps = shd.state_shardings(params, mesh)
  repl = shd.replicated(mesh)
  opt_abstract = jax.eval_shape(trainer_tx.init, params)
  opt_sh = optax.tree_map_params(
    trainer_tx, lambda _, s: s, opt_abstract, ps, transform_non_params=lambda _: repl
  )
  return {
    "step": repl,
    "params": ps,
    "frozen": shd.state_shardings(frozen, mesh),
    "rest": shd.state_shardings(rest, mesh),
    "opt_state": opt_sh,
    "rng": repl,
  }


class Setup:
  """Mesh, model graph, optimizer, shardings and the jitted steps of a run."""

  def __init__(
    self,
    cfg,
    *,
    num_steps: int,
    model_factory: Callable | None = None,
    init_from: str | None = None,
    devices=None,
  ):

    self.cfg = cfg
    self.mesh = shd.make_mesh(cfg.mesh, devices)
    self.spec = None if model_factory else ModelSpec(cfg, init_from)
    self.create = model_factory or self.spec.create
    with nnx.use_eager_sharding(False):
      abstract = nnx.eval_shape(lambda: self.create(int(cfg.seed)))
    self.abstract_model = abstract
    self.graphdef, a_params, a_frozen, a_rest = split_model(abstract, bool(cfg.model.freeze_vision))
    tx, schedule = make_optimizer(cfg.train, num_steps)
    self.shardings = _state_shardings(tx, a_params, a_frozen, a_rest, self.mesh)
    self.abstract_parts = (a_params, a_frozen, a_rest)
    self.trainer = Trainer(
      self.graphdef,
      tx,
      schedule,
      mesh=self.mesh,
      state_sharding=self.shardings,
      grad_accum=cfg.train.grad_accum,
      margin_scale=cfg.loss.margin_scale,
      center_weight=cfg.loss.center_weight,
    )

  def abstract_state(self):
    return self.trainer.abstract_state(*self.abstract_parts)

  def fresh_state(self, from_model=None):
    """Step-0 state: random init (built directly sharded, never whole on one device) or the
    weights of `from_model` (an HF load) placed onto the mesh."""
    seed = int(self.cfg.seed)
    sh = self.shardings
    freeze = bool(self.cfg.model.freeze_vision)
    if from_model is None:

      def init():
        with nnx.use_eager_sharding(False):
          _, p, f, r = split_model(self.create(seed), freeze)
        return p, f, r

      p, f, r = jax.jit(init, out_shardings=(sh["params"], sh["frozen"], sh["rest"]))()
    else:
      _, p, f, r = split_model(from_model, freeze)
      p, f, r = jax.device_put((p, f, r), (sh["params"], sh["frozen"], sh["rest"]))
    return self.trainer.init_state(p, f, r, seed)

  def model_from_state(self, state):
    return nnx.merge(self.graphdef, state["params"], state["frozen"], state["rest"])


# -- data ------------------------------------------------------------------------------------------


_stack_micro = stack_micro  # micro-batches on a leading axis (benchmarks and tests use this name)


def _pairs(batch: dict) -> int:
  """Pairs of a host batch (its `strength` has one entry per pair)."""
  if "strength" in batch:
    return int(np.size(batch["strength"]))
  return int(np.shape(batch["input_ids"])[-2]) // 2


# -- the loop --------------------------------------------------------------------------------------


def _to_float(tree) -> dict:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


def _model_flops_spec(setup: Setup, state) -> dict:
  """Parameter counts and attention dims for MFU (see metrics.step_flops), and the vision
  placeholder ids: FLOPs count each row's images, as the peer does, though a pair's two rows
  share one pass of the vision tower."""
  counts = {"lm": 0, "vis": 0}
  model_state = nnx.state(setup.abstract_model, nnx.Param)
  for path, v in nnx.to_flat_state(model_state):
    size = int(np.prod(v.get_value().shape))
    if is_vision_path(path):
      counts["vis"] += size
    elif not any("embed_tokens" in str(p) or str(p) == "embedding" for p in path):
      counts["lm"] += size
  mc = getattr(setup.abstract_model, "config", None)
  spec = {
    "n_lm": counts["lm"],
    "n_vis": counts["vis"],
    "vision_trained": not setup.cfg.model.freeze_vision,
  }
  if getattr(mc, "merge_size", None):
    spec["vision_token_ids"] = (int(mc.image_token_id), int(mc.video_token_id))
    spec["patches_per_token"] = int(mc.merge_size) ** 2
  text = getattr(mc, "text", mc)
  vis = getattr(mc, "vision", None)
  for obj, prefix in ((text, "lm"), (vis, "vis")):
    if obj is None or isinstance(obj, str):
      continue
    layers = getattr(obj, "num_hidden_layers", None) or getattr(obj, "depth", None)
    heads = getattr(obj, "num_attention_heads", None) or getattr(obj, "num_heads", None)
    hidden = getattr(obj, "hidden_size", None) or getattr(obj, "embed_dim", None)
    head_dim = getattr(obj, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if layers and heads and head_dim:
      spec[f"{prefix}_layers"] = int(layers)
      spec[f"{prefix}_attn_dim"] = int(heads * head_dim)
  return spec


def evaluate(setup: Setup, state, batches, block: tuple[int, int] = (0, 1)) -> dict:
  """Mean loss / accuracy / margin over every real pair of `batches` (a finite iterable of this
  process's `block` of each batch, see `sharding.put_batch`)."""
  total: dict[str, float] = {}
  for batch in batches:
    out = _to_float(setup.trainer.eval_step(state, shd.put_batch(batch, setup.mesh, block=block)))
    for k, v in out.items():
      total[k] = total.get(k, 0.0) + v
  n = total.pop("count", 0.0)
  if not n:
    return {"count": 0}
  return {**{k: v / n for k, v in total.items()}, "count": int(n)}


class _Throughput:
  """Tokens, steps and model FLOPs since the last log line, counted from the host batches so no
  device value is read."""

  def __init__(self, flops_spec: dict, peak: float | None, n_devices: int):
    self.flops_spec, self.peak, self.n_devices = flops_spec, peak, n_devices
    self.reset()

  def reset(self) -> None:
    self.tokens, self.steps, self.flops, self.t0 = 0, 0, 0.0, time.time()

  def measure(self, host: dict) -> tuple[int, int]:
    """(tokens, vision patches counted per row) of a host batch."""
    mask = host.get("attention_mask")
    tokens = int(mask.sum()) if mask is not None else host["input_ids"].size
    ids = self.flops_spec.get("vision_token_ids")
    if ids:
      vision_tokens = int(np.isin(host["input_ids"], ids).sum())
      patches = vision_tokens * self.flops_spec["patches_per_token"]
    else:
      seg = host.get("vision_segment_ids")
      patches = int((seg > 0).sum()) if seg is not None else 0
    return tokens, patches

  def add(
    self, host: dict, micro: int, totals: tuple[int, int] | None = None, blocks: int = 1
  ) -> None:
    """One step: `host` is this process's block of `blocks` (equal shapes), `totals` the
    `measure` of the whole step batch (default: of `host`)."""
    tokens, patches = self.measure(host) if totals is None else totals
    self.tokens += tokens
    rows, seq = host["input_ids"].shape[-2:]
    self.flops += micro * mx.step_flops(self.flops_spec, rows * blocks, seq, patches // micro)
    self.steps += 1

  def rates(self) -> dict:
    dt = max(time.time() - self.t0, 1e-9)
    out = {"tokens_per_s": self.tokens / dt, "steps_per_s": self.steps / dt}
    if self.peak:
      out["mfu"] = self.flops / dt / (self.peak * self.n_devices)
    return out


def _step_batches(train_data, micro: int, measure):
  """(host batch of one step (a leading micro-batch axis), `measure` of the whole step batch),
  epoch after epoch. A data source with blocks assembles them (`TrainData.assemble_step`): its
  errors go there too, so that every process stops, not only the one whose input failed."""
  assemble = getattr(train_data, "assemble_step", None)
  it = iter(train_data)
  while True:
    parts, error = [], None
    try:
      while len(parts) < micro:
        try:
          parts.append(next(it))
        except StopIteration:
          it = iter(train_data)  # next epoch: pipelines re-shuffle deterministically per epoch
          batch = next(it, None)
          if batch is None:
            raise UserError("the training data yields no batch") from None
          parts.append(batch)
    except Exception as e:
      if assemble is None:
        raise
      error = e
    if assemble is None:
      host = _stack_micro(parts)
      yield host, measure(host)
    else:
      yield assemble(parts, error, measure)


def _num_steps(tc, train_data) -> int:
  if tc.batch_size % max(1, tc.grad_accum):
    raise UserError(
      f"train.batch_size {tc.batch_size} is not divisible by train.grad_accum {tc.grad_accum}"
    )
  if tc.get("num_epochs", 0) and hasattr(train_data, "steps_per_epoch"):
    per_epoch = train_data.steps_per_epoch(tc.grad_accum)
    num_steps = int(math.ceil(tc.num_epochs * per_epoch))
    log.info(
      "%g epochs of %d steps: %d steps (train.num_epochs overrides train.num_steps; set it "
      "to 0 to count steps)",
      tc.num_epochs,
      per_epoch,
      num_steps,
    )
    return num_steps
  return int(tc.num_steps)


def _restore_or_init(setup: Setup, ckpt: Checkpointer, train_data) -> tuple[dict, int | None]:
  """(state, step resumed from or None): the latest readable checkpoint (and the input
  iterator's position), else step 0 from the HF weights or a random init."""
  restored = ckpt.restore_latest(setup.abstract_state(), set_aside=True)
  if restored is not None:
    latest, state, data_state = restored
    if data_state and hasattr(train_data, "set_state"):
      train_data.set_state(data_state)
    log.info("resumed from %s at step %d", ckpt.directory, latest)
    return state, int(latest)
  source = None
  if setup.spec is not None and setup.spec.has_weights():
    log.info("initialising from %s", setup.spec.path)
    source = setup.spec.load()
  return setup.fresh_state(source), None


def _checked_loss(step: int, metrics: dict, ckpt: Checkpointer) -> float:
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    good = ckpt.latest_step()
    where = (
      f"is step {good} in {ckpt.directory}"
      if good is not None
      else "does not exist (none saved yet)"
    )
    raise UserError(f"step {step}: loss is {loss}; stopping. The last good checkpoint {where}")
  return loss


def train(
  cfg,
  workdir: str | os.PathLike,
  *,
  init_from: str | None = None,
  model_factory: Callable | None = None,
  data_factory: Callable | None = None,
  progress: bool = True,
  devices=None,
) -> dict:
  """Trains (or resumes) a reward model in `workdir`; returns a summary dict.

  `model_factory(seed) -> RewardModel` and `data_factory(cfg, split, model_path)` replace the
  configured model / input pipeline (tests, custom models); `split` is "train" or "eval".
  `devices` restricts the mesh to some of the devices (default: all).

  The device is never waited for inside a step: a step's loss is read (and checked for NaN/inf)
  after the next step has been dispatched, and every log, checkpoint and evaluation step reads
  its own loss first, so nothing is saved from a diverged state.
  """
  t_start = time.time()
  workdir = check_writable_dir(workdir)
  tc = cfg.train
  data_factory = data_factory or default_data_factory
  model_path = init_from or cfg.model.path or None
  train_data = data_factory(cfg, "train", model_path)
  num_steps = _num_steps(tc, train_data)
  setup = Setup(
    cfg, num_steps=num_steps, model_factory=model_factory, init_from=init_from, devices=devices
  )
  primary = jax.process_index() == 0
  # this process's block of every global batch (every process builds the whole batch when the
  # data source cannot split it)
  block = shd.process_block(setup.mesh) if hasattr(train_data, "set_block") else (0, 1)
  if block[1] > 1:
    try:
      train_data.set_block(*block)
    except UserError as e:  # the same on every process
      log.warning("%s: every process encodes the whole global batch", e)
      block = (0, 1)
  encoded = {"train": 0, "eval": 0}
  ckpt = Checkpointer(workdir, keep=tc.keep_checkpoints)
  state, resumed_from = _restore_or_init(setup, ckpt, train_data)
  start = int(jax.device_get(state["step"]))
  if primary:
    params, frozen = setup.abstract_parts[:2]
    write_manifest(
      workdir / "manifest.json",
      build_manifest(
        cfg,
        workdir=workdir,
        mesh=setup.mesh,
        extra={
          "num_steps": num_steps,
          "resumed_from": resumed_from,
          "init_from": str(Path(model_path).resolve()) if model_path else None,
          "num_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves((params, frozen))),
          "num_trainable_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
        },
      ),
    )
  metrics_log = mx.MetricsLog(workdir / "metrics.jsonl", resume_step=start, enabled=primary)
  tb = (
    mx.TensorBoardWriter(workdir / "tensorboard")
    if primary and tc.get("tensorboard", True)
    else None
  )
  peak = tc.get("peak_flops", 0.0) or mx.peak_flops_per_device(setup.mesh.devices.flat[0])
  throughput = _Throughput(_model_flops_spec(setup, state), peak, setup.mesh.devices.size)
  fault_step = int(os.environ.get(FAULT_ENV, "0") or 0)
  log_every, micro = max(1, tc.log_every), max(1, int(tc.grad_accum))

  def run_eval(step: int) -> dict | None:
    if not cfg.data.eval:
      return None
    data = data_factory(cfg, "eval", model_path)
    eval_block = block if block[1] > 1 and hasattr(data, "set_block") else (0, 1)
    if eval_block[1] > 1:
      data.set_block(*eval_block)

    def counted():
      for batch in data:
        encoded["eval"] += int(np.sum(batch["pair_mask"])) if "pair_mask" in batch else 0
        yield batch

    result = evaluate(setup, state, counted(), eval_block)
    metrics_log.write({"step": step, "split": "eval", **result})
    if tb:
      tb.scalars(step, result, prefix="eval/")
    if primary:
      log.info(
        "eval @ step %d: loss %.4f  accuracy %.4f  (%d pairs)",
        step,
        result.get("loss", float("nan")),
        result.get("accuracy", float("nan")),
        result.get("count", 0),
      )
    return result

  bar = (
    tqdm(total=num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True, leave=False)
    if primary and progress
    else None
  )

  def show_loss(step: int, metrics: dict) -> None:
    loss = _checked_loss(step, metrics, ckpt)
    if bar:
      bar.update(step - bar.n)
      bar.set_postfix(loss=f"{loss:.4f}")

  batches = _step_batches(train_data, micro, throughput.measure)
  last: dict = {}
  last_eval = None
  pending = None  # (step, metrics) of the last step whose loss has not been read yet
  try:
    for step in range(start + 1, num_steps + 1):
      host, totals = next(batches)
      throughput.add(host, micro, totals, block[1])
      encoded["train"] += _pairs(host)
      state, m = setup.trainer.train_step(
        state, shd.put_batch(host, setup.mesh, leading=1, block=block)
      )
      if step == start + 1 and step % log_every:  # compile time is not throughput
        throughput.reset()
      if pending:
        show_loss(*pending)
      pending = (step, m)
      is_log = step % log_every == 0 or step == num_steps
      is_ckpt = step % max(1, tc.checkpoint_every) == 0 or step == num_steps
      is_eval = bool(tc.eval_every) and step % tc.eval_every == 0 and step != num_steps
      if not (is_log or is_ckpt or is_eval or step == fault_step):
        continue
      show_loss(step, m)
      pending = None
      if is_log:
        vals = {**_to_float(m), **throughput.rates()}
        last = {"step": step, **vals}
        metrics_log.write(last)
        if tb:
          tb.scalars(step, vals, prefix="train/")
        if primary:
          line = mx.format_console(step, num_steps, vals)
          (bar.write(line) if bar else log.info(line))
        throughput.reset()
      if is_ckpt:
        ckpt.save(step, state, train_data.get_state() if hasattr(train_data, "get_state") else {})
      if is_eval:
        last_eval = run_eval(step)
      if step == fault_step:
        ckpt.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    if start < num_steps or last_eval is None:
      last_eval = run_eval(num_steps)
  finally:
    _log_encoded(encoded, train_data, block)
    # Release the tf.data iterator now, not at interpreter shutdown (where TF logs an error for
    # it): tf.numpy_function keeps the pipeline's bound methods alive.
    batches.close()
    if hasattr(train_data, "close"):
      train_data.close()
    batches = train_data = None
    if bar:
      bar.close()
    ckpt.close()
    metrics_log.close()
    if tb:
      tb.close()
  return {
    "workdir": str(workdir),
    "steps": num_steps,
    "resumed_from": resumed_from,
    "loss": last.get("loss"),
    "accuracy": last.get("accuracy"),
    "eval": last_eval,
    "checkpoint": str(ckpt.directory / str(num_steps)),
    "seconds": round(time.time() - t_start, 3),
  }


def _log_encoded(encoded: dict, train_data, block: tuple[int, int]) -> None:
  """The one line that tells this process's share of the input work, checkable from outside."""
  ahead = getattr(getattr(train_data, "pipeline", None), "read_ahead", 0)
  log.info(
    "input: process %d encoded %d pairs (%d in training batches, %d evaluated; block %d of %d%s)",
    jax.process_index(),
    encoded["train"] + encoded["eval"],
    encoded["train"],
    encoded["eval"],
    *block,
    f"; {ahead} more records read ahead" if ahead > 0 else "",
  )


# -- loading a trained model -----------------------------------------------------------------------


def load_model_from_workdir(
  workdir: str | os.PathLike, step: int | None = None, *, dtype: str | None = None, devices=None
):
  """`(model, cfg)`: the reward model of a training workdir's latest (or given) checkpoint, rebuilt
  from the config in its manifest; for `mrm-jax export` / `score`. The processor comes from
  `cfg.model.path` (or the run's `init_from`) when the run started from an HF directory. `devices`
  restricts the mesh the
  parameters are restored onto (default: all devices; `curate run` scores on one local device)."""

  workdir = Path(workdir)
  man_path = workdir / "manifest.json"
  if not man_path.is_file():
    raise UserError(f"{workdir}: not a training workdir (no manifest.json)")
  man = read_json_object(man_path)
  if not isinstance(man.get("config"), dict):
    raise UserError(f"{man_path}: not a run manifest (no 'config' object)")
  cfg = ml_collections.ConfigDict(man["config"])
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = -1, 1, 1
  if dtype:
    cfg.model.dtype = dtype
  init_from = man.get("init_from")
  ckpt = Checkpointer(workdir, keep=max(1, cfg.train.keep_checkpoints))
  if ckpt.latest_step() is None:
    raise UserError(f"{workdir}: no checkpoint found under {ckpt.directory}")
  setup = Setup(
    cfg,
    num_steps=int(man.get("num_steps") or cfg.train.num_steps),
    init_from=init_from,
    devices=devices,
  )
  state, _ = ckpt.restore(step, setup.abstract_state())
  ckpt.close()
  cfg.model.path = init_from or cfg.model.path
  return setup.model_from_state(state), cfg
