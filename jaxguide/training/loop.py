"""One model's training loop: batches, steps, metrics, checkpoints, EMA; a stop signal that
ends every process at the same step; a guard against divergence.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils
from etils import epath
from tqdm.auto import tqdm

from jaxguide import config as config_lib
from jaxguide import cpu, data, parallel
from jaxguide.parallel import is_primary
from jaxguide.models.build import MODEL_INDEX
from jaxguide.training import checkpoint, specs
from jaxguide.training import workdir as wd
from jaxguide.training.state import TrainState, create_train_state, make_optimizer, make_train_step


class MetricsWriter:
  """Appends one JSON object per line to workdir/metrics.jsonl. With several processes only
  process 0 writes or rewinds (`enabled`): each step's line appears once."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.path = wd.metrics_path(workdir)
    self.enabled = is_primary() if enabled is None else enabled

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    line = json.dumps(record, sort_keys=True) + "\n"
    if checkpoint.is_local(self.path):
      with open(self.path, "a") as f:
        f.write(line)
    else:   # an object store has no append: the file is written again, whole
      path = epath.Path(self.path)
      checkpoint.atomic_write_text(self.path, (path.read_text() if path.exists() else "") + line)

  def rewind(self, model: str, step: int) -> None:
    """Drops `model`'s records after `step`: a run killed after its last checkpoint logged steps
    that the resumed run repeats, and each step should appear once. A line cut short by the kill
    is dropped too. Rewritten atomically; nothing is written when nothing is dropped."""
    if not self.enabled or not epath.Path(self.path).exists():
      return
    lines = epath.Path(self.path).read_text().splitlines()
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
  """SIGTERM or SIGINT arrived; a checkpoint of the step reached was saved before stopping. A
  signal during a stage that saves nothing (a model's evaluation, the final grids) stops at the
  stage's end: `stage` names it, and `model` None means every model is saved."""

  def __init__(self, model: str | None, step: int | None, stage: str = "training"):
    saved = f"{model} saved at step {step}" if model else "every model saved"
    where = "" if stage == "training" else f" during {stage}"
    super().__init__(f"stopped by a signal{where}: {saved}: run the same command to resume")
    self.model, self.step, self.stage = model, step, stage


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
  """SIGTERM/SIGINT become a save and a clean stop after a step: `due()`, called once per step,
  says when. With several processes all must stop after the same step, or orbax's collective save
  would wait for those still training: a SIGTERM goes to jax's preemption notifier, whose sync
  point every process reaches at the same call of `due()` (a SIGINT is passed on as a SIGTERM).
  With jax's preemption service off, or outside the main thread, nothing is handled."""

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

  def check(self, model: str | None, step: int | None, stage: str) -> None:
    """Raises Preempted at the end of a stage that saves nothing, if a signal came during it
    (with several processes: every process at the same call)."""
    if self.due():
      raise Preempted(model, step, stage)

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class _Throughput:
  """Images per second since the first step, whose compile is timed apart."""

  def __init__(self, start: int, batch_size: int):
    self.batch_size = batch_size
    self.t0 = self.t_last = time.perf_counter()
    self.n_last = start
    self.speed = {"images_per_s": float("nan"), "compile_s": float("nan")}

  def compiled(self, step: int) -> None:
    self.t_last = time.perf_counter()
    self.speed["compile_s"] = self.t_last - self.t0
    self.n_last = step + 1

  def images_per_s(self, step: int) -> float:
    if step + 1 > self.n_last:
      self.speed["images_per_s"] = ((step + 1 - self.n_last) * self.batch_size
                                    / (time.perf_counter() - self.t_last))
    return self.speed["images_per_s"]


def _start_state(spec: specs.ModelSpec, config: ml_collections.ConfigDict,
                 tc: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 resume_from: Any) -> TrainState:
  """A fresh state replicated on the mesh, or the checkpoint tree `resume_from` placed like it."""
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), MODEL_INDEX[spec.name])
  state = parallel.replicate(
      create_train_state(key, spec.model, spec.init_args, make_optimizer(tc), tc.ema_decay), mesh)
  if resume_from is not None:
    state = state.from_checkpoint_tree(parallel.replicate(resume_from, mesh))
  return state


def _steps(name: str, tc: ml_collections.ConfigDict, state: TrainState, step_fn, batches,
           bar, ckpt: checkpoint.Checkpointer, writer: MetricsWriter, stop: StopSignal | None,
           meter: _Throughput, one_in_flight: bool) -> TrainState:
  """The steps from `state.step` to `tc.steps`: log, save, stop or refuse a diverged state."""
  start = int(state.step)
  steps, log_every, ckpt_every = int(tc.steps), int(tc.log_every), int(tc.ckpt_every)
  for step, batch in zip(bar, batches):
    state, metrics = step_fn(state, batch)
    if one_in_flight or step == start:
      jax.block_until_ready(state.step)
    if step == start:
      meter.compiled(step)
    log_due = (step + 1) % log_every == 0 or step + 1 == steps
    save_due = (step + 1) % ckpt_every == 0
    stopping = stop is not None and stop.due()   # every step, on every process
    if log_due or stopping or save_due:
      # Checked before any save, so a diverged state never replaces a good checkpoint. Every
      # process decides alike: the metrics are replicated, and so are the steps that read them.
      host = _host_metrics(metrics)
      if not (math.isfinite(host["loss"]) and math.isfinite(host["grad_norm"])):
        raise Diverged(name, step + 1, ckpt.latest_step(), ckpt.directory)
    if log_due:
      img_s = meter.images_per_s(step)
      writer.write({"model": name, "step": step + 1, **host, "images_per_s": img_s})
      bar.set_postfix(loss=f"{host['loss']:.4f}", img_s=f"{img_s:.0f}")
    if save_due or stopping:
      ckpt.save(step + 1, state.checkpoint_tree(), force=True)
    if stopping:
      raise Preempted(name, step + 1)
  return state


def train_model(spec: specs.ModelSpec, config: ml_collections.ConfigDict, workdir: str,
                train_ds: data.Dataset | data.Records, mesh: jax.sharding.Mesh,
                writer: MetricsWriter, progress: bool = True, stop: StopSignal | None = None,
                resume_from: Any = None) -> tuple[TrainState, dict[str, float]]:
  """Trains one model of `config.models` to its step count, from `resume_from` (the checkpoint
  tree `read_resumable` returned) when given; returns state and speed.

  Raises Preempted after saving when `stop` records a signal, and Diverged, saving nothing, when
  the loss or gradient norm is non-finite at a logging or checkpoint step."""
  name = spec.name
  tc = config_lib.model_train_config(config, name)
  state = _start_state(spec, config, tc, mesh, resume_from)
  start = int(state.step)
  writer.rewind(name, start)
  ckpt = checkpoint.Checkpointer(wd.checkpoint_dir(workdir, name), save_every=tc.ckpt_every,
                                 keep=tc.keep_ckpts, warn_incomplete=False)   # read_resumable warned
  # This process's rows as uint8 host batches, placed on the mesh two steps ahead.
  host_batches = data.Batches(train_ds, tc.batch_size, seed=specs.data_seed(config, name),
                              start_step=start, stop_step=tc.steps,
                              process_index=jax.process_index(), process_count=jax.process_count())
  bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, desc=name,
             disable=not (progress and is_primary()), dynamic_ncols=True, mininterval=1.0)
  meter = _Throughput(start, tc.batch_size)
  try:
    state = _steps(name, tc, state, make_train_step(spec.loss_fn, mesh),
                   parallel.prefetch_to_device(host_batches, mesh), bar, ckpt, writer, stop,
                   meter, cpu.one_step_in_flight(mesh))
    if ckpt.latest_step() != tc.steps:
      ckpt.save(tc.steps, state.checkpoint_tree(), force=True)
  finally:
    bar.close()
    host_batches.close()
    ckpt.close()
  return state, meter.speed
