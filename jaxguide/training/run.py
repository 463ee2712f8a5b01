"""Training a whole config: `prepare` checks everything and reads what a resume needs,
writing nothing; `train` then trains every model of the config in turn and writes the report.
Evaluation is passed in (`evaluate`): training imports nothing of sampling or evaluation.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np

from jaxguide import cluster, conditioning, data, parallel
from jaxguide import config as config_lib
from jaxguide.errors import ConfigError
from jaxguide.parallel import is_primary
from jaxguide.training import specs as spec_lib
from jaxguide.training import workdir as wd
from jaxguide.training.loop import MetricsWriter, StopSignal, train_model
from jaxguide.training.state import create_train_state, make_optimizer


def _abstract_checkpoint(spec: spec_lib.ModelSpec, config: ml_collections.ConfigDict) -> Any:
  """Shapes and dtypes of what `train_model` saves for this model, computed without any FLOPs."""
  tc = config_lib.model_train_config(config, spec.name)
  make = lambda key: create_train_state(key, spec.model, spec.init_args, make_optimizer(tc),
                                        tc.ema_decay).checkpoint_tree()
  return jax.eval_shape(make, jax.random.PRNGKey(0))


def read_resumable(spec: spec_lib.ModelSpec, config: ml_collections.ConfigDict,
                   workdir: str, step: int | None = None) -> Any | None:
  """The latest checkpoint of this model in the workdir (or the one at `step`) in host memory,
  or None. Called before anything is written: a checkpoint of another config or a damaged one
  raises CheckpointError (one line) while the workdir is still as it was. This is the run's only
  read of the checkpoint; `train_model` places it on the mesh, each device its own copy."""
  # Restored into the state's own structure (optax's namedtuples; orbax alone gives lists),
  # checked against it, read into numpy arrays (no device holds it until it is placed).
  target = lambda: jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                                _abstract_checkpoint(spec, config))
  return wd.restore_latest(workdir, spec.name, target, step=step)


def _steps_field(config: ml_collections.ConfigDict, name: str) -> str:
  own = config[name].get("train", None)
  return f"{name}.train.steps" if own is not None and "steps" in own else "train.steps"


def agreed_resume(spec: spec_lib.ModelSpec, config: ml_collections.ConfigDict,
                  workdir: str) -> Any | None:
  """The checkpoint every process resumes from: the step process 0 lists as latest, restored by
  each, with the same bytes everywhere (`cluster`); refused below the configured step count."""
  name = spec.name
  step = cluster.agreed_latest(lambda: wd.latest_step(workdir, name), name)
  steps = int(config_lib.model_train_config(config, name).steps)
  if step is not None and step > steps:
    raise ConfigError(f"{_steps_field(config, name)}={steps} is below {name}'s checkpoint at step "
                      f"{step} in {wd.checkpoint_dir(workdir, name)}: give at least {step}, or "
                      "another --workdir")
  return cluster.agreed_read(lambda: read_resumable(spec, config, workdir, step), name, step)


@dataclasses.dataclass
class Plan:
  """What `prepare` checked and read before anything is written: `train`'s inputs."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  train_ds: Any
  test_ds: Any
  specs: dict[str, spec_lib.ModelSpec]
  resume_from: dict[str, Any]
  captions: Any
  write_captions: bool


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Plan:
  """Checks the config, the workdir, the data and any checkpoint to resume, writing nothing:
  bad input raises ConfigError (one line) while the workdir is still as it was. With several
  processes every check is agreed (`cluster.agree`): one host's refusal stops all of them."""
  plan = cluster.agree(lambda: _check_and_open(config, workdir), "the run")
  for name, spec in plan.specs.items():
    plan.resume_from[name] = agreed_resume(spec, config, workdir)
  return plan


def _check_and_open(config: ml_collections.ConfigDict, workdir: str) -> Plan:
  """This host's checks and reads, all before any collective."""
  config_lib.validate(config)
  wd.check_workdir(workdir, config)
  if is_primary():
    wd.check_owner(workdir)
  if jax.process_count() > 1 and config.train.num_devices:
    raise ConfigError(f"train.num_devices={config.train.num_devices} with {jax.process_count()} "
                      "processes: use 0 (every device of every process), or run one process")
  mesh = parallel.data_mesh(spec_lib.devices(config))
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
  specs = {name: spec_lib.model_spec(name, config, train_ds, conditions)
           for name in config_lib.model_names(config)}
  return Plan(config, workdir, mesh, train_ds, test_ds, specs, {}, captions, write_captions)


Evaluate = Callable[[str, Any, ml_collections.ConfigDict, Any, Any], dict[str, Any]]


def write_run_files(plan: Plan) -> None:
  """The workdir and its files that describe the run, before the first step."""
  wd.make_workdir(plan.workdir)   # every process (on a shared filesystem: the same folder)
  wd.check_shared(plan.workdir)
  if is_primary():
    wd.save_config(plan.workdir, plan.config)
    wd.save_data_info(plan.workdir, plan.train_ds.shape, plan.train_ds.num_classes)
    if plan.write_captions:
      conditioning.save(plan.workdir, plan.captions)


def train(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
          evaluate: Optional[Evaluate] = None, stop: Optional[StopSignal] = None) -> dict[str, Any]:
  """Trains every model in `config.models` (resuming from `workdir`) and writes
  train_report.json. `evaluate(name, spec, config, ema_params, test_ds)` (e.g.
  `evaluation.metrics.evaluate_model`) adds each model's held-out figures to its entry.

  A SIGTERM or SIGINT stops training after a step, saved, or an evaluation at its end, by raising
  `Preempted`; `stop` is the caller's entered StopSignal when its job goes on after training
  (train.py's final grids), else one is entered here."""
  plan = prepare(config, workdir)   # everything checked first: bad input changes nothing
  write_run_files(plan)
  writer = MetricsWriter(workdir)
  # Models trained here replace their entries; those trained by an earlier command stay (e.g. a
  # guide added with --config.models=guide keeps the score network's figures).
  report = {k: v for k, v in wd.read_report(workdir).items() if k not in plan.specs}
  with contextlib.ExitStack() as stack:
    if is_primary():
      stack.enter_context(wd.Owner(workdir))
    stop = stop or stack.enter_context(StopSignal())
    for name, spec in plan.specs.items():
      state, speed = train_model(spec, config, workdir, plan.train_ds, plan.mesh, writer, progress,
                                 stop, resume_from=plan.resume_from.pop(name))
      report[name] = {**speed, "steps": int(state.step),
                      "params": int(sum(np.size(p) for p in jax.tree.leaves(state.params)))}
      if evaluate is not None:
        report[name].update(evaluate(name, spec, config, state.ema_params, plan.test_ds))
        stop.check(name, int(state.step), f"{name}'s evaluation")
  if is_primary():
    wd.write_report(workdir, report)
  return report
