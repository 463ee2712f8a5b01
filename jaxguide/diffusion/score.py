"""ε-prediction ↔ score ↔ x̂₀: the only place these conversions live.

The networks predict ε. For x_t = α x₀ + σ ε:
    score(x, t) = ∇ₓ log p_t(x) = −ε(x, t) / σ(t)
    x̂₀(x, t)   = (x − σ(t) ε(x, t)) / α(t)
A network may instead be trained to predict v = α ε − σ x₀ (Salimans & Ho 2022); `VPrediction`
wraps it so that it still returns ε = α v + σ x, and nothing downstream changes.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxguide.diffusion.sde import VPSDE, broadcast_to_data

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


def v_to_eps(sde: VPSDE, x: jax.Array, v: jax.Array, t: jax.Array) -> jax.Array:
  """ε = α v + σ x for v = α ε − σ x₀ (α² + σ² = 1)."""
  alpha, sigma = sde.marginal_coeffs(t)
  return broadcast_to_data(alpha, x) * v + broadcast_to_data(sigma, x) * x


class VPrediction(nn.Module):
  """A (x, t, y) network read as a v-prediction, returned as ε.

  v-prediction is EDM's preconditioning for the VP-SDE with σ_data = 1 (c_skip = α², c_out = σ,
  c_in = 1): the network's target has unit variance at every noise level, while an ε-network at
  high noise must output ε ≈ x_t plus a correction of size α that carries all of the content (and
  the label). Its parameters sit under 'net'.
  """

  net: nn.Module
  sde: VPSDE

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, train: bool = False) -> jax.Array:
    v = self.net(x, t, y, train=train)
    return v_to_eps(self.sde, x.astype(jnp.float32), v, t)
