"""The newer guidance family, each an ε-transform like CFG (see `jaxguide.guidance`):

  negative        ε̃ = ε(y⁻) + s (ε(y) − ε(y⁻))                     (y⁻ = ∅ is CFG)
  compose         ε̃ = ε(∅) + Σᵢ wᵢ (ε(yᵢ) − ε(∅))                  (Liu et al. 2022)
  autoguidance    ε̃ = ε_weak(y) + s (ε(y) − ε_weak(y))              (Karras et al. 2024)
  apg             CFG's difference in x̂₀, split along D_c and bounded (Sadat et al. 2024)
  x0_classifier   ε̃ = ε − s σ(t) ∇ₓ log p(y | x̂₀(x, t))            (Bansal et al. 2023)
  cfgpp           x̂₀ from ε(∅) + λ (ε(y) − ε(∅)), re-noised with ε(∅) (Chung et al. 2024)

Every scale may be per sample or a schedule of t (`guidance.schedule`), traced: no recompiles.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxguide.errors import ConfigError
from jaxguide.guidance.core import (Interval, Paired, Scale, _check_interval, _within, cond_and_null,
                                    null_like, passes, scale_at, selected_log_prob,
                                    subtract_gradient, tag_intervals)
from jaxguide.score import EpsFn, eps_to_x0, x0_to_eps
from jaxguide.sde import VPSDE, broadcast_to_data


def _lerp(base: jax.Array, target: jax.Array, scale: Scale, t: jax.Array) -> jax.Array:
  """base + s (target − base), written (1 − s) base + s target so that s = 0 and s = 1 are exact."""
  s = broadcast_to_data(jnp.asarray(scale_at(scale, t), target.dtype), target)
  return (1.0 - s) * base + s * target


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
  return tag_intervals(fn, interval, eps_fn)


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
  return fn


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
  return tag_intervals(fn, interval, eps_fn)


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


def x0_classifier(eps_fn: EpsFn, log_prob_fn, sde: VPSDE, scale: Scale, *, recurrence: int = 0,
                  interval: Interval = None) -> EpsFn:
  """Guidance by a classifier of clean images (Bansal et al. 2023's forward guidance):
  ε̃ = ε − s σ(t) ∇ₓ log p(y | x̂₀(x, t)), the gradient taken through the denoiser;
  `log_prob_fn(x) -> (B, K)` takes no t, so the evaluator or any classifier of data serves.

  recurrence = n repeats the guided prediction n more times at the same t, each time from
  x ← α x̂₀(ε̃) + σ ε̃ (Bansal et al.'s self-recurrence, with the guided noise in place of fresh
  noise, so that the ε-function stays deterministic). n = 0 is plain forward guidance.
  """
  _check_interval(interval)
  if not isinstance(recurrence, int) or recurrence < 0:
    raise ConfigError(f"x0_classifier recurrence={recurrence!r}: must be an integer >= 0, e.g. 0")

  def guided_once(x, t, y):
    def total(x):   # the ε of this pass rides along as aux: one network call per pass
      eps = eps_fn(x, t, y)
      return selected_log_prob(log_prob_fn(eps_to_x0(sde, x, eps, t)), y), eps
    grad, eps = jax.grad(total, has_aux=True)(x)
    return subtract_gradient(eps, grad, sde, scale, t), eps

  def fn(x, t, y):
    def guided():
      out, eps = guided_once(x, t, y)
      alpha, sigma = sde.marginal_coeffs(t)
      for _ in range(recurrence):
        x0 = eps_to_x0(sde, x, out, t)
        x_again = broadcast_to_data(alpha, x) * x0 + broadcast_to_data(sigma, x) * out
        out, _ = guided_once(x_again, t, y)
      return out, eps
    return _within(interval, t, guided, lambda: eps_fn(x, t, y))
  return tag_intervals(fn, interval, eps_fn)


class CFGPlusPlus(Paired):
  """CFG++: the guided ε̂ = ε(∅) + λ (ε(y) − ε(∅)), λ in [0, 1], gives x̂₀; the step re-noises with
  ε(∅) instead. Called as an ε-function it returns ε̂ (so every sampler runs it, as CFG at λ); the
  samplers that implement CFG++ (ddim, dpmpp_2m, ddpm) call `pair` for (ε̂, ε(∅)) from one vmapped call.
  """

  def __init__(self, eps_fn: EpsFn, lam: Scale, null_label: ArrayLike):
    if isinstance(lam, (int, float)) and not 0.0 <= lam <= 1.0:
      raise ConfigError(f"cfgpp lambda={lam}: must be in [0, 1] (CFG++'s guidance), e.g. 0.6")
    self.eps_fn, self.lam, self.null_label = eps_fn, lam, null_label
    super().__init__(lambda x, t, y: self.pair(x, t, y)[0], self._pair)

  def _pair(self, x, t, y) -> tuple[jax.Array, jax.Array]:
    cond, uncond = cond_and_null(self.eps_fn, x, t, y, self.null_label)
    return _lerp(uncond, cond, self.lam, t), uncond


def cfgpp(eps_fn: EpsFn, lam: Scale, null_label: ArrayLike) -> CFGPlusPlus:
  """CFG++ (Chung et al. 2024); see `CFGPlusPlus`. λ = 0 is the unconditional model."""
  return CFGPlusPlus(eps_fn, lam, null_label)


def renoising_pair(eps_fn: EpsFn, x, t, y) -> tuple[jax.Array, jax.Array]:
  """(ε for x̂₀, ε for re-noising): CFG++'s pair, or (ε, ε) for every other ε-function."""
  pair = getattr(eps_fn, "pair", None)
  if pair is not None:
    return pair(x, t, y)
  eps = eps_fn(x, t, y)
  return eps, eps
