"""What training builds from a config for each model: the network, its example inputs and
its loss (`ModelSpec`), the devices, and each model's data seed.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from jaxguide import config as config_lib
from jaxguide.diffusion import losses
from jaxguide.diffusion.sde import sde_from
from jaxguide.errors import ConfigError
from jaxguide.models.build import MODEL_INDEX, SCORE_ROLES, build_model, cond_dim, example_inputs


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


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A model built from the config: the module, example inputs for init, and its training loss."""
  name: str
  model: Any
  init_args: tuple
  loss_fn: losses.LossFn
  num_classes: int
  conditions: Any = None    # conditioning.Conditions of a score network on vectors, else None


def model_spec(name: str, config: ml_collections.ConfigDict, train_ds: Any,
               conditions: Any = None) -> ModelSpec:
  """A role's network and loss; `conditions` (conditioning.Conditions) for score networks on
  condition vectors (config.condition.kind = text)."""
  tc = config_lib.model_train_config(config, name)
  if cond_dim(config, name) and conditions is None:
    raise ValueError(f"model_spec({name!r}): a score network on condition vectors needs the "
                     "training conditions (conditioning.for_training)")
  sde = sde_from(config)
  model = build_model(config[name].model, train_ds.num_classes, config_lib.DTYPES[tc.dtype], sde, role=name)
  if name in SCORE_ROLES:
    loss = losses.make_eps_loss(model.apply, sde, num_classes=train_ds.num_classes,
                                p_uncond=config.score.p_uncond, t_eps=tc.t_eps,
                                weighting=config.score.get("weighting", "eps"),
                                min_snr_gamma=config.score.get("min_snr_gamma", 5.0),
                                t_sampling=config.score.get("t_sampling", "uniform"),
                                logsnr_mean=config.score.get("logsnr_mean", 0.0),
                                logsnr_std=config.score.get("logsnr_std", 3.0),
                                logit_mean=config.score.get("logit_mean", 0.0),
                                logit_std=config.score.get("logit_std", 1.0),
                                conditions=conditions if cond_dim(config, name) else None)
  elif name == "classifier":
    loss = losses.make_noisy_classifier_loss(model.apply, sde, t_eps=tc.t_eps)
  else:
    loss = losses.make_evaluator_loss(model.apply, max_shift=config.evaluator.get("max_shift", 2))
  dim = cond_dim(config, name)
  return ModelSpec(name, model, example_inputs(name, train_ds.shape, dim), loss, train_ds.num_classes,
                   conditions if dim else None)
