"""Guidance by a classifier's gradient, taken with `jax.grad`:

  classifier     ε̃ = ε − w σ(t) ∇ₓ log p_t(y | x)           (a noisy classifier; w = 1 is Bayes' rule)
  combine        CFG, then the classifier term
  x0_classifier  ε̃ = ε − s σ(t) ∇ₓ log p(y | x̂₀(x, t))      (a clean classifier; Bansal et al. 2023)
"""
from __future__ import annotations

import jax
from jax.typing import ArrayLike

from jaxguide.diffusion.score import EpsFn, LogProbFn, eps_to_x0
from jaxguide.diffusion.sde import VPSDE, broadcast_to_data
from jaxguide.errors import ConfigError
from jaxguide.guidance.free import _cfg
from jaxguide.guidance.intervals import Interval, _check_interval, _within, tag_intervals
from jaxguide.guidance.passes import classifier_grad, selected_log_prob, subtract_gradient
from jaxguide.guidance.scales import Scale


def classifier(eps_fn: EpsFn, log_prob_fn: LogProbFn, sde: VPSDE, scale: Scale, *,
               interval: Interval = None) -> EpsFn:
  """Classifier guidance: ε̃ = ε(x, t, y) − w σ(t) ∇ₓ log p_t(y | x), w = `scale`.

  y holds real classes: the classifier has no null class, so samples labelled ∅ are left
  unguided. Pass `unconditional(eps_fn, null)` to guide the unconditional model, or the
  conditional eps_fn itself to sharpen it.
  """
  _check_interval(interval)

  def fn(x, t, y):
    eps = eps_fn(x, t, y)
    guided = lambda: (_classifier_term(eps, log_prob_fn, sde, scale, x, t, y), eps)
    return _within(interval, t, guided, lambda: eps)
  return tag_intervals(fn, interval, eps_fn)


def combine(eps_fn: EpsFn, log_prob_fn: LogProbFn, sde: VPSDE, cfg_scale: Scale,
            clf_scale: Scale, null_label: ArrayLike, *, interval: Interval = None,
            rescale: ArrayLike = 0.0) -> EpsFn:
  """CFG, then the classifier term: ε̃ = ε(∅) + s (ε(y) − ε(∅)) − w σ(t) ∇ₓ log p_t(y | x).

  s = `cfg_scale` (rescale applies to the CFG part), w = `clf_scale`; labels are real classes.
  """
  _check_interval(interval)

  def fn(x, t, y):
    def guided():
      eps, cond = _cfg(eps_fn, cfg_scale, null_label, rescale, x, t, y)
      return _classifier_term(eps, log_prob_fn, sde, clf_scale, x, t, y), cond
    # Outside the interval both terms are skipped: plain conditional ε, one network pass.
    return _within(interval, t, guided, lambda: eps_fn(x, t, y))
  return tag_intervals(fn, interval, eps_fn)


def _classifier_term(eps, log_prob_fn, sde, scale, x, t, y) -> jax.Array:
  """ε − w σ(t) ∇ₓ log p_t(y | x)."""
  return subtract_gradient(eps, classifier_grad(log_prob_fn, x, t, y), sde, scale, t)


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
