"""Adaptive projected guidance (Sadat et al. 2024): CFG's difference in x̂₀, bounded in norm
and split along the conditional prediction, its parallel part down-weighted.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxguide.diffusion.score import EpsFn, eps_to_x0, x0_to_eps
from jaxguide.diffusion.sde import VPSDE, broadcast_to_data
from jaxguide.errors import ConfigError
from jaxguide.guidance.intervals import Interval, _check_interval, _within, tag_intervals
from jaxguide.guidance.passes import cond_and_null
from jaxguide.guidance.scales import Scale, scale_at


def apg(eps_fn: EpsFn, sde: VPSDE, scale: Scale, null_label: ArrayLike, *, eta: float = 0.0,
        norm_threshold: float | None = None, momentum: float = 0.0,
        interval: Interval = None) -> EpsFn:
  """Adaptive projected guidance, in x̂₀ space: Δ = D_c − D_u, scaled so that ‖Δ‖ ≤ r per sample
  (r = `norm_threshold`), split into Δ∥ along D_c and Δ⊥ = Δ − Δ∥, D̂ = D_c + (s − 1)(Δ⊥ + η Δ∥),
  then back to ε. With eta = 1 and no threshold it is `classifier_free` at s, to float rounding.

  Momentum (Δ ← Δ + β m, m carried across steps) needs state that the ε-function protocol does not
  carry; only momentum = 0 is accepted."""
  _check_interval(interval)
  if isinstance(momentum, (int, float)) and momentum != 0.0:
    raise ConfigError(f"apg momentum={momentum}: not supported (the samplers carry no guidance "
                      "state); use momentum=0 and norm_threshold / eta instead")
  if isinstance(norm_threshold, (int, float)) and norm_threshold <= 0:
    raise ConfigError(f"apg norm_threshold={norm_threshold}: must be > 0 (None = no bound), e.g. 1")

  def fn(x, t, y):
    def guided():
      cond, uncond = cond_and_null(eps_fn, x, t, y, null_label)
      d_c, d_u = eps_to_x0(sde, x, cond, t), eps_to_x0(sde, x, uncond, t)
      delta = d_c - d_u
      axes = tuple(range(1, x.ndim))
      if norm_threshold is not None:
        norm = jnp.sqrt(jnp.sum(delta ** 2, axis=axes, keepdims=True))
        delta = delta * jnp.minimum(1.0, norm_threshold / jnp.maximum(norm, 1e-12))
      unit = d_c / jnp.maximum(jnp.sqrt(jnp.sum(d_c ** 2, axis=axes, keepdims=True)), 1e-12)
      parallel = jnp.sum(delta * unit, axis=axes, keepdims=True) * unit
      s = broadcast_to_data(jnp.asarray(scale_at(scale, t), x.dtype), x)
      d_hat = d_c + (s - 1.0) * (delta - parallel + eta * parallel)
      return x0_to_eps(sde, x, d_hat, t), cond
    return _within(interval, t, guided, lambda: eps_fn(x, t, y))
  return tag_intervals(fn, interval, eps_fn)
