"""Data parallelism: one `Mesh` with a `data` axis over every device, batches split along it.

One device is the special case of this path, not another code path. Multi-host runs call
`jax.distributed.initialize()` first (see README); every process then feeds its local slice, runs
the same program over the global mesh, and process 0 alone writes (`is_primary`).
"""
from __future__ import annotations

import collections
import functools
import itertools
from typing import Any, Iterable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxguide.errors import ConfigError

DATA_AXIS = "data"


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh named `data` over the given devices, or (default) `jax.make_mesh` over every
  device of every process, in the order make_mesh chooses for the hardware."""
  if devices is None or list(devices) == jax.devices():
    auto = (jax.sharding.AxisType.Auto,)   # shardings given by hand, as on an explicit Mesh
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=auto)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def is_primary() -> bool:
  """Process 0: with several processes the one that writes metrics, reports, JSON, samples and
  figures and shows progress (checkpoints are written by all of them together)."""
  return jax.process_index() == 0


def batch_mesh(batch_size: int) -> Mesh | None:
  """The data mesh over every device of every process when they divide `batch_size` (a batch the
  samplers split over them), else None. With several processes, every process must then run the
  computation (one SPMD program), as sample.py and train.py's grids do."""
  mesh = data_mesh(jax.devices())
  return mesh if batch_size % mesh.devices.size == 0 else None


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_divisible(batch_size: int, mesh: Mesh, field: str = "train.batch_size") -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ConfigError(
        f"{field}={batch_size} is not divisible by the {n} devices: use a multiple of {n}")


@functools.lru_cache(maxsize=8)
def _placer(mesh: Mesh):
  """An identity under jit whose input and output are split over `data`: it takes numpy arrays
  through jit's C++ dispatch, in less host time per batch than `jax.device_put`'s Python path
  (docs/benchmarks.md, "Host work per training step")."""
  sharding = batch_sharding(mesh)
  return jax.jit(lambda tree: tree, in_shardings=sharding, out_shardings=sharding)


def shard_batch(tree: Any, mesh: Mesh) -> Any:
  """Places every array of this process's batch with its leading axis split over the mesh, in one
  placement call for the whole tree.

  `make_array_from_process_local_data` is the multi-host form: each process passes its own slice.
  """
  if jax.process_count() == 1:
    return _placer(mesh)(tree)
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def prefetch_to_device(batches: Iterable[Any], mesh: Mesh, size: int = 2) -> Iterator[Any]:
  """Yields `shard_batch` of each host batch, placed `size` batches before it is used (the Flax
  examples' prefetch_to_device, on a mesh): placing only enqueues the copy, so a batch moves to
  the device while the steps before it run. No thread: a thread's hand-offs cost more host time
  than the microseconds of gathering a batch from memory."""
  queue: collections.deque = collections.deque()
  batches = iter(batches)

  def enqueue(n: int) -> None:
    for batch in itertools.islice(batches, n):
      queue.append(shard_batch(batch, mesh))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree (parameters, optimizer state; host or device arrays) fully replicated on the
  mesh.

  With several processes each process copies its own value onto its own devices. `device_put`
  would first check that every process holds the same value, by an all-gather of the whole tree
  (jax's `multihost_utils.assert_equal`, one compiled gather per leaf): here every process holds
  the same value by construction (the same seed, or the same checkpoint, which each process reads
  whole: the state is replicated, so there is no shard of it to read alone)."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  devices = list(sharding.addressable_devices)

  def place(x):
    return jax.make_array_from_single_device_arrays(
        np.shape(x), sharding, [jax.device_put(x, d) for d in devices])
  return jax.tree.map(place, tree)


def agree(flag: bool) -> bool:
  """Process 0's `flag`, on every process (a broadcast; with one process, `flag` itself)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def to_host(x: jax.Array) -> np.ndarray:
  """All of an array as numpy on this process. One split over several processes' devices is
  all-gathered first: every process must call this for it (a collective)."""
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  return multihost_utils.process_allgather(x, tiled=True)
