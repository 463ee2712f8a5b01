"""Training: `TrainState` with EMA, a sharded jitted `train_step`, and `train_and_evaluate`.

Patterned on the Flax imagenet example (create_train_state / train_step / train_and_evaluate) and
vdm (EMA inside the state, per-step keys from `fold_in(rng, step)`). The batch is split over a
`data` mesh axis of every device (of every process); one device is the same code path.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from jaxguide import (checkpoint, conditioning, config_lib, cpu, data, evaluate, parallel,
                      pipeline)
from jaxguide.errors import ConfigError
from jaxguide.losses import LossFn
from jaxguide.parallel import is_primary


class TrainState(flax.struct.PyTreeNode):
  """Parameters, their EMA, the optimizer state and the run's base key; `step` counts updates."""

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  ema_decay: float = flax.struct.field(pytree_node=False, default=0.999)

  def apply_gradients(self, grads) -> "TrainState":
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    # EMA warm-up (as in TF's ExponentialMovingAverage with num_updates): short runs still get a
    # useful average instead of one dominated by the random initialisation.
    decay = jnp.minimum(self.ema_decay, (1.0 + self.step) / (10.0 + self.step))
    ema = optax.incremental_update(params, self.ema_params, 1.0 - decay)
    return self.replace(step=self.step + 1, params=params, ema_params=ema, opt_state=opt_state)

  def checkpoint_tree(self) -> dict[str, Any]:
    """What a checkpoint holds: everything but the static optimizer definition."""
    return {"step": self.step, "params": self.params, "ema_params": self.ema_params,
            "opt_state": self.opt_state, "rng": self.rng}

  def from_checkpoint_tree(self, tree: dict[str, Any]) -> "TrainState":
    return self.replace(**tree)


def make_optimizer(tc: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW after global-norm clipping, with linear warm-up then constant or cosine learning rate."""
  warmup = max(int(tc.warmup_steps), 1)
  if tc.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, tc.lr, warmup, max(int(tc.steps), warmup + 1),
                                            end_value=0.1 * tc.lr)
  else:
    lr = optax.join_schedules([optax.linear_schedule(0.0, tc.lr, warmup), optax.constant_schedule(tc.lr)],
                              [warmup])
  return optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                     optax.adamw(lr, weight_decay=tc.weight_decay))


def create_train_state(key: jax.Array, model: flax.linen.Module, init_args: tuple,
                       tx: optax.GradientTransformation, ema_decay: float) -> TrainState:
  init_key, state_key = jax.random.split(key)
  params = jax.jit(model.init)(init_key, *init_args)["params"]
  # The EMA gets its own buffers: the train step donates the state, and one buffer cannot be
  # donated twice.
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=tx.init(params), rng=state_key, tx=tx, ema_decay=ema_decay)


def make_train_step(loss_fn: LossFn, mesh: jax.sharding.Mesh) -> Callable:
  """One jitted update: the state replicated, the batch split over `data`, the state donated.
  The batch is a host batch as placed (`data.model_batch` converts uint8 images inside the step).

  Under jit with a sharded batch the mean loss is over the global batch, so gradients are
  averaged across devices by XLA; no pmean by hand.
  """
  def train_step(state: TrainState, batch):
    batch = data.model_batch(batch)   # uint8 pixels from the host become float32 here
    key = jax.random.fold_in(state.rng, state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
    return state.apply_gradients(grads), metrics

  rep, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(rep, shard), out_shardings=(rep, rep), donate_argnums=0)


class MetricsWriter:
  """Appends one JSON object per line to workdir/metrics.jsonl. With several processes only
  process 0 writes or rewinds (`enabled`): each step's line appears once."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = is_primary() if enabled is None else enabled

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")

  def rewind(self, model: str, step: int) -> None:
    """Drops `model`'s records after `step`: a run killed after its last checkpoint logged steps
    that the resumed run repeats, and each step should appear once. A line cut short by the kill
    is dropped too. Rewritten atomically; nothing is written when nothing is dropped."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = f.read().splitlines()
    keep = []
    for line in lines:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if not (record.get("model") == model and record.get("step", 0) > step):
        keep.append(line)
    if len(keep) != len(lines):
      checkpoint.atomic_write_text(self.path, "".join(l + "\n" for l in keep))


def _host_metrics(metrics: dict[str, jax.Array]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


class Preempted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint of the step reached was saved before stopping."""

  def __init__(self, model: str, step: int):
    super().__init__(f"stopped by a signal: {model} saved at step {step}: run the same command to resume")
    self.model, self.step = model, step


class Diverged(Exception):
  """A non-finite loss or gradient: training stops, the last good checkpoint is kept."""

  def __init__(self, model: str, step: int, last_good: int | None, directory: str):
    where = f"step {last_good} in {directory}" if last_good is not None else "none yet"
    super().__init__(f"{model} diverged (non-finite loss or gradient) by step {step}; last good "
                     f"checkpoint: {where}: lower train.lr or raise train.warmup_steps, then resume")
    self.model, self.step, self.last_good = model, step, last_good


# Steps checked for an agreed stop, over the process's life: jax's preemption sync point is a
# count of calls, which must grow by one per call on every process (across models and runs).
_SYNC_CALLS = itertools.count(1)


class StopSignal:
  """SIGTERM/SIGINT become a clean stop after a step instead of death mid-step: `due()`, called
  once per step, says when to save and stop.

  One process: a handler records the signal and the step it lands in is the last.
  Several processes: all must stop after the same step, or orbax's collective save would wait
  forever for those still training. A SIGTERM is left to jax's preemption notifier (installed by
  jax.distributed.initialize): the coordination service hears of it from that one process and
  sets a sync point, the step count after the fastest process's current one, and `due()` turns
  true at that same call on every process (`multihost_utils.reached_preemption_sync_point`).
  Checked every step, since the check is a lock and a compare on the host: no collective, no wait
  for the devices. A SIGINT (Ctrl-C) is passed on as a SIGTERM to its own process, to the same
  end. With jax's preemption service turned off (jax_enable_preemption_service=False) nothing
  is handled: a signal ends its process, and the same command resumes from the last complete
  checkpoint. Handlers can only be installed from the main thread; elsewhere this records nothing."""

  def __init__(self):
    self.requested: int | None = None
    self._previous: dict[int, Any] = {}
    several = jax.process_count() > 1
    self._synced = (several and jax.distributed.is_initialized()   # jax 0.6 lacks the option
                    and getattr(jax.config, "jax_enable_preemption_service", True))
    if several:   # no Python SIGTERM handler: it would replace jax's notifier
      self._signals = (signal.SIGINT,) if self._synced else ()
    else:
      self._signals = (signal.SIGTERM, signal.SIGINT)

  def __enter__(self) -> "StopSignal":
    if threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    if self._synced:
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self.requested = signum

  def due(self) -> bool:
    """Whether to save and stop after this step; with several processes every process calls it
    once per step and all get the same answer at the same step."""
    if self._synced:
      return multihost_utils.reached_preemption_sync_point(next(_SYNC_CALLS))
    return self.requested is not None

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def train_model(spec: config_lib.ModelSpec, config: ml_collections.ConfigDict, workdir: str,
                train_ds: data.Dataset | data.Records, mesh: jax.sharding.Mesh,
                writer: MetricsWriter, progress: bool = True, stop: StopSignal | None = None,
                resume_from: Any = None) -> tuple[TrainState, dict[str, float]]:
  """Trains one model of `config.models` to its step count, from `resume_from` (the checkpoint
  tree `read_resumable` returned) when given; returns state and speed.

  Raises Preempted after saving when `stop` records a signal, and Diverged, saving nothing, when
  the loss or gradient norm is non-finite at a logging or checkpoint step."""
  name = spec.name
  tc = config_lib.model_train_config(config, name)
  tx = make_optimizer(tc)
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), config_lib.MODEL_INDEX[name])
  state = parallel.replicate(create_train_state(key, spec.model, spec.init_args, tx, tc.ema_decay), mesh)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints", name), save_every=tc.ckpt_every,
                                 keep=tc.keep_ckpts, warn_incomplete=False)   # read_resumable warned
  if resume_from is not None:   # host arrays, placed like the fresh state (replicated on the mesh)
    state = state.from_checkpoint_tree(parallel.replicate(resume_from, mesh))
  start = int(state.step)
  writer.rewind(name, start)
  step_fn = make_train_step(spec.loss_fn, mesh)
  # Host batches (this process's rows, uint8 images), placed on the mesh two steps ahead; the
  # loop calls orbax only when a save is due.
  host_batches = data.Batches(train_ds, tc.batch_size, seed=config_lib.data_seed(config, name),
                              start_step=start, stop_step=tc.steps,
                              process_index=jax.process_index(), process_count=jax.process_count())
  speed = {"images_per_s": float("nan"), "compile_s": float("nan")}
  bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, desc=name,
             disable=not (progress and is_primary()),
             dynamic_ncols=True, mininterval=1.0)
  steps, log_every, ckpt_every = int(tc.steps), int(tc.log_every), int(tc.ckpt_every)  # not per step
  t0 = time.perf_counter()
  t_last, n_last = t0, start
  batches = parallel.prefetch_to_device(host_batches, mesh)
  one_in_flight = cpu.one_step_in_flight(mesh)
  try:
    for step, batch in zip(bar, batches):
      state, metrics = step_fn(state, batch)
      if one_in_flight:
        jax.block_until_ready(state.step)
      if step == start:   # the first call compiles: time it apart from the throughput
        jax.block_until_ready(state.step)
        speed["compile_s"] = time.perf_counter() - t0
        t_last, n_last = time.perf_counter(), step + 1
      log_due = (step + 1) % log_every == 0 or step + 1 == steps
      save_due = (step + 1) % ckpt_every == 0
      stopping = stop is not None and stop.due()   # every step, on every process
      if log_due or stopping or save_due:
        # Checked before any save: a diverged state is never written over a good checkpoint.
        # With several processes all decide alike, so none is left alone in a collective save:
        # the metrics are replicated (one value everywhere) and so are the steps that look at
        # them (log and save steps by the config, a stop by agreement).
        host = _host_metrics(metrics)
        if not (math.isfinite(host["loss"]) and math.isfinite(host["grad_norm"])):
          raise Diverged(name, step + 1, ckpt.latest_step(), ckpt.directory)
      if log_due:
        now = time.perf_counter()
        if step + 1 > n_last:
          speed["images_per_s"] = (step + 1 - n_last) * tc.batch_size / (now - t_last)
        writer.write({"model": name, "step": step + 1, **host, "images_per_s": speed["images_per_s"]})
        bar.set_postfix(loss=f"{host['loss']:.4f}", img_s=f"{speed['images_per_s']:.0f}")
      if save_due or stopping:   # orbax is only called when there is something to write
        ckpt.save(step + 1, state.checkpoint_tree(), force=True)
      if stopping:
        raise Preempted(name, step + 1)
    if ckpt.latest_step() != tc.steps:
      ckpt.save(tc.steps, state.checkpoint_tree(), force=True)
  finally:
    bar.close()
    host_batches.close()
    ckpt.close()
  return state, speed


def _abstract_checkpoint(spec: config_lib.ModelSpec, config: ml_collections.ConfigDict) -> Any:
  """Shapes and dtypes of what `train_model` saves for this model, computed without any FLOPs."""
  tc = config_lib.model_train_config(config, spec.name)
  make = lambda key: create_train_state(key, spec.model, spec.init_args, make_optimizer(tc),
                                        tc.ema_decay).checkpoint_tree()
  return jax.eval_shape(make, jax.random.PRNGKey(0))


def read_resumable(spec: config_lib.ModelSpec, config: ml_collections.ConfigDict,
                   workdir: str) -> Any | None:
  """The latest checkpoint of this model in the workdir as host arrays, or None. Called before
  anything is written: a checkpoint of another config or a damaged one raises CheckpointError (one
  line) while the workdir is still as it was. This is the run's only read of the checkpoint."""
  directory = os.path.join(workdir, "checkpoints", spec.name)
  if not os.path.isdir(directory):
    return None
  ckpt = checkpoint.Checkpointer(directory, read_only=True)
  try:
    if ckpt.latest_step() is None:
      return None
    # Restored into the state's own structure (optax's namedtuples; orbax alone gives lists),
    # checked against it, then moved to the host until train_model places it.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          _abstract_checkpoint(spec, config))
    return jax.device_get(ckpt.restore(target))
  finally:
    ckpt.close()


@dataclasses.dataclass
class Plan:
  """What `prepare` checked and read before anything is written: train_and_evaluate's inputs."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  train_ds: Any
  test_ds: Any
  specs: dict[str, config_lib.ModelSpec]
  resume_from: dict[str, Any]
  captions: Any
  write_captions: bool


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Plan:
  """Checks the config, the workdir, the data and any checkpoint to resume, writing nothing:
  bad input raises ConfigError (one line) while the workdir is still as it was."""
  config_lib.validate(config)
  config_lib.check_workdir(workdir, config)
  if jax.process_count() > 1 and config.train.num_devices:
    raise ConfigError(f"train.num_devices={config.train.num_devices} with {jax.process_count()} "
                      "processes: use 0 (every device of every process), or run one process")
  mesh = parallel.data_mesh(config_lib.devices(config))
  # The training split may be lazy (tfds: Grain reads its records as the steps need them); the
  # test split is in memory (and cached, so the figures after training do not read it again).
  train_ds = data.open_split(config.data.source, "train", data_dir=config.data.data_dir or None)
  test_ds = data.load(config.data.source, "test", data_dir=config.data.data_dir or None)
  for name in config_lib.model_names(config):
    parallel.check_divisible(config_lib.model_train_config(config, name).batch_size, mesh,
                             field=f"{name}.train.batch_size")
  # Text runs: every caption encoded (or read from the workdir's cache) before anything is written.
  conditions, captions, write_captions = conditioning.for_training(config, workdir,
                                                                   train_ds.num_classes)
  specs = {name: config_lib.model_spec(name, config, train_ds, conditions)
           for name in config_lib.model_names(config)}
  resume_from = {name: read_resumable(spec, config, workdir) for name, spec in specs.items()}
  return Plan(config, workdir, mesh, train_ds, test_ds, specs, resume_from, captions,
              write_captions)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       progress: bool = True) -> dict[str, Any]:
  """Trains every model in `config.models` (resuming from `workdir`), evaluates each, writes a report."""
  plan = prepare(config, workdir)   # everything checked first: bad input changes nothing
  config_lib.make_workdir(workdir)   # every process (on a shared filesystem: the same folder)
  if is_primary():
    checkpoint.save_config(workdir, config)
    pipeline.save_data_info(workdir, plan.train_ds.shape, plan.train_ds.num_classes)
    if plan.write_captions:
      conditioning.save(workdir, plan.captions)
  writer = MetricsWriter(workdir)
  # Models trained here replace their entries; those trained by an earlier command stay (e.g. a
  # guide added with --config.models=guide keeps the score network's figures).
  report_path = os.path.join(workdir, "train_report.json")
  try:
    earlier = checkpoint.read_json(report_path) if os.path.exists(report_path) else None
  except ConfigError:   # a damaged report is rewritten, not a reason to refuse training
    earlier = None
  earlier = earlier if isinstance(earlier, dict) else {}
  report: dict[str, Any] = {k: v for k, v in earlier.items() if k not in plan.specs}
  with StopSignal() as stop:   # one for every model: a signal while evaluating stops the next
    for name, spec in plan.specs.items():
      state, speed = train_model(spec, config, workdir, plan.train_ds, plan.mesh, writer, progress,
                                 stop, resume_from=plan.resume_from.pop(name))
      report[name] = {**speed, "steps": int(state.step),
                      "params": int(sum(np.size(p) for p in jax.tree.leaves(state.params))),
                      **evaluate.evaluate_model(name, spec, config, state.ema_params, plan.test_ds)}
  if is_primary():
    checkpoint.atomic_write_text(report_path, json.dumps(report, indent=2))
  return report
