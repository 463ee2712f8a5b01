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


def cfg_zero_star(eps_fn: EpsFn, scale: Scale, null_label: ArrayLike, zero_init_steps: int = 0, *,
                  sde=None, interval: Interval = None) -> EpsFn:
  """CFG-Zero* (Fan et al. 2025): CFG on the unconditional prediction rescaled by the per-sample
  optimised scale s* = ⟨p_c, p_u⟩/‖p_u‖², p̃ = s* p_u + s (p_c − s* p_u), and a zero prediction
  for the first `zero_init_steps` sampler steps (the first grid times the function is called at).

  p is the path's velocity u = α'x̂₀ + σ'ε (`score.eps_to_velocity`; the probability-flow ODE's
  dx/dt, ε − x̂₀ on the rectified flow, as in the paper) when `sde` is given, and ε itself when it
  is not. On the VP-SDE u = ½β(ε/σ − x), so s* is taken on ε − σx, and a zeroed step is one the ODE
  does not move in. Scale 1 with no zeroed steps is the conditional prediction exactly. The two
  passes are one vmapped call. With zeroed steps the function carries a step count
  (`guidance.state`), so it must be applied outermost.
  """
  from jaxguide.diffusion import score   # the one module of conversions
  _check_interval(interval)
  if not isinstance(zero_init_steps, int) or isinstance(zero_init_steps, bool) or zero_init_steps < 0:
    raise ConfigError(f"zero_init_steps={zero_init_steps!r}: the zeroed first steps must be an int "
                      ">= 0, e.g. 1")
  to_p = (lambda x, e, t: e) if sde is None else (lambda x, e, t: score.eps_to_velocity(sde, x, e, t))
  to_eps = (lambda x, p, t: p) if sde is None else (lambda x, p, t: score.velocity_to_eps(sde, x, p, t))

  def guided_eps(x, t, y):
    cond, uncond = cond_and_null(eps_fn, x, t, y, null_label)
    p_c, p_u = to_p(x, cond, t), to_p(x, uncond, t)
    axes = tuple(range(1, x.ndim))
    norm = jnp.sum(p_u * p_u, axis=axes, keepdims=True)
    star = jnp.where(norm > 0, jnp.sum(p_c * p_u, axis=axes, keepdims=True) /
                     jnp.where(norm > 0, norm, 1.0), 1.0)
    s = broadcast_to_data(jnp.asarray(scale_at(scale, t), p_c.dtype), p_c)
    return to_eps(x, (1.0 - s) * star * p_u + s * p_c, t).astype(cond.dtype), cond

  def plain(x, t, y):
    return _within(interval, t, lambda: guided_eps(x, t, y), lambda: eps_fn(x, t, y))

  if not zero_init_steps:
    return tag(plain, interval, eps_fn, vmaps=True, name="cfg_zero_star")

  from jaxguide.guidance.state import Stateful

  def init(x, y):   # (steps begun, the lowest time called at), per sample
    return (jnp.zeros((x.shape[0],), jnp.int32), jnp.full((x.shape[0],), jnp.inf, jnp.float32))

  def step(state, x, t, y):
    count, lowest = state
    t32 = jnp.asarray(t, jnp.float32)
    count = count + (t32 < lowest).astype(jnp.int32)
    eps = plain(x, t, y)
    zero = to_eps(x, jnp.zeros_like(eps), t).astype(eps.dtype)
    eps = jnp.where(broadcast_to_data(count <= zero_init_steps, eps), zero, eps)
    return eps, (count, jnp.minimum(lowest, t32))
  fn = Stateful(init, step, name="cfg_zero_star")
  return tag(fn, interval, eps_fn, vmaps=True, name="cfg_zero_star")
