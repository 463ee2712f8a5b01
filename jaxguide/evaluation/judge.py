"""Judging guided samples: the workdir's judge (its evaluator, or the toy mixture's exact
posterior), the sweep of guidance kinds × scales (one compiled call per kind), and the report
rows with their Fréchet floor and ceiling.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxguide import data, pipeline
from jaxguide.diffusion.sde import Process
from jaxguide.errors import ConfigError
from jaxguide.evaluation.metrics import (
  batched,
  frechet_distance,
  within_class_diversity,
)

TOY_POSTERIOR_T = 1e-4   # the toy mixture's exact p(y | x) is read at t ≈ 0, i.e. on clean points


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


def make_toy_predict(sde: Process, mixture: Any) -> Callable:
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
