"""A labelled isotropic Gaussian mixture whose noised scores and class posteriors are exact.

Under the VP-SDE, component k with mean μ_k and std s_k becomes N(α μ_k, (α² s_k² + σ²) I) at time
t, so p_t(x), p_t(x | y), ε(x, t, y) = −σ ∇ₓ log p_t(x | y) and log p_t(y | x) are all closed form.
This is the ground truth for tests, for the `toy:gmm` data source and for the toy figures.
"""
from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxguide.diffusion.sde import Process


@flax.struct.dataclass
class GaussianMixture:
  means: jax.Array    # (M, D)
  stds: jax.Array     # (M,)  isotropic standard deviation of each component
  weights: jax.Array  # (M,)  mixture weights, summing to 1
  labels: jax.Array   # (M,)  int class of each component, in [0, num_classes)
  num_classes: int = flax.struct.field(pytree_node=False, default=1)

  @property
  def dim(self) -> int:
    return self.means.shape[-1]

  def sample(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """n draws (x (n, D), y (n,)) from the clean mixture."""
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.categorical(k_comp, jnp.log(self.weights), shape=(n,))
    noise = jax.random.normal(k_noise, (n, self.dim))
    return self.means[comp] + self.stds[comp, None] * noise, self.labels[comp]

  def _component_log_densities(self, sde: Process, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log(w_k N(x; α μ_k, v_k I)) (B, M) at per-sample times t (B,), and the variances v (B, M)."""
    alpha, sigma = sde.marginal_coeffs(t)
    var = alpha[:, None] ** 2 * self.stds[None] ** 2 + sigma[:, None] ** 2
    diff = x[:, None, :] - alpha[:, None, None] * self.means[None]
    sq = jnp.sum(diff**2, axis=-1)
    logn = -0.5 * sq / var - 0.5 * self.dim * jnp.log(2 * math.pi * var)
    return jnp.log(self.weights)[None] + logn, var

  def class_mask(self, y: jax.Array) -> jax.Array:
    """(B, M) booleans: component k belongs to class y_b; y = num_classes (null) selects every one."""
    y = jnp.asarray(y)
    return (self.labels[None] == y[:, None]) | (y[:, None] == self.num_classes)

  def log_prob_y(self, sde: Process, x: jax.Array, t: jax.Array) -> jax.Array:
    """Exact (B, K) log p_t(y | x)."""
    logc, _ = self._component_log_densities(sde, x, t)
    onehot = jax.nn.one_hot(self.labels, self.num_classes, dtype=bool)       # (M, K)
    per_class = jnp.where(onehot[None], logc[:, :, None], -jnp.inf)          # (B, M, K)
    log_joint = jax.scipy.special.logsumexp(per_class, axis=1)               # (B, K)
    return log_joint - jax.scipy.special.logsumexp(log_joint, axis=-1, keepdims=True)

  def score(self, sde: Process, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
    """Exact ∇ₓ log p_t(x | y); the null label gives the unconditional score."""
    logc, var = self._component_log_densities(sde, x, t)
    logc = jnp.where(self.class_mask(y), logc, -jnp.inf)
    resp = jax.nn.softmax(logc, axis=-1)                                      # (B, M)
    alpha, _ = sde.marginal_coeffs(t)
    comp_scores = -(x[:, None, :] - alpha[:, None, None] * self.means[None]) / var[..., None]
    return jnp.sum(resp[..., None] * comp_scores, axis=1)

  def eps(self, sde: Process, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
    """Exact ε(x, t, y) = −σ(t) ∇ₓ log p_t(x | y)."""
    _, sigma = sde.marginal_coeffs(t)
    return -sigma[:, None] * self.score(sde, x, t, y)

  def log_density(self, sde: Process, x: jax.Array, t: jax.Array) -> jax.Array:
    """Exact log p_t(x), (B,); for density contours."""
    logc, _ = self._component_log_densities(sde, x, t)
    return jax.scipy.special.logsumexp(logc, axis=-1)


def ring_mixture(num_classes: int = 4, per_class: int = 2, radius: float = 2.0,
                 std: float = 0.2) -> GaussianMixture:
  """num_classes × per_class equal-weight components evenly spaced on a circle.

  Component k sits at angle 2πk/M and belongs to class k mod num_classes, so each class owns
  per_class components spread around the ring and classes alternate with their neighbours.
  """
  m = num_classes * per_class
  angles = 2 * np.pi * np.arange(m) / m
  means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
  return GaussianMixture(
      means=jnp.asarray(means, jnp.float32),
      stds=jnp.full((m,), std, jnp.float32),
      weights=jnp.full((m,), 1.0 / m, jnp.float32),
      labels=jnp.asarray(np.arange(m) % num_classes, jnp.int32),
      num_classes=num_classes)
