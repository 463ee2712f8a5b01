"""Where the config stops: validation, per-model training settings, and model construction.

Library functions take typed arguments; this module turns an ml_collections config into them, and
turns bad fields into one-line `ConfigError`s that name the field and the fix.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from jaxguide import conditioning, losses, nets, score
from jaxguide.checkpoint import load_config
from jaxguide.errors import ConfigError
from jaxguide.sde import VPSDE

# guide: autoguidance's weak guide, a smaller and shorter-trained score network of the same task
# (trained with the score's loss settings, on the score's data stream).
MODEL_INDEX = {"score": 0, "classifier": 1, "evaluator": 2, "guide": 3}
ROLE_ARCHS = {"score": ("unet", "mlp"), "classifier": ("classifier", "mlp_classifier"),
              "evaluator": ("lenet",), "guide": ("unet", "mlp")}
SCORE_ROLES = ("score", "guide")
ARCHS: dict[str, Callable[..., Any]] = {
    "unet": nets.UNet, "mlp": nets.MLP, "classifier": nets.NoisyClassifier,
    "mlp_classifier": nets.MLPClassifier, "lenet": nets.LeNet}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Sections that must match between a workdir's saved config and the one resuming it.
FROZEN_SECTIONS = ("data", "sde", "score.model", "classifier.model", "evaluator.model",
                   "guide.model", "condition")


def model_names(config: ml_collections.ConfigDict) -> list[str]:
  models = config.models
  names = [m.strip() for m in (models.split(",") if isinstance(models, str) else models) if m.strip()]
  for m in names:
    if m not in MODEL_INDEX:
      raise ConfigError(f"models={config.models!r}: unknown model {m!r}: use a comma list of "
                        "score, classifier, evaluator, guide")
    if m not in config or "model" not in config[m]:
      raise ConfigError(f"models={config.models!r}: the config has no {m}.model section: add one "
                        f"(configs/default.py has every role's) or drop {m}")
  if not names:
    raise ConfigError("models='': name at least one of score, classifier, evaluator, guide")
  return names


def model_train_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """config.train with the model's own `config.<name>.train` overrides applied."""
  merged = ml_collections.ConfigDict(config.train.to_dict())
  overrides = config[name].get("train", None)
  if overrides is not None:
    for key, value in overrides.items():
      if key not in merged:
        raise ConfigError(f"{name}.train.{key} is not a training setting: use one of {sorted(merged)}")
      merged[key] = value
  return merged


def _check(cond: bool, field: str, value: Any, fix: str) -> None:
  if not cond:
    raise ConfigError(f"{field}={value!r}: {fix}")


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _validate_train(tc: ml_collections.ConfigDict, prefix: str) -> None:
  for key in ("steps", "batch_size", "log_every", "ckpt_every", "keep_ckpts"):
    _check(_is_int(tc[key]) and tc[key] > 0, f"{prefix}.{key}", tc[key], "must be a positive integer")
  _check(_is_int(tc.warmup_steps) and tc.warmup_steps >= 0, f"{prefix}.warmup_steps", tc.warmup_steps,
         "must be a non-negative integer")
  for key in ("lr", "grad_clip"):
    _check(isinstance(tc[key], (int, float)) and tc[key] > 0 and math.isfinite(tc[key]),
           f"{prefix}.{key}", tc[key], "must be a positive number")
  _check(0.0 <= tc.weight_decay, f"{prefix}.weight_decay", tc.weight_decay, "must be >= 0")
  _check(0.0 <= tc.ema_decay < 1.0, f"{prefix}.ema_decay", tc.ema_decay, "must be in [0, 1), e.g. 0.999")
  _check(0.0 < tc.t_eps < 1.0, f"{prefix}.t_eps", tc.t_eps, "must be in (0, 1), e.g. 1e-3")
  _check(tc.schedule in ("constant", "cosine"), f"{prefix}.schedule", tc.schedule,
         "use 'constant' or 'cosine'")
  _check(tc.dtype in DTYPES, f"{prefix}.dtype", tc.dtype, f"use one of {sorted(DTYPES)}")


def parse_interval(value: Any) -> tuple[float, float] | None:
  """A guidance interval (lo, hi) as floats with 0 <= lo < hi <= 1, or None if `value` is not one."""
  if isinstance(value, str):
    return None
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError):
    return None
  ok = math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo < hi <= 1.0
  return (lo, hi) if ok else None


INTERVAL_FIX = "give (lo, hi) with 0 <= lo < hi <= 1, e.g. '(0.2, 0.7)', or None to guide at every t"


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field train_and_evaluate uses; raises ConfigError on the first bad one."""
  _check(_is_int(config.seed), "seed", config.seed, "must be an integer")
  VPSDE(beta_min=config.sde.beta_min, beta_max=config.sde.beta_max)   # raises on a bad schedule
  _validate_train(config.train, "train")
  _check(_is_int(config.train.num_devices) and config.train.num_devices >= 0, "train.num_devices",
         config.train.num_devices, "must be 0 (all local devices) or a positive integer")
  sample_dtype = config.sample.get("dtype", "float32") if "sample" in config else "float32"
  _check(sample_dtype in DTYPES, "sample.dtype", sample_dtype, f"use one of {sorted(DTYPES)}")
  interval = config.sample.get("interval", None) if "sample" in config else None
  _check(interval is None or parse_interval(interval) is not None, "sample.interval", interval,
         INTERVAL_FIX)
  for name in model_names(config):
    _validate_train(model_train_config(config, name), f"{name}.train")
    arch = config[name].model.arch
    _check(arch in ROLE_ARCHS[name], f"{name}.model.arch", arch, f"use one of {ROLE_ARCHS[name]}")
  if set(SCORE_ROLES) & set(model_names(config)):
    p = config.score.p_uncond
    _check(0.0 <= p < 1.0, "score.p_uncond", p, "must be in [0, 1), e.g. 0.1 (0 disables CFG training)")
    w = config.score.get("weighting", "eps")
    _check(w in losses.WEIGHTINGS, "score.weighting", w, f"use one of {losses.WEIGHTINGS}")
    g = config.score.get("min_snr_gamma", 5.0)
    _check(isinstance(g, (int, float)) and g > 0, "score.min_snr_gamma", g, "must be positive, e.g. 5")
    ts = config.score.get("t_sampling", "uniform")
    _check(ts in losses.T_SAMPLINGS, "score.t_sampling", ts, f"use one of {losses.T_SAMPLINGS}")
    std, mean = config.score.get("logsnr_std", 3.0), config.score.get("logsnr_mean", 0.0)
    _check(isinstance(std, (int, float)) and 0 < std < math.inf, "score.logsnr_std", std,
           "must be a positive finite number, e.g. 3")
    _check(isinstance(mean, (int, float)) and math.isfinite(mean), "score.logsnr_mean", mean,
           "must be a finite number, e.g. 0")
    for role in SCORE_ROLES:
      if role in model_names(config):
        param = config[role].model.get("param", "eps")
        _check(param in PARAMS, f"{role}.model.param", param, f"use one of {PARAMS}")
  _validate_condition(config)


def _validate_condition(config: ml_collections.ConfigDict) -> None:
  """condition.kind against the score networks' cond_dim: labels need 0, text a positive size."""
  kind = conditioning.kind_of(config)
  _check(kind in conditioning.KINDS, "condition.kind", kind, f"use one of {conditioning.KINDS}")
  for role in SCORE_ROLES:
    if role not in config or "model" not in config[role]:
      continue
    dim = config[role].model.get("cond_dim", 0)
    if kind == "label":
      _check(dim == 0, f"{role}.model.cond_dim", dim,
             "must be 0 for label conditioning (condition.kind=label), or set condition.kind=text")
    else:
      _check(_is_int(dim) and dim > 0, f"{role}.model.cond_dim", dim,
             "must be the text encoder's embedding size for condition.kind=text, e.g. 384")
  if kind == "text":
    conditioning.captions(config.condition)   # every template well formed


def devices(config: ml_collections.ConfigDict) -> list[jax.Device]:
  """Every device of every process (num_devices = 0), or the first n local ones (one host)."""
  n, available = config.train.num_devices, jax.local_devices()
  if n > len(available):
    raise ConfigError(f"train.num_devices={n}: only {len(available)} local devices: use at most "
                      f"{len(available)}, or 0 for all")
  return available[:n] if n else jax.devices()


def data_seed(config: ml_collections.ConfigDict, name: str) -> int:
  """The seed of a model's batch stream: three streams per seed (score, classifier, evaluator);
  the guide reads the score's, as a shorter run of the same training would."""
  return int(config.seed) * 3 + MODEL_INDEX["score" if name == "guide" else name]


def _section(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    if part not in node:
      return None
    node = node[part]
  return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def _normalise(tree: Any) -> Any:
  """JSON turns tuples into lists; compare configs in the JSON form."""
  if isinstance(tree, dict):
    return {k: _normalise(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_normalise(v) for v in tree]
  return tree


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Read-only checks: the workdir is a writable folder (or can be made), and a run already in it
  was trained with the same data, SDE and architectures, so resuming cannot mix two runs."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"--workdir={workdir} is a file, not a folder: choose a new folder path")
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir={workdir}: {parent} is not a writable folder: choose a writable path")
  saved = load_config(path) if os.path.isdir(path) else None
  if saved is None:
    return
  for section in FROZEN_SECTIONS:
    old, new = _normalise(_section(saved, section)), _normalise(_section(config, section))
    if old is not None and new is not None and old != new:
      raise ConfigError(f"--workdir={workdir} holds a run with another {section} ({old} != {new}): "
                        "use a new --workdir, or the config it was trained with")


def make_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir}: cannot create it ({e.strerror}): choose a writable path") from None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A model built from the config: the module, example inputs for init, and its training loss."""
  name: str
  model: Any
  init_args: tuple
  loss_fn: losses.LossFn
  num_classes: int
  conditions: Any = None    # conditioning.Conditions of a score network on vectors, else None


PARAMS = ("eps", "v")   # what a score network's output means (score.model.param)


def build_model(model_cfg: ml_collections.ConfigDict, num_classes: int, dtype: Any,
                sde: VPSDE | None = None, role: str = "score") -> Any:
  """The module a model config describes. A score network with `param='v'` is wrapped in
  `score.VPrediction` (it needs the SDE), so that every model of a run returns ε."""
  kwargs = {k: tuple(v) if isinstance(v, (list, tuple)) else v
            for k, v in model_cfg.to_dict().items() if k not in ("arch", "param")}
  model = ARCHS[model_cfg.arch](num_classes=num_classes, dtype=dtype, **kwargs)
  param = model_cfg.get("param", "eps")
  if param not in PARAMS:
    raise ConfigError(f"{role}.model.param={param!r}: use one of {PARAMS}")
  if param == "v":
    if sde is None:
      raise ValueError("build_model: a v-prediction network needs the run's sde")
    model = score.VPrediction(model, sde)
  return model


def example_inputs(name: str, shape: tuple[int, ...], cond_dim: int = 0) -> tuple:
  """One example of what each role's network is called with: score (x, t, y), classifier (x, t),
  evaluator (x,); for `init` and shape checks. y: a label, or a vector (1, cond_dim) if > 0."""
  x = jnp.zeros((1,) + tuple(shape), jnp.float32)
  t = jnp.zeros((1,), jnp.float32)
  y = jnp.zeros((1, cond_dim), jnp.float32) if cond_dim else jnp.zeros((1,), jnp.int32)
  return {"score": (x, t, y), "guide": (x, t, y), "classifier": (x, t), "evaluator": (x,)}[name]


def cond_dim(config: ml_collections.ConfigDict, name: str) -> int:
  """The size of a role's condition vectors (0: labels; only score networks take conditions)."""
  return int(config[name].model.get("cond_dim", 0)) if name in SCORE_ROLES else 0


def model_spec(name: str, config: ml_collections.ConfigDict, train_ds: Any,
               conditions: Any = None) -> ModelSpec:
  """A role's network and loss; `conditions` (conditioning.Conditions) for score networks on
  condition vectors (config.condition.kind = text)."""
  tc = model_train_config(config, name)
  if cond_dim(config, name) and conditions is None:
    raise ValueError(f"model_spec({name!r}): a score network on condition vectors needs the "
                     "training conditions (conditioning.for_training)")
  sde = VPSDE(beta_min=config.sde.beta_min, beta_max=config.sde.beta_max)
  model = build_model(config[name].model, train_ds.num_classes, DTYPES[tc.dtype], sde, role=name)
  if name in SCORE_ROLES:
    loss = losses.make_eps_loss(model.apply, sde, num_classes=train_ds.num_classes,
                                p_uncond=config.score.p_uncond, t_eps=tc.t_eps,
                                weighting=config.score.get("weighting", "eps"),
                                min_snr_gamma=config.score.get("min_snr_gamma", 5.0),
                                t_sampling=config.score.get("t_sampling", "uniform"),
                                logsnr_mean=config.score.get("logsnr_mean", 0.0),
                                logsnr_std=config.score.get("logsnr_std", 3.0),
                                conditions=conditions if cond_dim(config, name) else None)
  elif name == "classifier":
    loss = losses.make_noisy_classifier_loss(model.apply, sde, t_eps=tc.t_eps)
  else:
    loss = losses.make_evaluator_loss(model.apply, max_shift=config.evaluator.get("max_shift", 2))
  dim = cond_dim(config, name)
  return ModelSpec(name, model, example_inputs(name, train_ds.shape, dim), loss, train_ds.num_classes,
                   conditions if dim else None)
