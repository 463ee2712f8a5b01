"""The two classic kinds (classifier guidance, CFG), their shared machinery (guidance intervals,
scale schedules, the one-call vmapped passes) and the x̂₀ transforms. See `jaxguide.guidance`."""
from __future__ import annotations

import contextlib
import contextvars
import numbers
from typing import Callable, Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jaxguide.errors import ConfigError
from jaxguide.parallel import DATA_AXIS, batch_mesh
from jaxguide.score import EpsFn, LogProbFn, eps_to_x0, x0_to_eps
from jaxguide.sde import VPSDE, broadcast_to_data

Interval = Optional[Sequence[float]]   # (t_lo, t_hi) or None for every t
# A guidance scale: a number, a 0-d array, one value per sample (B,), or a function of t (B,)
# returning any of those (a schedule, see `schedule`).
Scale = Union[ArrayLike, Callable[[jax.Array], ArrayLike]]
SCHEDULES = ("constant", "linear", "cosine")


def scale_at(scale: Scale, t: jax.Array) -> ArrayLike:
  """The scale at times t (B,): `scale(t)` for a schedule, `scale` itself otherwise."""
  return scale(t) if callable(scale) else scale


def schedule(kind: str, scale: ArrayLike, *, neutral: float = 1.0) -> Callable[[jax.Array], jax.Array]:
  """A scale that varies with t: s(t) = neutral + (scale − neutral) · w(t), w averaging 1 over t in
  [0, 1], so that every kind spends the same guidance on average (Wang et al. 2024's weight
  schedulers; diffusers #7756):

    constant  w = 1                   the plain scale
    linear    w = 2 (1 − t)           no guidance at t = 1, rising as the sample forms
    cosine    w = 1 − cos(π (1 − t))  the same ends, flatter at both

  `neutral` is the scale at which a kind does nothing beyond its base: 1 for CFG's family (the
  conditional ε), 0 for classifier guidance. `scale` may be traced and per sample (B,): a jitted
  sampler takes new values without recompiling; `kind` is static.
  """
  if kind not in SCHEDULES:
    raise ConfigError(f"schedule={kind!r} is not known: use one of {', '.join(SCHEDULES)}")

  def fn(t):
    u = 1.0 - jnp.asarray(t, jnp.float32)
    w = {"constant": jnp.ones_like(u), "linear": 2.0 * u,
         "cosine": 1.0 - jnp.cos(jnp.pi * u)}[kind]
    return neutral + (jnp.asarray(scale, jnp.float32) - neutral) * w
  return fn


def null_like(y: jax.Array, null: ArrayLike) -> jax.Array:
  """The null condition ∅ for every sample of y: the null label (an int) for labels y (B,), the
  null vector (D,) (e.g. the encoding of the empty prompt) for vector conditions y (B, D), or any
  per-sample condition shape y.shape[1:]."""
  return jnp.broadcast_to(jnp.asarray(null, y.dtype), y.shape)


def unconditional(eps_fn: EpsFn, null_label: ArrayLike) -> EpsFn:
  """(x, t, y) -> eps_fn(x, t, ∅), ignoring y; ∅ a label or a null vector (`null_like`).

  Guiding this with a classifier is Song et al.'s conditional sampling from an unconditional
  model; guiding the plain (conditional) eps_fn is Dhariwal & Nichol's best setting.
  """
  def fn(x, t, y):
    return eps_fn(x, t, null_like(y, null_label))
  return tag_intervals(fn, None, eps_fn)


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


def cond_and_null(eps_fn: EpsFn, x: jax.Array, t: jax.Array, y: jax.Array,
                  null_label: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """(ε(x, t, y), ε(x, t, ∅)) from one vmapped call (`passes`); y labels (B,) with ∅ the null
  label, or condition vectors (B, D) with ∅ the null vector (D,)."""
  cond, uncond = passes(eps_fn, x, t, jnp.stack([y, null_like(y, null_label)]))
  return cond, uncond


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


class Paired:
  """An ε-function that also hands the samplers a second ε to re-noise with (CFG++):
  `fn(x, t, y)` is the ε for x̂₀, `pair(x, t, y)` returns (that ε, the re-noising ε)."""

  def __init__(self, fn: EpsFn, pair: Callable):
    self.fn, self.pair = fn, pair

  def __call__(self, x, t, y):
    return self.fn(x, t, y)


def _map_x0(eps_fn: EpsFn, sde: VPSDE, f: Callable[[jax.Array], jax.Array]) -> EpsFn:
  """ε re-derived from f(x̂₀); a Paired ε-function stays paired (its re-noising ε untouched)."""
  def mapped(x, t, eps):
    return x0_to_eps(sde, x, f(eps_to_x0(sde, x, eps, t)), t)

  def fn(x, t, y):
    return mapped(x, t, eps_fn(x, t, y))
  pair = getattr(eps_fn, "pair", None)
  if pair is None:
    return tag_intervals(fn, None, eps_fn)

  def paired(x, t, y):
    guided, renoise = pair(x, t, y)
    return mapped(x, t, guided), renoise
  return tag_intervals(Paired(lambda x, t, y: paired(x, t, y)[0], paired), None, eps_fn)


def clip_x0(eps_fn: EpsFn, sde: VPSDE, limit: float = 1.0) -> EpsFn:
  """Clips x̂₀ to [−limit, limit] and re-derives ε, so that any sampler sees the clipped x̂₀."""
  return _map_x0(eps_fn, sde, lambda x0: jnp.clip(x0, -limit, limit))


def dynamic_threshold(eps_fn: EpsFn, sde: VPSDE, quantile: float = 0.995) -> EpsFn:
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


def _cfg(eps_fn: EpsFn, scale, null_label: ArrayLike, rescale, x, t, y) -> tuple[jax.Array, jax.Array]:
  """(guided ε, conditional ε) from one vmapped network call over the labels [y, ∅]."""
  cond, uncond = cond_and_null(eps_fn, x, t, y, null_label)
  s = broadcast_to_data(jnp.asarray(scale_at(scale, t), cond.dtype), cond)
  # (1 − s) ε(∅) + s ε(y) is the lerp above written so that s = 0 and s = 1 are exact.
  guided = (1.0 - s) * uncond + s * cond
  if not (isinstance(rescale, (int, float)) and rescale == 0):
    guided = _rescale(guided, cond, rescale)
  return guided, cond


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
  all of it on every device (2x the work, measured 0.70x PyTorch eager on 2 CPU devices). Under
  shard_map each device stacks only its own slice. The network's parameters, closed over, are
  replicated; the scales are applied outside, so per-sample scales need no special handling.
  """
  mesh = batch_mesh(batch)
  if mesh is None or mesh.devices.size == 1:
    return fn
  spec = P(DATA_AXIS)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, P(None, DATA_AXIS)),
                       out_specs=P(None, DATA_AXIS), check_vma=False)


def _rescale(guided: jax.Array, cond: jax.Array, phi) -> jax.Array:
  """Lin et al. 2023 CFG rescale on ε: match the guided per-sample std to the conditional one."""
  axes = tuple(range(1, guided.ndim))
  std_cond = jnp.std(cond, axis=axes, keepdims=True)
  std_guided = jnp.std(guided, axis=axes, keepdims=True)
  # A constant guided prediction has no std to match; leave it unscaled rather than divide by 0.
  ratio = jnp.where(std_guided > 0, std_cond / jnp.where(std_guided > 0, std_guided, 1.0), 1.0)
  phi = broadcast_to_data(jnp.asarray(phi, guided.dtype), guided)
  return guided * (phi * ratio + (1.0 - phi))


def _classifier_term(eps, log_prob_fn, sde, scale, x, t, y) -> jax.Array:
  """ε − w σ(t) ∇ₓ log p_t(y | x)."""
  return subtract_gradient(eps, classifier_grad(log_prob_fn, x, t, y), sde, scale, t)


def subtract_gradient(eps: jax.Array, grad: jax.Array, sde: VPSDE, scale, t: jax.Array) -> jax.Array:
  """ε − w σ(t) g: a log-probability gradient g turned into an ε correction at scale w."""
  _, sigma = sde.marginal_coeffs(t)
  w = broadcast_to_data(jnp.asarray(scale_at(scale, t), eps.dtype), eps)
  return eps - w * broadcast_to_data(sigma, eps).astype(eps.dtype) * grad.astype(eps.dtype)


def _within(interval: Interval, t: jax.Array,
            guided: Callable[[], tuple[jax.Array, jax.Array]],
            plain: Callable[[], jax.Array]) -> jax.Array:
  """`guided()[0]` where t is inside `interval`, the unguided ε elsewhere (see module docstring).

  `guided()` returns (guided ε, unguided ε) because it computes both anyway; `plain()` computes
  the unguided ε alone, for when no sample is inside.
  """
  if interval is None:
    return guided()[0]
  decided = _DECIDED.get().get(static_interval(interval))
  if decided is not None:      # the sampler knows this whole step is inside (or outside) it
    return guided()[0] if decided else plain()
  lo, hi = interval
  inside = (t >= lo) & (t <= hi)                                            # (B,)

  def on():
    eps, unguided = guided()
    return jnp.where(broadcast_to_data(inside, eps), eps, unguided)
  # Only where the step's times are not known at trace time (a user's own loop, a traced grid)
  # or straddle an end of the interval: lax.cond skips the extra work when no sample is inside.
  return lax.cond(jnp.any(inside), on, plain)


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
