"""Batches that are a pure function of (seed, step).

Batch `step` holds positions [step·B, step·B + B) of the endless concatenation of per-epoch
permutations, so a run resumed at step k sees exactly the batches a straight run sees, with no
iterator state to save. In-memory splits gather by indexing; a `tfds:` training split is read
lazily: Grain reads the records of each step's batch, this process's rows only, in worker
threads a few batches ahead.
"""
from __future__ import annotations

import functools

import numpy as np

from jaxguide.data import tfds
from jaxguide.data.dataset import Dataset, to_unit_range
from jaxguide.errors import ConfigError


@functools.lru_cache(maxsize=16)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  perm.flags.writeable = False  # shared through the cache
  return perm


def _check_batch_args(step: int, batch_size: int, seed: int) -> None:
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ConfigError(f"train.batch_size={batch_size!r} must be a positive integer")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ConfigError(f"seed={seed!r} must be a non-negative integer (e.g. --config.seed=0)")
  if not isinstance(step, (int, np.integer)) or step < 0:
    raise ConfigError(f"step={step!r} must be a non-negative integer")


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
  """Dataset indices of batch `step`; epoch e is ordered by default_rng([seed, e]).permutation(n).

  Positions [step·B, step·B + B) of the concatenated epochs: a batch that crosses an epoch
  boundary takes the tail of one permutation and the head of the next, and B > n spans several.
  """
  _check_batch_args(step, batch_size, seed)
  start = int(step) * int(batch_size)
  first, last = start // n, (start + batch_size - 1) // n
  offset = start - first * n
  if first == last:
    return _epoch_permutation(int(seed), first, n)[offset:offset + batch_size]
  order = np.concatenate([_epoch_permutation(int(seed), e, n) for e in range(first, last + 1)])
  return order[offset:offset + batch_size]


def batch_at(ds: Dataset, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
  """Batch `step` of an endless shuffled stream, images float32 in [-1, 1]: a pure function of
  (seed, step). Training moves `host_batch_at`'s uint8 instead and converts on the device."""
  batch = host_batch_at(ds, step, batch_size, seed)
  return {**batch, "image": to_unit_range(batch["image"])}


def process_rows(idx: np.ndarray, process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """Process `process_index`'s contiguous share of a global batch's indices: each process reads
  only the examples it feeds."""
  if process_count == 1:
    return idx
  if len(idx) % process_count:
    raise ConfigError(f"train.batch_size={len(idx)} is not divisible by the {process_count} "
                      f"processes: use a multiple of {process_count}")
  n = len(idx) // process_count
  return idx[process_index * n:(process_index + 1) * n]


def host_batch_at(ds: Dataset, step: int, batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> dict[str, np.ndarray]:
  """This process's rows of batch `step` as the host keeps them (uint8 images, or float points)."""
  idx = process_rows(batch_indices(len(ds), step, batch_size, seed), process_index, process_count)
  return {"image": ds.raw[idx], "label": ds.label[idx]}


class Batches:
  """Host batches of steps start_step, start_step + 1, … (up to `stop_step`, exclusive, or
  endless): this process's rows of batch_at's batches, uint8 images as `host_batch_at` gives.

  An in-memory Dataset is gathered in the caller's thread when `next()` asks (microseconds: no
  thread to start or join). tfds.Records (a lazy `tfds:` split) are read through Grain: each step's
  records by READ_THREADS worker threads, READ_AHEAD batches ahead, in step order; a batch is
  still a pure function of (seed, step), so a resumed run needs no iterator state. `close()`
  stops the workers (also on exhaustion).
  """

  def __init__(self, ds: Dataset | tfds.Records, batch_size: int, seed: int, start_step: int = 0, *,
               stop_step: int | None = None, process_index: int = 0, process_count: int = 1):
    _check_batch_args(start_step, batch_size, seed)
    if isinstance(ds, tfds.Records) and stop_step is None:
      raise ValueError("Batches over tfds.Records needs a stop_step (Grain reads a finite range)")
    self._ds, self._batch_size, self._seed = ds, batch_size, seed
    self._shard = (process_index, process_count)
    self._step, self._stop = start_step, stop_step
    self._reader = None
    if isinstance(ds, tfds.Records) and stop_step > start_step:
      self._reader = tfds._grain_read(ds, stop_step - start_step,
                                 lambda e: self._indices(start_step + e))

  @property
  def step(self) -> int:
    """The step of the batch that the next `next()` returns."""
    return self._step

  def _indices(self, step: int) -> np.ndarray:
    return process_rows(batch_indices(len(self._ds), step, self._batch_size, self._seed),
                        *self._shard)

  def __iter__(self) -> Batches:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._stop is not None and self._step >= self._stop:
      self.close()
      raise StopIteration
    if isinstance(self._ds, tfds.Records):
      if self._reader is None:
        raise StopIteration   # closed
      batch = next(self._reader)
    else:
      batch = host_batch_at(self._ds, self._step, self._batch_size, self._seed, *self._shard)
    self._step += 1
    return batch

  def close(self) -> None:
    reader, self._reader = self._reader, None
    if reader is not None and hasattr(reader, "close"):
      reader.close()
