"""Transforms of x̂₀ for the samplers (clipping, Imagen's dynamic thresholding), and CFG++
(Chung et al. 2024): x̂₀ from the guided ε, re-noised with ε(∅) by the samplers that take a
second ε (`Paired`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxguide.diffusion.score import EpsFn, eps_to_x0, x0_to_eps
from jaxguide.diffusion.sde import Process, broadcast_to_data
from jaxguide.errors import ConfigError
from jaxguide.guidance.passes import cond_and_null
from jaxguide.guidance.scales import Scale, _lerp
from jaxguide.guidance.state import tag


class Paired:
  """An ε-function that also hands the samplers a second ε to re-noise with (CFG++):
  `fn(x, t, y)` is the ε for x̂₀, `pair(x, t, y)` returns (that ε, the re-noising ε)."""

  def __init__(self, fn: EpsFn, pair: Callable):
    self.fn, self.pair = fn, pair

  def __call__(self, x, t, y):
    return self.fn(x, t, y)


def _map_x0(eps_fn: EpsFn, sde: Process, f: Callable[[jax.Array], jax.Array]) -> EpsFn:
  """ε re-derived from f(x̂₀); a Paired ε-function stays paired (its re-noising ε untouched)."""
  def mapped(x, t, eps):
    return x0_to_eps(sde, x, f(eps_to_x0(sde, x, eps, t)), t)

  def fn(x, t, y):
    return mapped(x, t, eps_fn(x, t, y))
  pair = getattr(eps_fn, "pair", None)
  if pair is None:
    return tag(fn, None, eps_fn)

  def paired(x, t, y):
    guided, renoise = pair(x, t, y)
    return mapped(x, t, guided), renoise
  return tag(Paired(lambda x, t, y: paired(x, t, y)[0], paired), None, eps_fn, keeps_pair=True)


def clip_x0(eps_fn: EpsFn, sde: Process, limit: float = 1.0) -> EpsFn:
  """Clips x̂₀ to [−limit, limit] and re-derives ε, so that any sampler sees the clipped x̂₀."""
  return _map_x0(eps_fn, sde, lambda x0: jnp.clip(x0, -limit, limit))


def dynamic_threshold(eps_fn: EpsFn, sde: Process, quantile: float = 0.995) -> EpsFn:
  """Imagen's dynamic thresholding (Saharia et al. 2022), then re-derives ε.

  s = the `quantile` of |x̂₀| per sample, s ← max(s, 1), x̂₀ ← clip(x̂₀, −s, s) / s. `quantile`
  is a fraction: 0.995 for the paper's 99.5th percentile.
  """
  if isinstance(quantile, (int, float)) and not 0.0 < quantile <= 1.0:
    raise ConfigError(f"dynamic_threshold={quantile} is a quantile in (0, 1]: use e.g. 0.995 "
                      "(Imagen's 99.5th percentile)")

  def threshold(x0):
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = broadcast_to_data(jnp.maximum(jnp.quantile(flat, quantile, axis=-1), 1.0), x0)
    return jnp.clip(x0, -s, s) / s
  return _map_x0(eps_fn, sde, threshold)


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
    tag(self, None, eps_fn, vmaps=True, name="cfgpp")

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
