"""ε-prediction ↔ score ↔ x̂₀ ↔ v ↔ velocity: the only place these conversions live.

The networks return ε. For x_t = α x₀ + σ ε on any process (`sde.Process`):
    score(x, t) = ∇ₓ log p_t(x) = −ε(x, t) / σ(t)
    x̂₀(x, t)   = (x − σ(t) ε(x, t)) / α(t)
    u(x, t)    = α' x̂₀ + σ' ε = dx/dt along the path: the flow velocity, ε − x̂₀ on the rectified
                 flow (α = 1 − t, σ = t), and the probability-flow ODE's dx/dt on every process
A network may instead be trained to predict v = α ε − σ x₀ (Salimans & Ho 2022; VP only, where
α² + σ² = 1) or the velocity u (flow matching); `VPrediction` and `Velocity` wrap it so that it
still returns ε, and nothing downstream changes.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxguide.diffusion.sde import Process, VPSDE, broadcast_to_data

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


def eps_to_score(sde: Process, eps: jax.Array, t: jax.Array) -> jax.Array:
  _, sigma = sde.marginal_coeffs(t)
  return -eps / broadcast_to_data(sigma, eps)


def score_to_eps(sde: Process, score: jax.Array, t: jax.Array) -> jax.Array:
  _, sigma = sde.marginal_coeffs(t)
  return -broadcast_to_data(sigma, score) * score


def eps_to_x0(sde: Process, x: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  alpha, sigma = sde.marginal_coeffs(t)
  return (x - broadcast_to_data(sigma, x) * eps) / broadcast_to_data(alpha, x)


def x0_to_eps(sde: Process, x: jax.Array, x0: jax.Array, t: jax.Array) -> jax.Array:
  alpha, sigma = sde.marginal_coeffs(t)
  return (x - broadcast_to_data(alpha, x) * x0) / broadcast_to_data(sigma, x)


def v_to_eps(sde: Process, x: jax.Array, v: jax.Array, t: jax.Array) -> jax.Array:
  """ε = α v + σ x for v = α ε − σ x₀ (α² + σ² = 1)."""
  alpha, sigma = sde.marginal_coeffs(t)
  return broadcast_to_data(alpha, x) * v + broadcast_to_data(sigma, x) * x


def eps_to_velocity(sde: Process, x: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """u = α' x̂₀ + σ' ε = (α'/α) x + (σ' − α'σ/α) ε (rectified flow: ε − x̂₀)."""
  alpha, sigma = sde.marginal_coeffs(t)
  d_alpha, d_sigma = sde.marginal_rates(t)
  ratio = d_alpha / alpha
  return broadcast_to_data(ratio, x) * x + broadcast_to_data(d_sigma - ratio * sigma, x) * eps


def velocity_to_eps(sde: Process, x: jax.Array, u: jax.Array, t: jax.Array) -> jax.Array:
  """ε = (α u − α' x) / (α σ' − α' σ): the inverse of `eps_to_velocity`, with no division by α, so
  exact up to α = 0 (rectified flow: ε = x + (1 − t) u)."""
  alpha, sigma = sde.marginal_coeffs(t)
  d_alpha, d_sigma = sde.marginal_rates(t)
  det = alpha * d_sigma - d_alpha * sigma
  return (broadcast_to_data(alpha / det, x) * u - broadcast_to_data(d_alpha / det, x) * x)


def velocity_weight(sde: Process, t: jax.Array) -> jax.Array:
  """w(t) with w ‖ε̂ − ε‖² = ‖û − u‖² for ε̂ = velocity_to_eps(û): ((ασ' − α'σ)/α)², 1/(1 − t)²
  on the rectified flow."""
  alpha, sigma = sde.marginal_coeffs(t)
  d_alpha, d_sigma = sde.marginal_rates(t)
  return ((alpha * d_sigma - d_alpha * sigma) / alpha) ** 2


class Velocity(nn.Module):
  """A (x, t, y) network read as the path's velocity u = α' x₀ + σ' ε (flow matching's target,
  ε − x₀ on the rectified flow), returned as ε = `velocity_to_eps`. The target has unit-order
  variance at every t, and ε stays exact where α → 0 (t → 1 on the flow). Parameters under 'net'."""

  net: nn.Module
  sde: Process

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, train: bool = False) -> jax.Array:
    u = self.net(x, t, y, train=train)
    return velocity_to_eps(self.sde, x.astype(jnp.float32), u, t)


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
