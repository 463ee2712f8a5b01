"""Evaluation: metrics of models and samples (`metrics`), judging guided samples and sweeping
guidance kinds × scales (`judge`), the noisy classifier's diagnostics (`diagnostics`), figures
(`plotting`). Training never imports this package; train.py passes `metrics.evaluate_model` in."""
import importlib

_EXPORTS = {
    **{n: "metrics" for n in ("EVAL_TIMES", "batched", "classify", "accuracy", "make_noisy_accuracy",
                              "make_eps_mse", "evaluate_model", "frechet_distance",
                              "mean_pairwise_distance", "within_class_diversity")},
    **{n: "judge" for n in ("Judge", "make_predict", "make_toy_predict", "run_judge",
                            "score_predictions", "sample_metrics", "reference_figures", "Samples",
                            "sweep_layout", "draw", "measure", "sweep")},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):   # PEP 562: `judge` imports the pipeline only when it is used
  if name not in _EXPORTS:
    raise AttributeError(f"module 'jaxguide.evaluation' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"jaxguide.evaluation.{_EXPORTS[name]}"), name)
  globals()[name] = value
  return value
