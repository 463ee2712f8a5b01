"""Checkpoints: a thin wrapper over orbax's `CheckpointManager`, and the run's config as JSON beside it.

Orbax writes each step into a temporary folder and renames it when complete (its "finalize"), so
a run killed mid-save leaves no half checkpoint that could be loaded: `latest_step` only sees
finished ones. No pickle anywhere: arrays go through orbax, the config through JSON.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator

import jax
import ml_collections
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"


class Checkpointer:
  """Saves every `save_every` steps (and when forced), keeps the last `keep`, restores the latest."""

  def __init__(self, directory: str, *, save_every: int = 1000, keep: int = 3):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        # Saves on multiples of save_every only (orbax would also save the first step it sees).
        should_save_fn=lambda step, last_saved: step % save_every == 0,
        cleanup_tmp_directories=True,        # removes what a killed save left behind
        enable_async_checkpointing=False)    # a returned save is on disk: simple, preemption-safe
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=ocp.StandardCheckpointHandler())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, tree: Any, *, force: bool = False) -> bool:
    """Saves `tree` at `step` if the interval says so (or `force`); returns whether it saved."""
    saved = self._manager.save(step, args=ocp.args.StandardSave(tree), force=force)
    self._manager.wait_until_finished()
    return saved

  def restore(self, target: Any = None, step: int | None = None) -> Any:
    """Restores into the structure, dtypes and shardings of `target` (arrays or ShapeDtypeStructs);
    without a target, the saved tree onto this process's first device: never onto the saving
    run's devices, which a host with another device count does not have."""
    step = self.latest_step() if step is None else step
    if target is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      saved = self._manager.item_metadata(step)
      abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                              getattr(saved, "tree", saved))
    else:
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path`, renamed onto it when the block succeeds: a reader
  never sees half a file, and a failure leaves the old file (or none) in place."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def atomic_write_text(path: str, text: str) -> None:
  """Writes a text file through a temporary file and a rename, so readers never see half of it."""
  with atomic_path(path) as tmp:
    with open(tmp, "w") as f:
      f.write(text)


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  atomic_write_text(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The config a workdir was trained with, or None if it has none yet."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
