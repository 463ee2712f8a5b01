"""From a trained workdir to guided samples: restore the EMA models, build the guided ε-function,
sample many labels and scales in one compiled call. Shared by sample.py and train.py's grids."""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxguide import cluster, conditioning, guidance, parallel, samplers
from jaxguide import config as config_lib
from jaxguide.diffusion.score import eps_fn as bind_eps
from jaxguide.diffusion.score import log_prob_fn as bind_log_prob
from jaxguide.diffusion.sde import Process, sde_from
from jaxguide.errors import ConfigError
from jaxguide.guidance import registry
from jaxguide.models.build import MODEL_INDEX, build_model, cond_dim, example_inputs
from jaxguide.training import workdir as wd

# Options of the guided ε-function (the rest of generate's options go to the sampler).
GUIDE_OPTIONS = ("schedule", *registry.OPTIONS)


@dataclasses.dataclass(frozen=True, eq=False)   # hashed by identity: a key of the compile cache
class Run:
  """A trained workdir: its config, SDE, data shape and the EMA parameters of each model in it."""
  workdir: str
  config: ml_collections.ConfigDict
  sde: Process
  shape: tuple[int, ...]
  num_classes: int
  apply_fns: dict[str, Callable[..., jax.Array]]
  params: dict[str, Any]
  captions: Any = None   # conditioning.Captions of a text-conditioned run, else None

  @property
  def null(self) -> Any:
    """∅: the null label num_classes, or a text run's null vector (the encoding of "")."""
    return self.num_classes if self.captions is None else self.captions.null

  @property
  def cond_dim(self) -> int:
    """The size of the score network's condition vectors; 0 when it takes labels."""
    return 0 if self.captions is None else self.captions.dim

  @property
  def t_eps(self) -> float:
    """The score network's training t_eps (config.train.t_eps or its score.train override): the
    samplers stop there, since the network never saw smaller times."""
    return float(config_lib.model_train_config(self.config, "score").t_eps)

  def require(self, name: str, why: str) -> None:
    if name not in self.params:
      raise ConfigError(f"{why} needs a trained {name} in --workdir={self.workdir}: train it with "
                        f"python train.py --workdir {self.workdir} --config.models={name} (same --config)")


def restore_ema(workdir: str, name: str, model: Any, init_args: tuple,
                sharding: jax.sharding.Sharding | None = None) -> Any | None:
  """The EMA parameters of a model's latest complete checkpoint, checked against the config's
  model (`model`, called with `init_args`), or None when the model has none. Only they are read
  (not the optimizer state), each device reading its copy onto `sharding` (default: replicated
  over every device of every process, as the samplers use them). With several processes the
  step is process 0's and the bytes are checked to agree (`cluster`)."""
  step = cluster.agreed_latest(lambda: wd.latest_step(workdir, name), name)
  if step is None:
    return None
  sharding = sharding or parallel.replicated(parallel.data_mesh())
  abstract = lambda: jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
      jax.eval_shape(model.init, jax.random.PRNGKey(0), *init_args)["params"])
  # CheckpointError (one line) if damaged, or of another architecture than config.json's.
  read = lambda: wd.restore_latest(workdir, name, abstract, step=step, part="ema_params")
  return cluster.agreed_read(read, name, step)


def _read_run(workdir: str, dtype: Optional[str]) -> tuple:
  """This host's read of the workdir's config, data shape, dtype and captions."""
  config = wd.load_config(workdir)
  if config is None:
    raise ConfigError(f"--workdir={workdir} holds no trained run (no config.json): "
                      f"train one first with python train.py --workdir {workdir}")
  shape, k = wd.read_data_info(workdir)
  dtype = dtype or config.sample.get("dtype", "float32")
  if dtype not in config_lib.DTYPES:
    raise ConfigError(f"--dtype (sample.dtype)={dtype!r} is not known: use one of "
                      f"{', '.join(config_lib.DTYPES)}")
  captions = (conditioning.load_captions(workdir) if conditioning.kind_of(config) == "text"
              else None)
  return config, shape, k, dtype, captions


def load_run(workdir: str, dtype: Optional[str] = None) -> Run:
  """Restores every trained model of a workdir; raises ConfigError when there is nothing to load.

  The networks compute in `dtype` ("float32" or "bfloat16"; default the config's `sample.dtype`,
  float32 when absent) whatever they were trained in: sampling walks hundreds of steps whose
  rounding a bfloat16 network adds to, so mixed precision is the user's choice there."""
  config, shape, k, dtype, captions = cluster.agree(lambda: _read_run(workdir, dtype),
                                                    f"--workdir={workdir}")
  sde = sde_from(config)
  apply_fns, params = {}, {}
  for name in MODEL_INDEX:
    if name not in config or "model" not in config[name]:
      continue
    model = build_model(config[name].model, k, config_lib.DTYPES[dtype], sde, role=name)
    restored = restore_ema(workdir, name, model, example_inputs(name, shape, cond_dim(config, name)))
    if restored is not None:
      apply_fns[name], params[name] = model.apply, restored
  if "score" not in params:
    raise ConfigError(f"--workdir={workdir} has no score-network checkpoint: train it with "
                      f"python train.py --workdir {workdir}")
  return Run(workdir, config, sde, shape, k, apply_fns, params, captions)


def bound_models(run: Run, params: dict[str, Any]) -> registry.Models:
  """The run's networks as the functions guidance builders use (`guidance.registry.Models`)."""
  bind = lambda name, fn: fn(run.apply_fns[name], params[name]) if name in params else None
  evaluator = None
  if "evaluator" in params:
    apply, p = run.apply_fns["evaluator"], params["evaluator"]
    evaluator = lambda x: jax.nn.log_softmax(apply({"params": p}, x).astype(jnp.float32), axis=-1)
  return registry.Models(eps=bind("score", bind_eps), null=run.null, sde=run.sde,
                      text=run.captions is not None, classifier=bind("classifier", bind_log_prob),
                      guide=bind("guide", bind_eps), evaluator=evaluator)


def guided_eps_fn(run: Run, params: dict[str, Any], kind: str, scale: jax.Array,
                  clf_scale: jax.Array | float = 0.0, *, schedule: str = "constant", **options):
  """The ε-function a sampler walks for one guidance kind (`guidance.registry.KINDS`); `scale` may
  be per sample. `options` are the kinds' options (`guidance.registry.OPTIONS`); each kind reads
  its own. schedule = constant | linear | cosine makes every scale a function of t, about the
  kind's neutral scale (`guidance.schedule`). A text run's y are prompt encodings (B, D) and ∅
  the encoding of "" (`Run.null`); its negative_label is a negative prompt's encoding."""
  row = registry.get(kind)
  if schedule != "constant":
    scale = guidance.schedule(schedule, scale, neutral=row.neutral)
    clf_scale = guidance.schedule(schedule, clf_scale, neutral=0.0)
  return registry.build(kind, bound_models(run, params), scale, clf_scale, **options)


def check_request(run: Run, kind: str, labels: np.ndarray) -> None:
  """A kind's needs against the workdir (its models, class labels) and labels in range."""
  row = registry.get(kind)
  registry.check((kind,), {}, None, {}, run.captions is not None)
  for name in row.needs:
    run.require(name, f"--guidance={kind}")
  if run.captions is not None:
    return
  bad = labels[(labels < 0) | (labels >= run.num_classes)]
  if bad.size:
    raise ConfigError(f"--labels: {int(bad[0])} is outside [0, {run.num_classes}): "
                      f"use class indices 0..{run.num_classes - 1}")


@functools.lru_cache(maxsize=16)
def _compiled(run: Run, kind: str, sampler: str, steps: int, batch: int,
              return_trajectory: bool, save_every: int, options: tuple):
  """One compiled sampling executable per (guidance kind, sampler, steps, batch), compiled ahead
  of time so that its compile time is measured apart; scales and labels are traced arguments, so
  any scale list reuses it. Returns (executable, compile seconds)."""
  opts = {"t_eps": run.t_eps, **dict(options)}
  guide_opts = {k: opts.pop(k) for k in GUIDE_OPTIONS if k in opts}

  def fn(params, key, y, scale, clf_scale):
    g = guided_eps_fn(run, params, kind, scale, clf_scale, **guide_opts)
    return samplers.sample(key, g, run.sde, (batch,) + run.shape, y, sampler=sampler, steps=steps,
                           return_trajectory=return_trajectory, save_every=save_every, **opts)
  y_example = (np.zeros((batch, run.cond_dim), np.float32) if run.cond_dim
               else np.zeros(batch, np.int32))
  example = (run.params, jax.random.PRNGKey(0), y_example, np.zeros(batch, np.float32),
             np.float32(0))
  start = time.perf_counter()
  executable = jax.jit(fn).lower(*example).compile()
  return executable, time.perf_counter() - start


def generate(run: Run, key: jax.Array, labels: np.ndarray, scales: np.ndarray, *, kind: str,
             sampler: str = "ddim", steps: int = 100, clf_scale: float = 0.0, batch_size: int = 1000,
             return_trajectory: bool = False, save_every: int = 50,
             timings: Optional[dict[str, float]] = None, **options):
  """Guided samples for per-sample labels and scales, in chunks of at most `batch_size` that all
  share one compilation. Returns x0 (N, ...) and, with return_trajectory, the stacked states.
  A text run's `labels` are the prompts' encodings (N, D) (conditioning.embed_prompts).
  `options` go to `samplers.sample` (spacing, clip_x0, eta, snr, ...; t_eps defaults to
  `run.t_eps`) or to the guidance (guide_conditional, interval, rescale).
  `timings`, if given, receives compile_s (0 when cached) and sample_s (wall time after it).
  With several processes every process calls it alike: each samples its share of every chunk on
  the global mesh, and each gets all the samples back."""
  scales = np.asarray(scales, np.float32)
  if run.cond_dim:
    labels = np.asarray(labels, np.float32)
    if labels.shape[1:] != (run.cond_dim,):
      raise ConfigError(f"this workdir's score network takes prompt encodings (N, {run.cond_dim}); "
                        f"got conditions of shape {labels.shape}: pass prompts, not labels")
  else:
    labels = np.asarray(labels, np.int32)
  check_request(run, kind, labels)
  n = len(labels)
  batch = min(batch_size, n)
  cache_before = _compiled.cache_info().hits
  executable, compile_s = _compiled(run, kind, sampler, steps, batch, return_trajectory, save_every,
                                    tuple(sorted(options.items())))
  start = time.perf_counter()
  outs, trajs = [], []
  for i, begin in enumerate(range(0, n, batch)):
    y, s = labels[begin:begin + batch], scales[begin:begin + batch]
    m = len(y)
    if m < batch:   # pad the last chunk to the compiled size
      pad = lambda a: np.pad(a, [(0, batch - m)] + [(0, 0)] * (a.ndim - 1), mode="edge")
      y, s = pad(y), pad(s)
    out = executable(run.params, jax.random.fold_in(key, i), y, s, np.float32(clf_scale))
    x0, traj = out if return_trajectory else (out, None)
    outs.append(parallel.to_host(x0)[:m])   # with several processes: gathered onto each
    if traj is not None:
      trajs.append(parallel.to_host(traj)[:, :m])
  if timings is not None:
    timings["compile_s"] = 0.0 if _compiled.cache_info().hits > cache_before else compile_s
    timings["sample_s"] = time.perf_counter() - start
  x0 = np.concatenate(outs)
  return (x0, np.concatenate(trajs, axis=1)) if return_trajectory else x0
