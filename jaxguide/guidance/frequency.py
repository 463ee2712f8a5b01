"""Frequency-decoupled guidance (Sadat et al. 2025, "Guidance in the frequency domain enables
high-fidelity sampling at low CFG scales"): CFG's difference in x̂₀ split into the bands of a
Laplacian pyramid, each band with its own scale.

  Δ = D_c − D_u = b₀ + up(b₁ + up(b₂ + …))      b₀ the finest band, the last the coarse residual
  D̂ = D_u + s₀ b₀ + up(s₁ b₁ + up(s₂ b₂ + …))

`down` is a 2 × 2 average, `up` its nearest-neighbour inverse in size, and bₖ = Δₖ − up(down Δₖ)
with Δₖ₊₁ = down Δₖ, so the bands sum back to Δ exactly and equal scales are CFG (in x̂₀, which
is affine in ε: the same ε̃ to float rounding). The scales run linearly from `scale_high` (b₀)
to `scale_low` (the residual): with two levels, the fine detail at one scale and the coarse
structure at the other.
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxguide.diffusion.score import EpsFn, eps_to_x0, x0_to_eps
from jaxguide.diffusion.sde import Process, broadcast_to_data
from jaxguide.errors import ConfigError
from jaxguide.guidance.intervals import Interval, _check_interval, _within
from jaxguide.guidance.passes import cond_and_null
from jaxguide.guidance.scales import Scale, scale_at
from jaxguide.guidance.state import tag


def _down(x: jax.Array) -> jax.Array:
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _up(x: jax.Array) -> jax.Array:
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def laplacian_pyramid(x: jax.Array, levels: int) -> list[jax.Array]:
  """[b₀ (H, W), b₁ (H/2, W/2), …, residual]: `levels` bands of images (B, H, W, C) whose
  `collapse` is x exactly."""
  check_levels(x.shape, levels)
  bands = []
  for _ in range(levels - 1):
    low = _down(x)
    bands.append(x - _up(low))
    x = low
  return bands + [x]


def collapse(bands: list[jax.Array]) -> jax.Array:
  """The inverse of `laplacian_pyramid`: b₀ + up(b₁ + up(…))."""
  x = bands[-1]
  for band in reversed(bands[:-1]):
    x = band + _up(x)
  return x


def _check_level_count(levels: int) -> None:
  if not isinstance(levels, numbers.Integral) or levels < 2:
    raise ConfigError(f"fdg levels={levels!r}: must be an integer >= 2 (two bands: fine and "
                      "coarse), e.g. levels=2")


def check_levels(shape: tuple[int, ...], levels: int) -> None:
  _check_level_count(levels)
  if len(shape) != 4:
    raise ConfigError(f"fdg splits images (B, H, W, C) into frequency bands; this data has shape "
                      f"{tuple(shape[1:])}: use cfg or apg")
  f = 2 ** (levels - 1)
  if shape[1] % f or shape[2] % f:
    raise ConfigError(f"fdg levels={levels}: {shape[1]}x{shape[2]} images halve only "
                      f"{_halvings(shape[1], shape[2])} time(s): use levels <= "
                      f"{_halvings(shape[1], shape[2]) + 1}")


def _halvings(h: int, w: int) -> int:
  n = 0
  while h % 2 == 0 and w % 2 == 0:
    h, w, n = h // 2, w // 2, n + 1
  return n


def fdg(eps_fn: EpsFn, sde: Process, scale_low: Scale, scale_high: Scale, null_label: ArrayLike, *,
        levels: int = 2, interval: Interval = None) -> EpsFn:
  """Frequency-decoupled guidance (module docstring): the coarse band of CFG's x̂₀ difference at
  `scale_low`, the finest at `scale_high` (the bands between interpolated), from the
  conditional and null passes of one vmapped call. scale_low = scale_high = s is
  `classifier_free` at s."""
  _check_interval(interval)
  _check_level_count(levels)

  def fn(x, t, y):
    def guided():
      check_levels(x.shape, levels)
      cond, uncond = cond_and_null(eps_fn, x, t, y, null_label)
      d_c, d_u = eps_to_x0(sde, x, cond, t), eps_to_x0(sde, x, uncond, t)
      bands = laplacian_pyramid(d_c - d_u, levels)
      lo = jnp.asarray(scale_at(scale_low, t), x.dtype)
      hi = jnp.asarray(scale_at(scale_high, t), x.dtype)
      scaled = []
      for k, band in enumerate(bands):
        w = k / (levels - 1)                      # 0 at the finest band, 1 at the residual
        s = (1.0 - w) * hi + w * lo
        scaled.append(broadcast_to_data(s, band) * band)
      return x0_to_eps(sde, x, d_u + collapse(scaled), t), cond
    return _within(interval, t, guided, lambda: eps_fn(x, t, y))
  return tag(fn, interval, eps_fn, vmaps=True, name="fdg")
