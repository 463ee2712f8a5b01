"""Networks from a model config: each role's architecture, its example inputs, and the
v-prediction and velocity wrappers, so that every model of a run returns ε.
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import ml_collections

from jaxguide.diffusion import score
from jaxguide.diffusion.sde import Process
from jaxguide.errors import ConfigError
from jaxguide.models.classifiers import LeNet, NoisyClassifier
from jaxguide.models.mlp import MLP, MLPClassifier
from jaxguide.models.unet import UNet

# guide: autoguidance's weak guide, a smaller and shorter-trained score network of the same task
# (trained with the score's loss settings, on the score's data stream).
MODEL_INDEX = {"score": 0, "classifier": 1, "evaluator": 2, "guide": 3}


ROLE_ARCHS = {"score": ("unet", "mlp"), "classifier": ("classifier", "mlp_classifier"),
              "evaluator": ("lenet",), "guide": ("unet", "mlp")}


SCORE_ROLES = ("score", "guide")


ARCHS: dict[str, Callable[..., Any]] = {
    "unet": UNet, "mlp": MLP, "classifier": NoisyClassifier,
    "mlp_classifier": MLPClassifier, "lenet": LeNet}


# What a score network's output means (score.model.param): ε, v = αε − σx₀ (a variance-preserving
# process only), or the path's velocity u = α'x₀ + σ'ε (flow matching; any process).
PARAMS = ("eps", "v", "velocity")


def build_model(model_cfg: ml_collections.ConfigDict, num_classes: int, dtype: Any,
                sde: Process | None = None, role: str = "score") -> Any:
  """The module a model config describes. A score network with `param='v'` or `'velocity'` is
  wrapped in `score.VPrediction` or `score.Velocity` (they need the process), so that every model
  of a run returns ε."""
  kwargs = {k: tuple(v) if isinstance(v, (list, tuple)) else v
            for k, v in model_cfg.to_dict().items() if k not in ("arch", "param")}
  model = ARCHS[model_cfg.arch](num_classes=num_classes, dtype=dtype, **kwargs)
  param = model_cfg.get("param", "eps")
  if param not in PARAMS:
    raise ConfigError(f"{role}.model.param={param!r}: use one of {PARAMS}")
  if param != "eps" and sde is None:
    raise ValueError(f"build_model: a {param}-prediction network needs the run's sde")
  if param == "v":
    alpha, sigma = sde.marginal_coeffs(0.5)
    if abs(float(alpha**2 + sigma**2) - 1.0) > 1e-5:
      raise ConfigError(f"{role}.model.param='v' needs a variance-preserving process (α² + σ² = 1), "
                        f"and this run's is {sde.name}: use param='velocity'")
    model = score.VPrediction(model, sde)
  elif param == "velocity":
    model = score.Velocity(model, sde)
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
