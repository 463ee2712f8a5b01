"""Guidance with state across a sampler's steps, and what every transform records of the
ε-functions it wraps.

The protocol. A stateful ε-function is a `Stateful(init, step)`:

  init(x, y) -> state             a pytree, from the prior draw x_T (B, ...) and the conditions y
  step(state, x, t, y) -> (ε, state')

It is called like any ε-function, `fn(x, t, y) -> ε`, and every transform that wraps it records
it (`tag`: `fn.stateful`), so that a sampler finds each state it must carry. `jaxguide.sample`
calls `init_states(eps_fn, x_T, y)` before its `lax.scan`, keeps the states in the scan's carry
beside the sampler's own, and traces each step under `carried(eps_fn, states)`: there each call
of a stateful function reads its current state and leaves the new one, in call order, so that a
step evaluating ε more than once (Heun's two stages, pc's corrector, self-recurrence) threads
the state through every evaluation. A stateless ε-function carries nothing: the scan is what it
was. Outside a sampler (a loop of your own, a single call), each call starts from
`init(x, y)`; `carried` gives a loop of your own the same threading.

A stateful function must be called where its new state can leave the call: not inside a
`vmap` over conditions (classifier-free guidance's passes), a `jax.grad` (x0_classifier) or a
`lax.cond`; those transforms refuse to wrap one (`tag(..., vmaps=True)`), and inside `carried`
the interval test computes both branches instead of a `lax.cond`.

`tag` also passes on the static guidance intervals (`intervals`) and refuses to wrap CFG++'s
paired ε-function (`x0.Paired`) in a transform that would drop its re-noising ε.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

import jax

from jaxguide.errors import ConfigError
from jaxguide.guidance.intervals import Interval, tag_intervals

State = Any


class Stateful:
  """An ε-function with state carried across the sampler's steps (module docstring)."""

  def __init__(self, init: Callable[[jax.Array, jax.Array], State],
               step: Callable[[State, jax.Array, jax.Array, jax.Array], tuple[jax.Array, State]],
               name: str = "stateful guidance"):
    self.init, self.step, self.name = init, step, name
    self.stateful = (self,)

  def __call__(self, x, t, y):
    cells = _CARRIED.get()
    if cells is None or self not in cells:
      return self.step(self.init(x, y), x, t, y)[0]
    eps, cells[self] = self.step(cells[self], x, t, y)
    return eps


# The states of the stateful functions being traced in a sampler's step: {function: state}.
_CARRIED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("jaxguide_carried",
                                                                       default=None)


def stateful_of(eps_fn: Callable) -> tuple[Stateful, ...]:
  """The stateful functions an ε-function calls (itself included), in a fixed order."""
  return tuple(getattr(eps_fn, "stateful", ()))


def init_states(eps_fn: Callable, x: jax.Array, y: jax.Array) -> tuple[State, ...]:
  return tuple(f.init(x, y) for f in stateful_of(eps_fn))


class Carried:
  """The states while a step is traced; `states()` the ones it leaves, in `stateful_of` order."""

  def __init__(self, functions: tuple[Stateful, ...], states: tuple[State, ...]):
    self.functions, self.cells = functions, dict(zip(functions, states))

  def states(self) -> tuple[State, ...]:
    return tuple(self.cells[f] for f in self.functions)


@contextlib.contextmanager
def carried(eps_fn: Callable, states: tuple[State, ...]) -> Iterator[Carried]:
  """Within this block, each call of a stateful function of `eps_fn` threads its state."""
  box = Carried(stateful_of(eps_fn), states)
  if not box.functions:
    yield box
    return
  token = _CARRIED.set({**(_CARRIED.get() or {}), **box.cells})
  try:
    yield box
    box.cells = {f: _CARRIED.get()[f] for f in box.functions}
  finally:
    _CARRIED.reset(token)


def threading_state() -> bool:
  """Whether a step with stateful functions is being traced (no lax.cond may hide their calls)."""
  return bool(_CARRIED.get())


def tag(fn: Callable, interval: Interval, *inner: Callable, vmaps: bool = False,
        keeps_pair: bool = False, name: str = "this transform") -> Callable:
  """Records on `fn` what the ε-functions it wraps record (intervals, stateful functions) and its
  own static `interval`. `vmaps`: fn calls them under vmap or grad, where no state can be
  threaded. `keeps_pair`: fn hands on CFG++'s re-noising ε (else a Paired inner is refused)."""
  for f in inner:
    if not keeps_pair and getattr(f, "pair", None) is not None:
      raise ConfigError(f"{name} cannot wrap cfgpp: it would drop CFG++'s re-noising ε and run "
                        "plain CFG; apply cfgpp outermost (clip_x0 and dynamic_threshold keep it)")
    if vmaps and stateful_of(f):
      raise ConfigError(f"{name} cannot wrap {stateful_of(f)[0].name}: its state cannot be carried "
                        "through the passes it batches; apply the stateful guidance outermost")
  fn = tag_intervals(fn, interval, *inner)
  found = tuple(dict.fromkeys(s for f in inner for s in stateful_of(f)))
  if found and fn not in found:
    fn.stateful = tuple(dict.fromkeys(found + stateful_of(fn)))
  return fn
