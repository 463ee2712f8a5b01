"""Guidance scales: a number, a 0-d array, one value per sample (B,), or a function of t
(a schedule), always traced, so that a new value never recompiles.
"""
from __future__ import annotations

from typing import Callable, Union

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxguide.diffusion.sde import broadcast_to_data
from jaxguide.errors import ConfigError

# A guidance scale: a number, a 0-d array, one value per sample (B,), or a function of t (B,)
# returning any of those (a schedule, see `schedule`).
Scale = Union[ArrayLike, Callable[[jax.Array], ArrayLike]]


SCHEDULES = ("constant", "linear", "cosine")


def scale_at(scale: Scale, t: jax.Array) -> ArrayLike:
  """The scale at times t (B,): `scale(t)` for a schedule, `scale` itself otherwise."""
  return scale(t) if callable(scale) else scale


def schedule(kind: str, scale: ArrayLike, *, neutral: float = 1.0) -> Callable[[jax.Array], jax.Array]:
  """A scale that varies with t: s(t) = neutral + (scale − neutral) · w(t), w averaging 1 over t in
  [0, 1], so that every kind spends the same guidance on average (Wang et al. 2024's weight
  schedulers; diffusers #7756):

    constant  w = 1                   the plain scale
    linear    w = 2 (1 − t)           no guidance at t = 1, rising as the sample forms
    cosine    w = 1 − cos(π (1 − t))  the same ends, flatter at both

  `neutral` is the scale at which a kind does nothing beyond its base: 1 for CFG's family (the
  conditional ε), 0 for classifier guidance. `scale` may be traced and per sample (B,): a jitted
  sampler takes new values without recompiling; `kind` is static.
  """
  if kind not in SCHEDULES:
    raise ConfigError(f"schedule={kind!r} is not known: use one of {', '.join(SCHEDULES)}")

  def fn(t):
    u = 1.0 - jnp.asarray(t, jnp.float32)
    w = {"constant": jnp.ones_like(u), "linear": 2.0 * u,
         "cosine": 1.0 - jnp.cos(jnp.pi * u)}[kind]
    return neutral + (jnp.asarray(scale, jnp.float32) - neutral) * w
  return fn


def _lerp(base: jax.Array, target: jax.Array, scale: Scale, t: jax.Array) -> jax.Array:
  """base + s (target − base), written (1 − s) base + s target so that s = 0 and s = 1 are exact."""
  s = broadcast_to_data(jnp.asarray(scale_at(scale, t), target.dtype), target)
  return (1.0 - s) * base + s * target
