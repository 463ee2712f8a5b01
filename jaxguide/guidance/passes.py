"""The network passes guidance shares: the null condition, several conditions in ONE
vmapped call (split over the devices), and classifier gradients turned into ε corrections.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jaxguide.diffusion.score import EpsFn, LogProbFn
from jaxguide.diffusion.sde import Process, broadcast_to_data
from jaxguide.guidance.scales import scale_at
from jaxguide.parallel import DATA_AXIS, batch_mesh


def null_like(y: jax.Array, null: ArrayLike) -> jax.Array:
  """The null condition ∅ for every sample of y: the null label (an int) for labels y (B,), the
  null vector (D,) (e.g. the encoding of the empty prompt) for vector conditions y (B, D), or any
  per-sample condition shape y.shape[1:]."""
  return jnp.broadcast_to(jnp.asarray(null, y.dtype), y.shape)


def passes(eps_fn: EpsFn, x: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
  """ε for each row of labels (k, B): ONE network call, vmapped over the k label sets (CFG's
  [y, ∅], composition's [y₁, …, y_k, ∅]), split over the devices. Returns (k, B, ...)."""
  return _per_device(lambda x, t, labels: jax.vmap(eps_fn, in_axes=(None, None, 0))(
      x, t, labels), x.shape[0])(x, t, labels)


def _per_device(fn: Callable, batch: int) -> Callable:
  """fn(x (B, ...), t (B,), labels (k, B)) -> (k, B, ...), run on each device's slice of
  the batch when there are several devices and they divide it (the samplers' data mesh).

  The vmap over the label axis merges it into the batch as the major part, (2, B) -> 2B, which
  a batch split over devices cannot follow: XLA would gather the batch and run both passes on
  all of it on every device, twice the work (docs/benchmarks.md, "XLA:CPU workarounds", CFG's two
  passes). Under shard_map each device stacks only its own slice. The network's parameters,
  closed over, are replicated; the scales are applied outside, so per-sample scales need no
  special handling.
  """
  mesh = batch_mesh(batch)
  if mesh is None or mesh.devices.size == 1:
    return fn
  spec = P(DATA_AXIS)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, P(None, DATA_AXIS)),
                       out_specs=P(None, DATA_AXIS), check_vma=False)


def cond_and_null(eps_fn: EpsFn, x: jax.Array, t: jax.Array, y: jax.Array,
                  null_label: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """(ε(x, t, y), ε(x, t, ∅)) from one vmapped call (`passes`); y labels (B,) with ∅ the null
  label, or condition vectors (B, D) with ∅ the null vector (D,)."""
  cond, uncond = passes(eps_fn, x, t, jnp.stack([y, null_like(y, null_label)]))
  return cond, uncond


def classifier_grad(log_prob_fn: LogProbFn, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
  """∇ₓ log p_t(y | x) for every sample, shaped like x.

  One backward pass for the batch: the gradient of the sum of each sample's selected
  log-probability, which is per-sample because the classifier treats samples independently.
  A sample labelled with the null label (any y >= K) gets a zero gradient, i.e. no guidance.
  """
  return jax.grad(lambda x: selected_log_prob(log_prob_fn(x, t), y))(x)


def selected_log_prob(log_probs: jax.Array, y: jax.Array) -> jax.Array:
  """Σ_b log p(y_b | ·) from (B, K) log-probabilities; a null label (y >= K) contributes 0."""
  num_classes = log_probs.shape[-1]
  index = jnp.minimum(y, num_classes - 1).astype(jnp.int32)[:, None]
  selected = jnp.take_along_axis(log_probs, index, axis=-1)[:, 0]
  return jnp.sum(jnp.where(y < num_classes, selected, 0.0))


def subtract_gradient(eps: jax.Array, grad: jax.Array, sde: Process, scale, t: jax.Array) -> jax.Array:
  """ε − w σ(t) g: a log-probability gradient g turned into an ε correction at scale w."""
  _, sigma = sde.marginal_coeffs(t)
  w = broadcast_to_data(jnp.asarray(scale_at(scale, t), eps.dtype), eps)
  return eps - w * broadcast_to_data(sigma, eps).astype(eps.dtype) * grad.astype(eps.dtype)
