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


def noisy_accuracy(apply_fn, params, sde: VPSDE, images: np.ndarray, labels: np.ndarray,
                   t: float, seed: int = 0) -> float:
  """Accuracy of a noise-conditional classifier on test images noised to time t (fixed noise)."""
  def fn(x, key):
    tt = jnp.full((x.shape[0],), t, jnp.float32)
    x_t, _ = sde.perturb(key[0], x, tt)
    return jnp.argmax(apply_fn({"params": params}, x_t, tt), -1)
  keys = np.asarray(jax.random.split(jax.random.PRNGKey(seed), -(-len(images) // 500)))
  keys = np.repeat(keys, 500, axis=0)[:len(images)]
  return float(np.mean(batched(jax.jit(fn), images, keys) == labels))


def eps_mse(apply_fn, params, sde: VPSDE, images: np.ndarray, labels: np.ndarray, t: float,
            null_label: int | None = None, seed: int = 0) -> float:
  """Held-out ε-prediction error at time t, conditional (or with the null label if given)."""
  def fn(x, y, key):
    tt = jnp.full((x.shape[0],), t, jnp.float32)
    x_t, eps = sde.perturb(key[0], x, tt)
    y = y if null_label is None else jnp.full_like(y, null_label)
    return jnp.mean((apply_fn({"params": params}, x_t, tt, y) - eps) ** 2,
                    axis=tuple(range(1, x.ndim)))
  keys = np.asarray(jax.random.split(jax.random.PRNGKey(seed), -(-len(images) // 500)))
  keys = np.repeat(keys, 500, axis=0)[:len(images)]
  return float(np.mean(batched(jax.jit(fn), images, labels, keys)))


def evaluate_model(name: str, spec: Any, config: ml_collections.ConfigDict, params: Any,
                   test_ds: Any, max_examples: int = 1000) -> dict[str, float]:
  """Held-out figures for one trained model, with its EMA parameters."""
  x, y = test_ds.image[:max_examples], test_ds.label[:max_examples]
  sde = VPSDE(beta_min=config.sde.beta_min, beta_max=config.sde.beta_max)
  apply_fn = spec.model.apply
  if name == "evaluator":
    return {"test_accuracy": accuracy(apply_fn, params, x, y)}
  if name == "classifier":
    return {f"test_accuracy_t{t:g}": noisy_accuracy(apply_fn, params, sde, x, y, t) for t in EVAL_TIMES}
  out = {f"test_eps_mse_t{t:g}": eps_mse(apply_fn, params, sde, x, y, t) for t in EVAL_TIMES}
  out["test_eps_mse_null_t0.5"] = eps_mse(apply_fn, params, sde, x, y, 0.5, null_label=spec.num_classes)
  return out
