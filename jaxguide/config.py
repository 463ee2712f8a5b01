"""The config's schema: each model's training settings and the checks that turn a bad field
into one `ConfigError` line naming the field and the fix. Config stops at the scripts and the
training entry point; library functions take typed arguments.
"""
from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import ml_collections

from jaxguide import conditioning
from jaxguide.diffusion import losses
from jaxguide.diffusion.sde import sde_from
from jaxguide.errors import ConfigError
from jaxguide.models.build import MODEL_INDEX, PARAMS, ROLE_ARCHS, SCORE_ROLES

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
  """Checks every field training uses; raises ConfigError on the first bad one."""
  _check(_is_int(config.seed), "seed", config.seed, "must be an integer")
  sde_from(config)   # raises on a bad schedule
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
    std, mean = config.score.get("logit_std", 1.0), config.score.get("logit_mean", 0.0)
    _check(isinstance(std, (int, float)) and 0 < std < math.inf, "score.logit_std", std,
           "must be a positive finite number, e.g. 1 (SD3's)")
    _check(isinstance(mean, (int, float)) and math.isfinite(mean), "score.logit_mean", mean,
           "must be a finite number, e.g. 0 (SD3's)")
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
