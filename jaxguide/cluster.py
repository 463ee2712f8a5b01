"""What a multi-host job must get right before its first collective: how it was launched, and
that every process agrees (on its checks, on the checkpoint step it restores, on its contents).

`check_launch` reads the scheduler's environment before `jax.distributed.initialize`: a task of
a multi-task job started without `--distributed` (each would be process 0 of its own world, all
writing one workdir) and a SLURM node whose GPUs outnumber its tasks (jax pins each task to the
GPU of its local rank, so the others idle) are refused with one line.

`agree` runs a per-host step on every process and shares its outcome: when any process refuses,
all raise the same one-line ConfigError naming that process, instead of some waiting in the next
collective. `agreed_latest` is process 0's choice of checkpoint step, and `agreed_read` compares
a per-leaf CRC32 of what each process restored (`check_same_tree`).
"""
from __future__ import annotations

import re
import zlib
from typing import Any, Callable, Mapping, TypeVar

import numpy as np

from jaxguide.errors import ConfigError

T = TypeVar("T")
MESSAGE_BYTES = 480   # a refusal's line as shared between processes

# The variables by which schedulers tell a task how many tasks its job step has.
WORLD_SIZE_VARS = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def world_size_from_env(environ: Mapping[str, str]) -> tuple[str, int] | None:
  """(variable, tasks) when the environment says this process is one task of several."""
  for var in WORLD_SIZE_VARS:
    value = environ.get(var, "")
    if value.isdigit():
      if int(value) > 1:
        return var, int(value)
      return None   # the most specific variable present decides
  hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return "TPU_WORKER_HOSTNAMES", len(hosts)
  return None


def parse_device_ids(text: str | None, field: str = "--local_device_ids") -> list[int] | None:
  """'0,1,2,3' as a list of distinct non-negative ids; None or '' as None."""
  if text is None or not str(text).strip():
    return None
  parts = [p.strip() for p in str(text).split(",")]
  if not all(p.isdigit() for p in parts) or len(set(parts)) != len(parts):
    raise ConfigError(f"{field}={text!r}: give distinct device ids, e.g. 0,1,2,3 (every GPU of "
                      "the node for one process per node)")
  return [int(p) for p in parts]


def _tasks_on_node(environ: Mapping[str, str]) -> int | None:
  """This node's task count under SLURM: SLURM_NTASKS_PER_NODE, else the first entry of
  SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE ('8(x2),4')."""
  if environ.get("SLURM_NTASKS_PER_NODE", "").isdigit():
    return int(environ["SLURM_NTASKS_PER_NODE"])
  for var in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
    m = re.match(r"(\d+)", environ.get(var, ""))
    if m:
      return int(m.group(1))
  return None


def check_launch(*, distributed: bool, explicit: bool, single_process: bool,
                 local_device_ids: list[int] | None, environ: Mapping[str, str]) -> None:
  """Refuses, before jax starts, the launches that would run wrong without an error."""
  world = world_size_from_env(environ)
  if world and not (distributed or explicit or single_process):
    var, n = world
    raise ConfigError(f"{var}={n}: this process is one of {n} tasks but runs alone (each would "
                      "be process 0, all writing one workdir): add --distributed, or "
                      "--single_process to run the tasks independently")
  if not distributed or explicit or local_device_ids is not None or "SLURM_JOB_ID" not in environ:
    return
  gpus, tasks = environ.get("SLURM_GPUS_ON_NODE", ""), _tasks_on_node(environ)
  if gpus.isdigit() and tasks and int(gpus) > tasks:
    raise ConfigError(f"SLURM_GPUS_ON_NODE={gpus} with {tasks} task(s) on this node: jax pins "
                      f"each task to one GPU, leaving {int(gpus) - tasks} idle: run one task per "
                      f"GPU (srun --ntasks-per-node={gpus}), or give each task its GPUs with "
                      f"--local_device_ids=0,...,{int(gpus) - 1}")


def _encode(message: str) -> np.ndarray:
  raw = message.encode("utf-8")[:MESSAGE_BYTES].ljust(MESSAGE_BYTES, b"\0")
  return np.frombuffer(raw, np.uint8)


def _decode(row: np.ndarray) -> str:
  return bytes(np.asarray(row, np.uint8)).rstrip(b"\0").decode("utf-8", "replace")


def _allgather(x: np.ndarray) -> np.ndarray:
  """Every process's `x`, stacked in process order (one row per process)."""
  import jax
  from jax.experimental import multihost_utils
  if jax.process_count() == 1:
    return np.asarray(x)[None]
  return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def agree(step: Callable[[], T], what: str, gather: Callable[[np.ndarray], np.ndarray] = _allgather) -> T:
  """Runs `step` here and shares whether it raised: if any process did, every process raises, the
  one that failed its own exception and the others a one-line ConfigError naming the first that
  failed and its message. `gather` stacks every process's array (tests pass their own)."""
  try:
    result, error = step(), None
  except Exception as e:   # noqa: BLE001 -- shared first, then raised as it was
    result, error = None, e
  text = ""
  if error is not None:
    text = (str(error).splitlines() or [""])[0] or type(error).__name__
  rows = gather(_encode(text))
  failed = [i for i, row in enumerate(rows) if row.any()]
  if error is not None:
    raise error
  if failed:
    first = failed[0]
    raise ConfigError(f"process {first} refused {what}: {_decode(rows[first])}")
  return result


def agreed_step(step: int | None,
                gather: Callable[[np.ndarray], np.ndarray] = _allgather) -> int | None:
  """Process 0's latest checkpoint step for every process (-1 for none): a host whose listing
  of a shared folder is stale restores what process 0 chose, not its own latest."""
  steps = gather(np.asarray(-1 if step is None else step, np.int64))
  chosen = int(steps[0])
  return None if chosen < 0 else chosen


def agreed_latest(latest: Callable[[], int | None], name: str) -> int | None:
  """`latest()` (this host's latest checkpoint step of model `name`) listed on every process,
  then process 0's choice for all."""
  return agreed_step(agree(latest, f"{name}'s checkpoints"))


def agreed_read(read: Callable[[], T], name: str, step: int | None) -> T:
  """`read()` (model `name`'s checkpoint at the agreed `step`) on every process, agreed, and
  with several processes checked to give the same bytes everywhere."""
  import jax
  tree = agree(read, f"{name}'s checkpoint at step {step}")
  if tree is not None and jax.process_count() > 1:
    check_same_tree(tree, name, step)
  return tree


def fingerprint(tree: Any) -> np.ndarray:
  """A CRC32 of each leaf's bytes, in tree order: host arrays, or replicated jax arrays (of which
  this process's first replica is read)."""
  import jax

  def host(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = leaf.addressable_shards[0].data
    return np.ascontiguousarray(np.asarray(leaf))
  return np.asarray([zlib.crc32(host(leaf).tobytes()) for leaf in jax.tree.leaves(tree)], np.int64)


def check_same_tree(tree: Any, name: str, step: int,
                    gather: Callable[[np.ndarray], np.ndarray] = _allgather) -> None:
  """Every process restored the same bytes, or one line naming the first that did not."""
  rows = gather(fingerprint(tree))
  for i, row in enumerate(rows[1:], start=1):
    if not np.array_equal(row, rows[0]):
      raise ConfigError(f"process {i} restored {name} step {step} with other contents than "
                        "process 0: the workdir must be one folder shared by every host "
                        "(NFS, or a bucket path)")
