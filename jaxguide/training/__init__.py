"""Training: the train state and step (`state`), one model's loop (`loop`), a whole config
checked then trained (`run`), what each model is built from (`specs`), orbax checkpoints
(`checkpoint`) and the workdir format (`workdir`). Imports nothing of sampling or evaluation."""
import importlib

_EXPORTS = {
    **{n: "state" for n in ("TrainState", "make_optimizer", "create_train_state", "make_train_step")},
    **{n: "loop" for n in ("MetricsWriter", "Preempted", "Diverged", "StopSignal", "train_model")},
    **{n: "run" for n in ("Plan", "prepare", "read_resumable", "train")},
    **{n: "specs" for n in ("ModelSpec", "model_spec", "devices", "data_seed")},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):   # PEP 562: submodules load on first use (no import cycles)
  if name not in _EXPORTS:
    raise AttributeError(f"module 'jaxguide.training' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"jaxguide.training.{_EXPORTS[name]}"), name)
  globals()[name] = value
  return value
