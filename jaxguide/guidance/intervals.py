"""Guidance intervals (Kynkäänniemi et al. 2024): guide only for t_lo <= t <= t_hi.

A guided ε-function records the static intervals it tests in `fn.intervals`; the samplers, whose
time grid is known when they are traced, split their loop into runs of steps wholly inside or
wholly outside each interval and trace each run under `decided_intervals`, so that the step holds
the guided or the plain branch alone (no `lax.cond` reading a predicate every step). Elsewhere
(a loop of your own, a traced grid, a step straddling an end) the test is per sample.
"""
from __future__ import annotations

import contextlib
import contextvars
import numbers
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxguide.diffusion.sde import broadcast_to_data
from jaxguide.errors import ConfigError

Interval = Optional[Sequence[float]]   # (t_lo, t_hi) or None for every t


def _within(interval: Interval, t: jax.Array,
            guided: Callable[[], tuple[Any, Any]], plain: Callable[[], Any]) -> Any:
  """`guided()[0]` where t is inside `interval`, the unguided output elsewhere (see module
  docstring).

  `guided()` returns (guided output, unguided output) because it computes both anyway; `plain()`
  computes the unguided output alone, for when no sample is inside. An output is ε, or any pytree
  of per-sample arrays (a stateful transform's (ε, state)).
  """
  if interval is None:
    return guided()[0]
  decided = _DECIDED.get().get(static_interval(interval))
  if decided is not None:      # the sampler knows this whole step is inside (or outside) it
    return guided()[0] if decided else plain()
  lo, hi = interval
  inside = (t >= lo) & (t <= hi)                                            # (B,)

  def on():
    out, unguided = guided()
    return jax.tree.map(lambda a, b: jnp.where(broadcast_to_data(inside, a), a, b), out, unguided)
  if _threading_state():   # a stateful function's new state cannot leave a lax.cond branch
    return on()
  # Only where the step's times are not known at trace time (a user's own loop, a traced grid)
  # or straddle an end of the interval: lax.cond skips the extra work when no sample is inside.
  return lax.cond(jnp.any(inside), on, plain)


def _threading_state() -> bool:
  from jaxguide.guidance import state   # state imports this module
  return state.threading_state()


# Guidance intervals, decided outside the traced step. A guided ε-function records the static
# intervals it tests in `fn.intervals`; the samplers, whose time grid is known when they are
# traced, split their loop into runs of steps that are wholly inside or wholly outside each
# interval (`samplers._scan`) and trace each run under `decided_intervals`, so that the step
# holds the guided or the plain branch alone, with no lax.cond reading a predicate every step
# (on a GPU a conditional inside a while loop waits for its predicate on the host).
_DECIDED: contextvars.ContextVar[dict] = contextvars.ContextVar("jaxguide_decided_intervals",
                                                                default={})


def static_interval(interval: Interval) -> Optional[tuple[float, float]]:
  """(lo, hi) as floats when both ends are Python numbers (a traced interval: None)."""
  if interval is None or not all(isinstance(v, numbers.Real) for v in interval):
    return None
  return float(interval[0]), float(interval[1])


@contextlib.contextmanager
def decided_intervals(decisions: dict[tuple[float, float], bool]) -> Iterator[None]:
  """While tracing inside this block, `_within` takes the guided branch for each interval mapped
  to True and the plain one for each mapped to False, without testing t."""
  token = _DECIDED.set({**_DECIDED.get(), **decisions})
  try:
    yield
  finally:
    _DECIDED.reset(token)


def intervals_of(eps_fn: Callable) -> tuple[tuple[float, float], ...]:
  """The static guidance intervals an ε-function tests (see `decided_intervals`)."""
  return tuple(getattr(eps_fn, "intervals", ()))


def tag_intervals(fn: Callable, interval: Interval, *inner: Callable) -> Callable:
  """Records on `fn` the intervals of the ε-functions it wraps and its own static `interval`."""
  found = [i for f in inner for i in intervals_of(f)]
  own = static_interval(interval)
  if own is not None:
    found.append(own)
  if found:
    fn.intervals = tuple(dict.fromkeys(found))
  return fn


def _check_interval(interval: Interval) -> None:
  if interval is None:
    return
  if len(interval) != 2 or (all(isinstance(v, (int, float)) for v in interval)
                            and not interval[0] <= interval[1]):
    raise ConfigError(f"interval={tuple(interval)} must be a pair (t_lo, t_hi) with "
                      "t_lo <= t_hi, e.g. interval=(0.2, 0.8)")
