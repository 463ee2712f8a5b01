"""Guidance by a classifier's gradient, taken with `jax.grad`:

  classifier     ε̃ = ε − w σ(t) ∇ₓ log p_t(y | x)           (a noisy classifier; w = 1 is Bayes' rule)
  combine        CFG, then the classifier term
  x0_classifier  ε̃ = ε − s σ(t) ∇ₓ log p(y | x̂₀(x, t))      (a clean classifier; Bansal et al. 2023)
"""
from __future__ import annotations

import jax
from jax.typing import ArrayLike

from jaxguide.diffusion.score import EpsFn, LogProbFn, eps_to_x0
from jaxguide.diffusion.sde import Process
from jaxguide.guidance.free import _cfg
from jaxguide.guidance.intervals import Interval, _check_interval, _within
from jaxguide.guidance.passes import classifier_grad, selected_log_prob, subtract_gradient
from jaxguide.guidance.scales import Scale
from jaxguide.guidance.state import tag


def classifier(eps_fn: EpsFn, log_prob_fn: LogProbFn, sde: Process, scale: Scale, *,
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
  return tag(fn, interval, eps_fn, name="classifier")


def combine(eps_fn: EpsFn, log_prob_fn: LogProbFn, sde: Process, cfg_scale: Scale,
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
  return tag(fn, interval, eps_fn, vmaps=True, name="combine")


def _classifier_term(eps, log_prob_fn, sde, scale, x, t, y) -> jax.Array:
  """ε − w σ(t) ∇ₓ log p_t(y | x)."""
  return subtract_gradient(eps, classifier_grad(log_prob_fn, x, t, y), sde, scale, t)


def x0_classifier(eps_fn: EpsFn, log_prob_fn, sde: Process, scale: Scale, *,
                  interval: Interval = None) -> EpsFn:
  """Guidance by a classifier of clean images (Bansal et al. 2023's forward guidance):
  ε̃ = ε − s σ(t) ∇ₓ log p(y | x̂₀(x, t)), the gradient taken through the denoiser;
  `log_prob_fn(x) -> (B, K)` takes no t, so the evaluator or any classifier of data serves.
  Bansal et al.'s self-recurrence is the samplers' `recurrence=n` (`jaxguide.sample`)."""
  _check_interval(interval)

  def guided_once(x, t, y):
    def total(x):   # the ε of this pass rides along as aux: one network call per pass
      eps = eps_fn(x, t, y)
      return selected_log_prob(log_prob_fn(eps_to_x0(sde, x, eps, t)), y), eps
    grad, eps = jax.grad(total, has_aux=True)(x)
    return subtract_gradient(eps, grad, sde, scale, t), eps

  def fn(x, t, y):
    return _within(interval, t, lambda: guided_once(x, t, y), lambda: eps_fn(x, t, y))
  return tag(fn, interval, eps_fn, vmaps=True, name="x0_classifier")
