"""The numbers behind the reference tutorial's diagnostic figures, as arrays (no plotting here).

  noisy_classifier   one clean example noised at T times t ∈ [t_eps, 1] with one shared ε: the
                     noisy classifier's p_t(y | x_t) (T, K) and ∇ₓ log p_t(y | x_t) (T, ...), the
                     gradient from guidance.classifier_grad, i.e. exactly what guidance adds.
  posterior_maps     for 2-D data: a classifier's p_t(y | x) on a grid beside the exact posterior
                     of a Gaussian mixture, at a few t.
  guided_sweep       guided samples at several scales in one compiled sampling call.
  density_grid       the exact clean density on a grid, for contours under 2-D samples.

plotting.py draws these; research code can use them directly.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxguide import guidance, pipeline
from jaxguide.diffusion.gmm import GaussianMixture
from jaxguide.diffusion.score import LogProbFn
from jaxguide.diffusion.score import log_prob_fn as bind_log_prob
from jaxguide.diffusion.sde import Process, broadcast_to_data

# The toy posterior maps' times: sharp classes, blurring, nearly merged, almost prior.
POSTERIOR_TIMES = (0.05, 0.25, 0.5, 0.75)


class NoisyDiagnostics(NamedTuple):
  times: np.ndarray    # (T,)
  noised: np.ndarray   # (T, ...) x_t = α(t) x₀ + σ(t) ε, one ε for every t
  probs: np.ndarray    # (T, K) p_t(y | x_t)
  grads: np.ndarray    # (T, ...) ∇ₓ log p_t(label | x_t)
  label: int


class PosteriorMaps(NamedTuple):
  times: np.ndarray    # (T,)
  axis: np.ndarray     # (R,) grid coordinates, the same on both axes
  learned: np.ndarray  # (T, R, R, K) the classifier's p_t(y | x); [t, i, j] is x = (axis[j], axis[i])
  exact: np.ndarray    # (T, R, R, K) the mixture's exact p_t(y | x)


def times_grid(num: int = 16, t_eps: float = 1e-3) -> np.ndarray:
  """num times evenly spaced in [t_eps, 1]; t = 0 itself is excluded, as in training."""
  return np.linspace(t_eps, 1.0, num, dtype=np.float32)


def run_log_prob(run: pipeline.Run) -> LogProbFn:
  """The workdir's noisy classifier, bound exactly as guided_eps_fn binds it."""
  run.require("classifier", "this figure")
  return bind_log_prob(run.apply_fns["classifier"], run.params["classifier"])


@jax.jit
def noise_example(sde: Process, key: jax.Array, x0: jax.Array, times: jax.Array) -> jax.Array:
  """(T, ...) x_t of one clean example x0 (...) at each time. One ε serves every t (unlike
  sde.perturb's independent draws), so that a row of figures shows one image sinking into noise."""
  eps = jax.random.normal(key, jnp.shape(x0), jnp.float32)
  alpha, sigma = sde.marginal_coeffs(times)
  x = jnp.broadcast_to(x0, (len(times),) + jnp.shape(x0))
  return broadcast_to_data(alpha, x) * x + broadcast_to_data(sigma, x) * eps[None]


def noisy_classifier(log_prob_fn: LogProbFn, sde: Process, key: jax.Array, x0: np.ndarray, label: int,
                     times: Sequence[float]) -> NoisyDiagnostics:
  """p_t(y | x_t) and ∇ₓ log p_t(label | x_t) for one example noised at every time."""
  times = np.asarray(times, np.float32)

  @jax.jit
  def compute(key, x0, t):
    x_t = noise_example(sde, key, x0, t)
    probs = jnp.exp(log_prob_fn(x_t, t))
    grads = guidance.classifier_grad(log_prob_fn, x_t, t, jnp.full(t.shape, label, jnp.int32))
    return x_t, probs, grads
  x_t, probs, grads = compute(key, jnp.asarray(x0, jnp.float32), times)
  return NoisyDiagnostics(times, np.asarray(x_t), np.asarray(probs), np.asarray(grads), int(label))


def grid_points(extent: float, resolution: int) -> tuple[np.ndarray, np.ndarray]:
  """(axis (R,), points (R·R, 2)) covering [-extent, extent]²; point i·R + j is (axis[j], axis[i])."""
  axis = np.linspace(-extent, extent, resolution, dtype=np.float32)
  return axis, _mesh(axis)


def _mesh(axis: np.ndarray) -> np.ndarray:
  xx, yy = np.meshgrid(axis, axis)
  return np.stack([xx.ravel(), yy.ravel()], axis=-1)


@jax.jit
def _exact_log_prob(mixture: GaussianMixture, sde: Process, points: jax.Array, t: jax.Array) -> jax.Array:
  """The mixture's exact log p_t(y | x) (N, K) at one t, compiled once (op by op it costs seconds)."""
  return mixture.log_prob_y(sde, points, jnp.full(points.shape[:1], t, jnp.float32))


@jax.jit
def _log_density(mixture: GaussianMixture, sde: Process, points: jax.Array, t: jax.Array) -> jax.Array:
  """log p_t(x) (N,) at one t, compiled once."""
  return mixture.log_density(sde, points, jnp.full(points.shape[:1], t, jnp.float32))


def posterior_maps(log_prob_fn: LogProbFn, mixture: GaussianMixture, sde: Process,
                   times: Sequence[float] = POSTERIOR_TIMES, *, extent: float = 3.0,
                   resolution: int = 81) -> PosteriorMaps:
  """A 2-D classifier's p_t(y | x) and the exact posterior on a grid, at each time."""
  times = np.asarray(times, np.float32)
  axis, points = grid_points(extent, resolution)
  learned_fn = jax.jit(lambda t: jnp.exp(log_prob_fn(points, jnp.full((len(points),), t, jnp.float32))))
  learned = [learned_fn(t) for t in times]
  exact = [jnp.exp(_exact_log_prob(mixture, sde, points, t)) for t in times]
  shape = (len(times), resolution, resolution, mixture.num_classes)
  return PosteriorMaps(times, axis, np.reshape(learned, shape), np.reshape(exact, shape))


def density_grid(mixture: GaussianMixture, sde: Process, *, extent: float = 3.0, resolution: int = 121,
                 t: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(X, Y, p_t(x)) on a grid, for matplotlib's contour; t = 0 is the clean data density."""
  axis, points = grid_points(extent, resolution)
  log_p = _log_density(mixture, sde, points, t)
  xx, yy = np.meshgrid(axis, axis)
  return xx, yy, np.exp(np.asarray(log_p)).reshape(xx.shape)


def expected_total_variation(maps: PosteriorMaps, mixture: GaussianMixture, sde: Process) -> np.ndarray:
  """(T,) E_{x ~ p_t}[½ Σ_y |learned − exact|]: the grid weighted by the exact p_t(x), so that
  regions without data, where a classifier is never trained, do not count."""
  points = jnp.asarray(_mesh(maps.axis))
  out = []
  for i, t in enumerate(maps.times):
    weights = np.asarray(jax.nn.softmax(_log_density(mixture, sde, points, t)))
    tv = 0.5 * np.abs(maps.learned[i] - maps.exact[i]).sum(-1).ravel()
    out.append(float(np.sum(weights * tv)))
  return np.asarray(out)


def guided_sweep(run: pipeline.Run, key: jax.Array, kind: str, scales: Sequence[float],
                 num_per_class: int, *, sampler: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Samples of every class at every scale, all in one compiled call (scales are traced).

  Returns x0 (S, K·n, ...) and its labels (K·n,), the same for every scale.
  """
  labels = np.repeat(np.arange(run.num_classes, dtype=np.int32), num_per_class)
  scales = np.asarray(scales, np.float32)
  x0 = pipeline.generate(run, key, np.tile(labels, len(scales)), np.repeat(scales, len(labels)),
                         kind=kind, sampler=sampler, steps=steps, batch_size=len(labels) * len(scales))
  return x0.reshape((len(scales), len(labels)) + run.shape), labels


def exact_accuracy(mixture: GaussianMixture, sde: Process, points: np.ndarray, labels: np.ndarray) -> float:
  """How often the exact clean posterior's most likely class is the requested label."""
  # t ≈ 0: the clean-data posterior.
  pred = np.argmax(np.asarray(_exact_log_prob(mixture, sde, jnp.asarray(points), 1e-4)), axis=-1)
  return float(np.mean(pred == np.asarray(labels)))
