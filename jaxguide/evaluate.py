"""Evaluation: held-out figures for each trained model, and accuracy of images under an evaluator."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxguide.sde import VPSDE

EVAL_TIMES = (0.05, 0.25, 0.5, 0.75, 1.0)


def batched(fn: Callable[..., jax.Array], *arrays: np.ndarray, batch_size: int = 500) -> np.ndarray:
  """Applies a jitted fn over the leading axis in fixed-size chunks (the last one padded, so a
  single compilation serves every chunk) and concatenates the results on the host."""
  n = arrays[0].shape[0]
  outs = []
  for i in range(0, n, batch_size):
    chunk = [a[i:i + batch_size] for a in arrays]
    m = chunk[0].shape[0]
    if m < batch_size:
      chunk = [np.concatenate([c, np.repeat(c[-1:], batch_size - m, axis=0)]) for c in chunk]
    outs.append(np.asarray(fn(*chunk))[:m])
  return np.concatenate(outs)


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


def make_noisy_accuracy(apply_fn, params, sde: VPSDE) -> Callable[..., float]:
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


def make_eps_mse(apply_fn, params, sde: VPSDE) -> Callable[..., float]:
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
  sde = VPSDE(beta_min=config.sde.beta_min, beta_max=config.sde.beta_max)
  apply_fn = spec.model.apply
  if name == "evaluator":
    return {"test_accuracy": accuracy(apply_fn, params, x, y)}
  if name == "classifier":
    acc = make_noisy_accuracy(apply_fn, params, sde)
    return {f"test_accuracy_t{t:g}": acc(x, y, t) for t in EVAL_TIMES}
  mse = make_eps_mse(apply_fn, params, sde)
  out = {f"test_eps_mse_t{t:g}": mse(x, y, t) for t in EVAL_TIMES}
  out["test_eps_mse_null_t0.5"] = mse(x, np.full_like(y, spec.num_classes), 0.5)
  return out
