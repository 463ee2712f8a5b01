"""ε-prediction ↔ score ↔ x̂₀: the only place these conversions live.

The networks predict ε. For x_t = α x₀ + σ ε:
    score(x, t) = ∇ₓ log p_t(x) = −ε(x, t) / σ(t)
    x̂₀(x, t)   = (x − σ(t) ε(x, t)) / α(t)
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxguide.sde import VPSDE, broadcast_to_data

EpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]   # (x, t (B,), y (B,)) -> ε
LogProbFn = Callable[[jax.Array, jax.Array], jax.Array]          # (x, t (B,)) -> (B, K) log p_t(y|x)


def eps_fn(apply_fn: Callable[..., jax.Array], params: Any) -> EpsFn:
  """Binds an ε-network's parameters: (x, t, y) -> ε. y may hold the null label `num_classes`."""
  def fn(x, t, y):
    return apply_fn({"params": params}, x, t, y)
  return fn


def log_prob_fn(apply_fn: Callable[..., jax.Array], params: Any) -> LogProbFn:
  """Binds a noisy classifier's parameters: (x, t) -> (B, K) log-probabilities."""
  def fn(x, t):
    return jax.nn.log_softmax(apply_fn({"params": params}, x, t).astype(jnp.float32), axis=-1)
  return fn


def eps_to_score(sde: VPSDE, eps: jax.Array, t: jax.Array) -> jax.Array:
  _, sigma = sde.marginal_coeffs(t)
  return -eps / broadcast_to_data(sigma, eps)


def score_to_eps(sde: VPSDE, score: jax.Array, t: jax.Array) -> jax.Array:
  _, sigma = sde.marginal_coeffs(t)
  return -broadcast_to_data(sigma, score) * score


def eps_to_x0(sde: VPSDE, x: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  alpha, sigma = sde.marginal_coeffs(t)
  return (x - broadcast_to_data(sigma, x) * eps) / broadcast_to_data(alpha, x)


def x0_to_eps(sde: VPSDE, x: jax.Array, x0: jax.Array, t: jax.Array) -> jax.Array:
  alpha, sigma = sde.marginal_coeffs(t)
  return (x - broadcast_to_data(alpha, x) * x0) / broadcast_to_data(sigma, x)
