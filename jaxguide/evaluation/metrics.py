"""Metrics: held-out figures of each trained model (accuracy at noise levels, ε-error),
and for samples, accuracy under a classifier, the Fréchet distance of features and within-class
diversity. Pure functions of arrays and networks: nothing here samples.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxguide.diffusion.sde import Process, sde_from

EVAL_TIMES = (0.05, 0.25, 0.5, 0.75, 1.0)


MAX_PAIRWISE = 2000      # points per class in pairwise distances: the Gram matrix is n² floats


def batched(fn: Callable[..., Any], *arrays: np.ndarray, batch_size: int = 500) -> Any:
  """Applies a jitted fn over the leading axis in fixed-size chunks (the last one padded, so a
  single compilation serves every chunk) and concatenates the results (an array or a tuple of
  arrays) on the host."""
  n = arrays[0].shape[0]
  outs = []
  for i in range(0, n, batch_size):
    chunk = [a[i:i + batch_size] for a in arrays]
    m = chunk[0].shape[0]
    if m < batch_size:
      chunk = [np.concatenate([c, np.repeat(c[-1:], batch_size - m, axis=0)]) for c in chunk]
    outs.append(jax.tree.map(lambda o, m=m: np.asarray(o)[:m], fn(*chunk)))
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)


def classify(apply_fn: Callable[..., jax.Array], params: Any, images: np.ndarray) -> np.ndarray:
  """Predicted labels of clean images under an evaluator (B,)."""
  fn = jax.jit(lambda x: jnp.argmax(apply_fn({"params": params}, x), -1))
  return batched(fn, images)


def accuracy(apply_fn: Callable[..., jax.Array], params: Any, images: np.ndarray,
             labels: np.ndarray) -> float:
  return float(np.mean(classify(apply_fn, params, images) == labels))


def _chunk_keys(n: int, seed: int, batch_size: int = 500) -> np.ndarray:
  """One key per example, equal within each chunk of `batched`: fixed noise for every call."""
  keys = np.asarray(jax.random.split(jax.random.PRNGKey(seed), -(-n // batch_size)))
  return np.repeat(keys, batch_size, axis=0)[:n]


def make_noisy_accuracy(apply_fn, params, sde: Process) -> Callable[..., float]:
  """(images, labels, t) -> accuracy of a noise-conditional classifier on images noised to time t.
  One compilation serves every t: t is traced."""
  @jax.jit
  def predict(x, key, t):
    tt = jnp.full((x.shape[0],), t, jnp.float32)
    x_t, _ = sde.perturb(key[0], x, tt)
    return jnp.argmax(apply_fn({"params": params}, x_t, tt), -1)

  def fn(images, labels, t, seed=0):
    pred = batched(lambda x, k: predict(x, k, t), images, _chunk_keys(len(images), seed))
    return float(np.mean(pred == labels))
  return fn


def make_eps_mse(apply_fn, params, sde: Process) -> Callable[..., float]:
  """(images, labels, t) -> held-out ε-prediction error at time t; pass the null label as labels
  for the unconditional error. One compilation serves every t."""
  @jax.jit
  def err(x, y, key, t):
    tt = jnp.full((x.shape[0],), t, jnp.float32)
    x_t, eps = sde.perturb(key[0], x, tt)
    return jnp.mean((apply_fn({"params": params}, x_t, tt, y) - eps) ** 2, axis=tuple(range(1, x.ndim)))

  def fn(images, labels, t, seed=0):
    return float(np.mean(batched(lambda x, y, k: err(x, y, k, t), images, labels,
                                 _chunk_keys(len(images), seed))))
  return fn


def evaluate_model(name: str, spec: Any, config: ml_collections.ConfigDict, params: Any,
                   test_ds: Any, max_examples: int = 1000) -> dict[str, float]:
  """Held-out figures for one trained model, with its EMA parameters."""
  x, y = test_ds.image[:max_examples], test_ds.label[:max_examples]
  sde = sde_from(config)
  apply_fn = spec.model.apply
  if name == "evaluator":
    return {"test_accuracy": accuracy(apply_fn, params, x, y)}
  if name == "classifier":
    acc = make_noisy_accuracy(apply_fn, params, sde)
    return {f"test_accuracy_t{t:g}": acc(x, y, t) for t in EVAL_TIMES}
  mse = make_eps_mse(apply_fn, params, sde)
  if spec.conditions is None:
    cond, null = y, np.full_like(y, spec.num_classes)
  else:   # vector conditions: each image's first training caption, and ∅
    cond = spec.conditions.first(y)
    null = np.broadcast_to(spec.conditions.null, cond.shape).copy()
  out = {f"test_eps_mse_t{t:g}": mse(x, cond, t) for t in EVAL_TIMES}
  out["test_eps_mse_null_t0.5"] = mse(x, null, 0.5)
  return out


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
  """Fréchet distance between Gaussians fitted to two feature sets (N, F), in float64:
  |μa − μb|² + tr Ca + tr Cb − 2 tr (Ca Cb)^½. Ca Cb is similar to the symmetric Ca^½ Cb Ca^½, so
  the last trace needs only symmetric eigendecompositions (no scipy). Biased upwards for small N:
  compare distances of equal-sized sets."""
  a, b = (np.asarray(f, np.float64).reshape(len(f), -1) for f in (feats_a, feats_b))
  if min(len(a), len(b)) < 2:
    raise ValueError(f"frechet_distance needs two or more points per set, got {len(a)} and {len(b)}")
  cov_a, cov_b = (np.atleast_2d(np.cov(f, rowvar=False)) for f in (a, b))
  root_a = _psd_sqrt(cov_a)
  inner = root_a @ cov_b @ root_a
  # Rounding can leave tiny negative eigenvalues of these PSD matrices: they are zeros.
  tr_cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)))
  fd = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_cross
  return float(max(fd, 0.0))


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((cov + cov.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def mean_pairwise_distance(feats: np.ndarray) -> float:
  """Mean Euclidean distance over the pairs i ≠ j of a set (N ≥ 2, F), in float64."""
  f = np.asarray(feats, np.float64).reshape(len(feats), -1)
  f = f - f.mean(0)   # centred, the Gram form loses less to cancellation
  sq = np.sum(f * f, axis=1)
  d2 = np.clip(sq[:, None] + sq[None, :] - 2.0 * (f @ f.T), 0.0, None)
  np.fill_diagonal(d2, 0.0)
  n = len(f)
  return float(np.sum(np.sqrt(d2)) / (n * (n - 1)))


def within_class_diversity(feats: np.ndarray, labels: np.ndarray, real_feats: np.ndarray,
                           real_labels: np.ndarray) -> Optional[float]:
  """Mean over the classes in `labels` of (mean pairwise feature distance of the samples of that
  class) / (the same for the real images of that class): 1 = as diverse as real data, 0 = one
  image repeated. None when no class has two of each. Sets are cut to MAX_PAIRWISE points: the
  mean over pairs of a subset estimates the same figure without bias."""
  ratios = []
  for c in np.unique(labels):
    own, real = feats[labels == c][:MAX_PAIRWISE], real_feats[real_labels == c][:MAX_PAIRWISE]
    if len(own) >= 2 and len(real) >= 2:
      ratios.append(mean_pairwise_distance(own) / mean_pairwise_distance(real))
  return float(np.mean(ratios)) if ratios else None
