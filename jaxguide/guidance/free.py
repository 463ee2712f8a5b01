"""Classifier-free guidance and the kinds built on its lerp between two passes:

  classifier_free  ε̃ = ε(∅) + s (ε(y) − ε(∅))                       (Ho & Salimans 2022)
  negative         ε̃ = ε(y⁻) + s (ε(y) − ε(y⁻))                     (y⁻ = ∅ is CFG)
  compose          ε̃ = ε(∅) + Σᵢ wᵢ (ε(yᵢ) − ε(∅))                  (Liu et al. 2022)
  autoguidance     ε̃ = ε_weak(y) + s (ε(y) − ε_weak(y))              (Karras et al. 2024)
  unconditional    ε(x, t, ∅), whatever y
and CFG rescale (Lin et al. 2023) on ε.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxguide.diffusion.score import EpsFn
from jaxguide.diffusion.sde import broadcast_to_data
from jaxguide.errors import ConfigError
from jaxguide.guidance.intervals import Interval, _check_interval, _within
from jaxguide.guidance.passes import cond_and_null, null_like, passes
from jaxguide.guidance.scales import Scale, _lerp, scale_at
from jaxguide.guidance.state import tag


def unconditional(eps_fn: EpsFn, null_label: ArrayLike) -> EpsFn:
  """(x, t, y) -> eps_fn(x, t, ∅), ignoring y; ∅ a label or a null vector (`null_like`).

  Guiding this with a classifier is Song et al.'s conditional sampling from an unconditional
  model; guiding the plain (conditional) eps_fn is Dhariwal & Nichol's best setting.
  """
  def fn(x, t, y):
    return eps_fn(x, t, null_like(y, null_label))
  return tag(fn, None, eps_fn, name="unconditional")


def classifier_free(eps_fn: EpsFn, scale: Scale, null_label: ArrayLike, *,
                    interval: Interval = None, rescale: ArrayLike = 0.0) -> EpsFn:
  """Classifier-free guidance: ε̃ = ε(x, t, ∅) + s (ε(x, t, y) − ε(x, t, ∅)), s = `scale`.

  The conditional and null passes are ONE `jax.vmap`ped call over a stacked condition axis
  [y, ∅]. y may be labels (B,) with `null_label` the null class, or condition vectors (B, D)
  (a text encoder's prompt embeddings) with `null_label` the null vector (D,), e.g. the
  encoding of the empty prompt "".
  """
  _check_interval(interval)

  def fn(x, t, y):
    guided = lambda: _cfg(eps_fn, scale, null_label, rescale, x, t, y)
    return _within(interval, t, guided, lambda: eps_fn(x, t, y))
  return tag(fn, interval, eps_fn, vmaps=True, name="classifier_free")


def _cfg(eps_fn: EpsFn, scale, null_label: ArrayLike, rescale, x, t, y) -> tuple[jax.Array, jax.Array]:
  """(guided ε, conditional ε) from one vmapped network call over the labels [y, ∅]."""
  cond, uncond = cond_and_null(eps_fn, x, t, y, null_label)
  s = broadcast_to_data(jnp.asarray(scale_at(scale, t), cond.dtype), cond)
  # (1 − s) ε(∅) + s ε(y) is the lerp above written so that s = 0 and s = 1 are exact.
  guided = (1.0 - s) * uncond + s * cond
  if not (isinstance(rescale, (int, float)) and rescale == 0):
    guided = _rescale(guided, cond, rescale)
  return guided, cond


def _rescale(guided: jax.Array, cond: jax.Array, phi) -> jax.Array:
  """Lin et al. 2023 CFG rescale on ε: match the guided per-sample std to the conditional one."""
  axes = tuple(range(1, guided.ndim))
  std_cond = jnp.std(cond, axis=axes, keepdims=True)
  std_guided = jnp.std(guided, axis=axes, keepdims=True)
  # A constant guided prediction has no std to match; leave it unscaled rather than divide by 0.
  ratio = jnp.where(std_guided > 0, std_cond / jnp.where(std_guided > 0, std_guided, 1.0), 1.0)
  phi = broadcast_to_data(jnp.asarray(phi, guided.dtype), guided)
  return guided * (phi * ratio + (1.0 - phi))


def negative(eps_fn: EpsFn, scale: Scale, negative_label: ArrayLike, *,
             interval: Interval = None) -> EpsFn:
  """Negative-label guidance: ε̃ = ε(y⁻) + s (ε(y) − ε(y⁻)), the negative prompt of text-to-image
  CFG in class form: away from y⁻ (a label, or one per sample (B,)) and toward y. With vector
  conditions y (B, D), y⁻ is a vector (D,) or (B, D): a negative prompt's encoding in the empty
  prompt's place. With y⁻ = ∅ it is `classifier_free` exactly. Both passes are one vmapped call."""
  _check_interval(interval)

  def fn(x, t, y):
    def guided():
      neg = null_like(y, negative_label)
      cond, away = passes(eps_fn, x, t, jnp.stack([y, neg]))
      return _lerp(away, cond, scale, t), cond
    return _within(interval, t, guided, lambda: eps_fn(x, t, y))
  return tag(fn, interval, eps_fn, vmaps=True, name="negative")


def compose(eps_fn: EpsFn, labels: ArrayLike, weights: ArrayLike, null_label: ArrayLike) -> EpsFn:
  """Composed conditions: ε̃ = ε(∅) + Σᵢ wᵢ (ε(yᵢ) − ε(∅)), with k conditions yᵢ and weights
  (B, k) (or (k,) for every sample); a negative weight means "not yᵢ". All k + 1 passes are ONE
  vmapped call. The ε-function's own y is not read: the conditions given here are the condition.
  Labels: `labels` int (k,) or (B, k), ∅ the null label. Vector conditions (B, D): `labels`
  (k, D) or (B, k, D), ∅ the null vector (D,). One condition of weight s is CFG at s; weights
  may be traced."""
  labels, weights = jnp.asarray(labels), jnp.asarray(weights)
  integer = jnp.issubdtype(labels.dtype, jnp.integer)
  if weights.ndim not in (1, 2) or (integer and (labels.ndim not in (1, 2) or
                                                 labels.shape[-1:] != weights.shape[-1:])):
    raise ConfigError(f"compose: labels {labels.shape} and weights {weights.shape} must both be "
                      "(k,) or (B, k), one weight per label")

  def fn(x, t, y):
    b, cond_shape = x.shape[0], y.shape[1:]
    per_sample = labels.ndim == 2 + len(cond_shape)
    if labels.ndim not in (1 + len(cond_shape), 2 + len(cond_shape)) or (
        labels.shape[int(per_sample)] != weights.shape[-1]):
      raise ConfigError(f"compose: conditions {labels.shape} and weights {weights.shape} must be "
                        f"(k,)+{cond_shape} and (k,), or with a leading batch axis, one weight each")
    k = weights.shape[-1]
    lab = jnp.broadcast_to(labels.astype(y.dtype), (b, k) + cond_shape)
    w = jnp.broadcast_to(weights, (b, k)).astype(jnp.float32)
    null = null_like(y, null_label)[None]
    stack = jnp.concatenate([jnp.moveaxis(lab, 1, 0), null])   # (k + 1, B) + condition shape
    out = passes(eps_fn, x, t, stack)
    conds, uncond = out[:-1], out[-1]
    w = w.T.reshape(w.shape[::-1] + (1,) * (x.ndim - 1)).astype(out.dtype)      # (k, B, 1...)
    return uncond + jnp.sum(w * (conds - uncond[None]), axis=0)
  return tag(fn, None, eps_fn, vmaps=True, name="compose")


def autoguidance(eps_fn: EpsFn, weak_eps_fn: EpsFn, scale: Scale, *,
                 interval: Interval = None) -> EpsFn:
  """Autoguidance: ε̃ = ε_weak(x, t, y) + s (ε(x, t, y) − ε_weak(x, t, y)), both conditional, the
  weak guide a smaller or shorter-trained network of the same task. s = 1 is ε exactly. Two
  networks, so two calls (no shared vmap)."""
  _check_interval(interval)

  def fn(x, t, y):
    def guided():
      good = eps_fn(x, t, y)
      return _lerp(weak_eps_fn(x, t, y), good, scale, t), good
    return _within(interval, t, guided, lambda: eps_fn(x, t, y))
  return tag(fn, interval, eps_fn, weak_eps_fn, name="autoguidance")
