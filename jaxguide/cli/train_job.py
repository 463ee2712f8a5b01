"""train.py's job, composed from the stages: train every model of a config (`training.run`),
evaluating each on held-out data (`evaluation.metrics.evaluate_model`), then the final grids
(`sample_output.final_grids`, called by train.py after this returns)."""
from __future__ import annotations

from typing import Any, Optional

import ml_collections

from jaxguide import training
from jaxguide.evaluation import metrics
from jaxguide.training import run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
                       stop: Optional[training.StopSignal] = None) -> dict[str, Any]:
  """Trains every model in `config.models` (resuming from `workdir`), evaluates each, writes
  train_report.json; returns the report. `stop`: as `training.run.train`'s."""
  return run.train(config, workdir, progress=progress, evaluate=metrics.evaluate_model, stop=stop)
