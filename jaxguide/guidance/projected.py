"""Adaptive projected guidance (Sadat et al. 2024): CFG's difference in x̂₀, averaged across steps
with (negative) momentum, bounded in norm and split along the conditional prediction, its
parallel part down-weighted.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxguide.diffusion.score import EpsFn, eps_to_x0, x0_to_eps
from jaxguide.diffusion.sde import Process, broadcast_to_data
from jaxguide.errors import ConfigError
from jaxguide.guidance.intervals import Interval, _check_interval, _within
from jaxguide.guidance.passes import cond_and_null
from jaxguide.guidance.scales import Scale, scale_at
from jaxguide.guidance.state import Stateful, tag


def concrete(value) -> np.ndarray | None:
  """`value` as a numpy array when it is known now (a Python or numpy number, an array); None
  for a traced value, which is checked by nobody."""
  try:
    return np.asarray(value, np.float64)
  except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _check_options(eta, norm_threshold, momentum) -> None:
  """APG's options, whatever their type (a Python number, a numpy scalar, an array)."""
  for name, value in (("eta", eta), ("norm_threshold", norm_threshold), ("momentum", momentum)):
    v = None if value is None else concrete(value)
    if v is not None and not np.all(np.isfinite(v)):
      raise ConfigError(f"apg {name}={value}: must be finite")
  r = None if norm_threshold is None else concrete(norm_threshold)
  if r is not None and np.any(r < 0):
    raise ConfigError(f"apg norm_threshold={norm_threshold}: must be >= 0 (0 or None: no bound), "
                      "e.g. 15")
  b = concrete(momentum)
  if b is not None and np.any(np.abs(b) >= 1):
    raise ConfigError(f"apg momentum={momentum}: must be in (-1, 1) (the paper's -0.5 averages "
                      "the update against the last steps'), e.g. -0.5")


def _moves_nothing(momentum) -> bool:
  b = concrete(momentum)
  return b is not None and not np.any(b)


def apg(eps_fn: EpsFn, sde: Process, scale: Scale, null_label: ArrayLike, *, eta: ArrayLike = 0.0,
        norm_threshold: ArrayLike | None = None, momentum: ArrayLike = 0.0,
        interval: Interval = None) -> EpsFn:
  """Adaptive projected guidance, in x̂₀ space (the paper's Algorithm 1): Δ = D_c − D_u; with
  momentum β, m ← Δ + β m and Δ ← m (m = 0 before the first step, carried across the sampler's
  steps: `guidance.state`); Δ scaled so that ‖Δ‖ ≤ r per sample (r = `norm_threshold`; 0 or
  None: no bound); split into Δ∥ along D_c and Δ⊥ = Δ − Δ∥; D̂ = D_c + (s − 1)(Δ⊥ + η Δ∥), then
  back to ε. With eta = 1, no bound and no momentum it is `classifier_free` at s, to float
  rounding. Every option may be a number, one per sample (B,), or traced; the paper recommends
  β < 0 (e.g. −0.5)."""
  _check_interval(interval)
  _check_options(eta, norm_threshold, momentum)

  def guided(x, t, y, m):
    cond, uncond = cond_and_null(eps_fn, x, t, y, null_label)
    d_c, d_u = eps_to_x0(sde, x, cond, t), eps_to_x0(sde, x, uncond, t)
    delta = d_c - d_u
    if m is not None:
      m = delta + broadcast_to_data(jnp.asarray(momentum, x.dtype), x) * m
      delta = m
    axes = tuple(range(1, x.ndim))
    if norm_threshold is not None:
      r = broadcast_to_data(jnp.asarray(norm_threshold, x.dtype), x)
      norm = jnp.sqrt(jnp.sum(delta ** 2, axis=axes, keepdims=True))
      delta = delta * jnp.where(r > 0, jnp.minimum(1.0, r / jnp.maximum(norm, 1e-12)), 1.0)
    unit = d_c / jnp.maximum(jnp.sqrt(jnp.sum(d_c ** 2, axis=axes, keepdims=True)), 1e-12)
    parallel = jnp.sum(delta * unit, axis=axes, keepdims=True) * unit
    s = broadcast_to_data(jnp.asarray(scale_at(scale, t), x.dtype), x)
    e = broadcast_to_data(jnp.asarray(eta, x.dtype), x)
    d_hat = d_c + (s - 1.0) * (delta - parallel + e * parallel)
    return x0_to_eps(sde, x, d_hat, t), cond, m

  if _moves_nothing(momentum):
    def fn(x, t, y):
      return _within(interval, t, lambda: guided(x, t, y, None)[:2], lambda: eps_fn(x, t, y))
    return tag(fn, interval, eps_fn, vmaps=True, name="apg")

  def step(m, x, t, y):
    def on():
      eps, cond, m_new = guided(x, t, y, m)
      return (eps, m_new), (cond, m)
    # Outside the interval the average is neither updated nor used.
    return _within(interval, t, on, lambda: (eps_fn(x, t, y), m))
  fn = Stateful(lambda x, y: jnp.zeros_like(x), step, name="apg with momentum")
  return tag(fn, interval, eps_fn, vmaps=True, name="apg")
