"""Evaluation: held-out figures for each trained model; for guided samples, accuracy under an
evaluator, a Fréchet distance in its penultimate features read against a floor and a ceiling, a
within-class diversity, and sweeps of guidance kinds × scales with one compiled call per kind."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxguide import data, pipeline
from jaxguide.errors import ConfigError
from jaxguide.sde import VPSDE

EVAL_TIMES = (0.05, 0.25, 0.5, 0.75, 1.0)
TOY_POSTERIOR_T = 1e-4   # the toy mixture's exact p(y | x) is read at t ≈ 0, i.e. on clean points
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
  if spec.conditions is None:
    cond, null = y, np.full_like(y, spec.num_classes)
  else:   # vector conditions: each image's first training caption, and ∅
    cond = spec.conditions.first(y)
    null = np.broadcast_to(spec.conditions.null, cond.shape).copy()
  out = {f"test_eps_mse_t{t:g}": mse(x, cond, t) for t in EVAL_TIMES}
  out["test_eps_mse_null_t0.5"] = mse(x, null, 0.5)
  return out


# ------------------------------------------------------------------------------ sample metrics


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


@dataclasses.dataclass(frozen=True)
class Judge:
  """What samples are measured with: `predict` maps images to (classes (N,), features (N, F));
  `test` is the held-out data samples are compared with, `train` gives the floor's real images."""
  predict: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
  test: data.Dataset
  train: data.Dataset

  @functools.cached_property
  def test_features(self) -> np.ndarray:
    return self.predict(self.test.image)[1]


def make_predict(apply_fn: Callable[..., jax.Array], params: Any) -> Callable:
  """An evaluator (nets.LeNet): images -> (argmax classes, penultimate features); the parameters
  are an argument of one jitted function, so every call and chunk shares one compilation."""
  @jax.jit
  def fn(p, x):
    variables = {"params": p}
    return jnp.argmax(apply_fn(variables, x), -1), apply_fn(variables, x, method="features")
  return lambda images: batched(lambda x: fn(params, x), np.asarray(images, np.float32))


def make_toy_predict(sde: VPSDE, mixture: Any) -> Callable:
  """2-D toy data has no evaluator: classes from the exact mixture posterior, and the points
  themselves as features."""
  @jax.jit
  def fn(x):
    t = jnp.full((x.shape[0],), TOY_POSTERIOR_T, jnp.float32)
    return jnp.argmax(mixture.log_prob_y(sde, x, t), -1), x
  return lambda points: batched(fn, np.asarray(points, np.float32))


def run_judge(run: pipeline.Run) -> Judge:
  """The judge of a trained workdir: its evaluator (or the toy posterior) and its data's splits."""
  source, data_dir = run.config.data.source, run.config.data.data_dir or None
  if "evaluator" in run.params:
    predict = make_predict(run.apply_fns["evaluator"], run.params["evaluator"])
  elif source == "toy:gmm":
    predict = make_toy_predict(run.sde, data.toy_mixture())
  else:
    raise ConfigError(f"--evaluate needs a trained evaluator in --workdir={run.workdir}: train it with "
                      f"python train.py --workdir {run.workdir} --config.models=evaluator (same --config)")
  return Judge(predict, data.load(source, "test", data_dir=data_dir),
               data.load(source, "train", data_dir=data_dir))


def _real_of(judge: Judge, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Held-out features and labels of the classes that `labels` requests."""
  keep = np.isin(judge.test.label, np.unique(labels))
  return judge.test_features[keep], judge.test.label[keep]


def score_predictions(judge: Judge, pred: np.ndarray, feats: np.ndarray,
                      labels: np.ndarray) -> dict[str, Any]:
  """Accuracy (overall, per class, worst class), Fréchet distance to the held-out images of the
  requested classes, and within-class diversity, of one set of samples' predictions and features."""
  per_class = {int(c): float(np.mean(pred[labels == c] == c)) for c in np.unique(labels)}
  worst = min(per_class, key=per_class.get)
  real_feats, real_labels = _real_of(judge, labels)
  return {"accuracy": float(np.mean(pred == labels)), "worst_class": worst,
          "worst_class_accuracy": per_class[worst], "per_class": per_class,
          "frechet_distance": frechet_distance(feats, real_feats) if len(feats) > 1 else None,
          "diversity": within_class_diversity(feats, labels, real_feats, real_labels)}


def sample_metrics(judge: Judge, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
  """score_predictions of images judged against their requested labels."""
  pred, feats = judge.predict(images)
  return score_predictions(judge, pred, feats, np.asarray(labels))


def reference_figures(judge: Judge, labels: np.ndarray, seed: int = 0) -> dict[str, Any]:
  """What a sample set with these requested labels is read against, each as big as the set (a
  Fréchet distance falls as N grows): the floor, real train images of the same classes vs the
  held-out ones, and the ceiling, the sampler's starting noise N(0, I) vs the held-out ones."""
  labels = np.asarray(labels)
  real_feats, _ = _real_of(judge, labels)
  out = {"n_samples": int(len(labels)), "n_test": int(len(real_feats)), "floor": None, "ceiling": None}
  if len(labels) < 2:   # a one-sample set has no covariance, and so no distance to read
    return out
  rng = np.random.default_rng(seed)
  picks = [_pick(rng, judge.train.label, c, int(np.sum(labels == c))) for c in np.unique(labels)]
  noise = rng.standard_normal((len(labels),) + judge.test.shape).astype(np.float32)
  out["floor"] = frechet_distance(judge.predict(judge.train.image[np.concatenate(picks)])[1], real_feats)
  out["ceiling"] = frechet_distance(judge.predict(noise)[1], real_feats)
  return out


def _pick(rng: np.random.Generator, labels: np.ndarray, c: int, k: int) -> np.ndarray:
  pool = np.flatnonzero(labels == c)
  if not len(pool):
    raise ConfigError(f"--labels: class {c} has no train images in this data: drop it from --labels")
  # Repeats only when a class has fewer train images than samples (the floor then rises a little).
  return rng.choice(pool, k, replace=k > len(pool))


# ------------------------------------------------------------------------------------- sweeps


@dataclasses.dataclass(frozen=True)
class Samples:
  """One guidance kind's samples for every scale: one block per scale, in the order given, each
  block the requested labels repeated num_per_class times (label-major)."""
  kind: str
  scale_list: tuple[float, ...]
  images: np.ndarray                 # (N, ...)
  labels: np.ndarray                 # (N,) requested labels
  scales: np.ndarray                 # (N,) float32, the scale each sample was drawn at
  trajectory: Optional[np.ndarray]   # (T, N, ...) with return_trajectory
  compile_s: float
  sample_s: float

  def blocks(self) -> list[tuple[float, slice]]:
    m = len(self.images) // len(self.scale_list)
    return [(s, slice(i * m, (i + 1) * m)) for i, s in enumerate(self.scale_list)]


def sweep_layout(labels: Sequence[int], num_per_class: int,
                 scales: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """Per-sample (labels, scales) for Samples' block layout."""
  block = np.repeat(np.asarray(labels, np.int32), num_per_class)
  return (np.tile(block, len(scales)),
          np.repeat(np.asarray(scales, np.float32), len(block)))


def draw(run: pipeline.Run, key: jax.Array, scales_by_kind: Mapping[str, Sequence[float]],
         labels: Sequence[int], num_per_class: int, conditions: Optional[np.ndarray] = None,
         **generate_kwargs) -> list[Samples]:
  """Samples every guidance kind × scale. Each kind is ONE pipeline.generate call with the scales as
  a per-sample array, so it compiles once per (kind, sampler) whatever the scales; every kind uses
  the same key. With `conditions` (P, D) (a text run's prompt encodings), `labels` are indices
  into it: the samples are conditioned on those rows, and Samples.labels holds the indices.
  generate_kwargs: sampler, steps, clf_scale, batch_size, return_trajectory, ..."""
  out = []
  for kind, scale_list in scales_by_kind.items():
    y, s = sweep_layout(labels, num_per_class, scale_list)
    cond = y if conditions is None else np.asarray(conditions)[y]
    timings: dict[str, float] = {}
    result = pipeline.generate(run, key, cond, s, kind=kind, timings=timings, **generate_kwargs)
    x0, traj = result if generate_kwargs.get("return_trajectory") else (result, None)
    out.append(Samples(kind, tuple(float(v) for v in scale_list), x0, y, s, traj,
                       timings["compile_s"], timings["sample_s"]))
  return out


def measure(judge: Judge, samples: Sequence[Samples], seed: int = 0,
            predicted: Optional[Sequence[tuple[np.ndarray, np.ndarray]]] = None) -> tuple[list[dict], dict]:
  """One row per (kind, scale) of score_predictions, and the reference_figures of a block (every
  block requests the same labels, so one floor and one ceiling serve them all). `predicted`:
  judge.predict of each group's images, when the caller has them already."""
  rows = []
  for g, group in enumerate(samples):
    # every scale of a kind in one pass
    pred, feats = predicted[g] if predicted is not None else judge.predict(group.images)
    for scale, block in group.blocks():
      rows.append({"guidance": group.kind, "scale": scale,
                   **score_predictions(judge, pred[block], feats[block], group.labels[block])})
  first = samples[0].blocks()[0][1]
  return rows, reference_figures(judge, samples[0].labels[first], seed)


def sweep(run: pipeline.Run, key: jax.Array, scales_by_kind: Mapping[str, Sequence[float]],
          labels: Sequence[int], num_per_class: int, *, judge: Optional[Judge] = None,
          **generate_kwargs) -> tuple[list[Samples], list[dict], dict]:
  """draw then measure: many scales × guidance kinds, one compiled sampling call per kind. Returns
  (samples, rows, reference); `judge` defaults to the workdir's (run_judge)."""
  samples = draw(run, key, scales_by_kind, labels, num_per_class, **generate_kwargs)
  rows, reference = measure(judge or run_judge(run), samples)
  return samples, rows, reference
