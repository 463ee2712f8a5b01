"""The workdir format: every file a run folder holds, with its one reader and one writer. A
workdir is a local folder or a URL that etils.epath opens (gs://bucket/run; `checkpoint`).

  config.json         the run's config (CONFIG_SECTIONS), written by training, read by all
  data_info.json      the data's example shape and class count, for sampling without the data
  conditions.npz      a text run's captions and their encodings (`jaxguide.conditioning`)
  metrics.jsonl       one JSON line per logged step
  train_report.json   each model's steps, speed and held-out figures
  checkpoints/NAME/   orbax checkpoints of each model (`restore_latest`)
  samples/            train.py's final grids (`jaxguide.cli.sample_output`)
  .jaxguide-owner     the training job that holds the workdir while it trains (`Owner`)
"""
from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from jaxguide import cluster
from jaxguide.errors import ConfigError
from jaxguide.training import checkpoint

CONFIG_FILE = "config.json"
# Sections a resumed run must share with the run already in the workdir.
FROZEN_SECTIONS = ("data", "sde", "score.model", "classifier.model", "evaluator.model",
                   "guide.model", "condition")


# What a config.json must hold for a workdir to be usable (a truncated or hand-edited file may not).
CONFIG_SECTIONS = ("data", "sde", "train", "models", "sample")


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  checkpoint.atomic_write_text(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2, sort_keys=True))


def read_json(path: str) -> Any:
  """A JSON file of a workdir; ConfigError naming the file if it is damaged."""
  try:
    return json.loads(epath.Path(path).read_text())
  except (ValueError, UnicodeDecodeError) as e:   # JSONDecodeError is a ValueError
    raise ConfigError(f"{path} is damaged ({checkpoint._one_line(e, 60)}): restore it, or use a new "
                      "--workdir") from None
  except OSError as e:
    raise ConfigError(f"{path} cannot be read ({e.strerror}): check its permissions") from None


def load_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The config a workdir was trained with, or None if it has none yet."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not epath.Path(path).exists():
    return None
  saved = read_json(path)
  missing = [s for s in CONFIG_SECTIONS if not isinstance(saved, dict) or s not in saved]
  if missing:
    raise ConfigError(f"{path} is damaged (no {missing[0]!r} section): restore it, or use a new "
                      "--workdir")
  if isinstance(saved["sde"], dict):   # written before the process was recorded: a VP-SDE run
    saved["sde"].setdefault("process", "vp")
  return ml_collections.ConfigDict(saved)


DATA_INFO_FILE = "data_info.json"


def save_data_info(workdir: str, shape: Sequence[int], num_classes: int) -> None:
  """What sampling needs to know of the data without loading it: example shape and class count."""
  checkpoint.atomic_write_text(os.path.join(workdir, DATA_INFO_FILE),
                               json.dumps({"shape": list(shape), "num_classes": int(num_classes)}))


def _section(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    if part not in node:
      return None
    node = node[part]
  return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def _normalise(tree: Any) -> Any:
  """JSON turns tuples into lists; compare configs in the JSON form."""
  if isinstance(tree, dict):
    return {k: _normalise(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_normalise(v) for v in tree]
  return tree


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Read-only checks: the workdir is a writable folder (or can be made), and a run already in it
  was trained with the same data, SDE and architectures, so resuming cannot mix two runs."""
  path = checkpoint.absolute(workdir)
  folder = epath.Path(path)
  if folder.exists() and not folder.is_dir():
    raise ConfigError(f"--workdir={workdir} is a file, not a folder: choose a new folder path")
  if checkpoint.is_local(path):   # an object store's permissions show at the first write
    parent = path
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
      raise ConfigError(f"--workdir={workdir}: {parent} is not a writable folder: choose a "
                        "writable path")
  saved = load_config(path) if folder.is_dir() else None
  if saved is None:
    return
  for section in FROZEN_SECTIONS:
    old, new = _normalise(_section(saved, section)), _normalise(_section(config, section))
    if section == "sde" and old and new and old.get("process") != new.get("process"):
      raise ConfigError(f"--workdir={workdir} holds a {old.get('process')} run and this config's "
                        f"sde.process is {new.get('process')}: use a new --workdir, or the "
                        "process it was trained with")
    if old is not None and new is not None and old != new:
      raise ConfigError(f"--workdir={workdir} holds a run with another {section} ({old} != {new}): "
                        "use a new --workdir, or the config it was trained with")


def make_workdir(workdir: str) -> None:
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir}: cannot create it ({e.strerror}): choose a writable path") from None


SHARED_TOKEN = ".jaxguide-shared-check"


def check_shared(workdir: str) -> None:
  """With several processes, that `workdir` is one folder for all: process 0 writes a random
  token into it, and after a barrier every process must read that token back (a host-local
  folder shows none, or another job's); agreed, so all refuse together. Process 0 then removes it."""
  if jax.process_count() == 1:
    return
  token = str(int(multihost_utils.broadcast_one_to_all(
      np.int32(np.random.default_rng().integers(1, 2**31 - 1)))))
  path = os.path.join(workdir, SHARED_TOKEN)
  if jax.process_index() == 0:
    checkpoint.atomic_write_text(path, token)
  multihost_utils.sync_global_devices("jaxguide: shared workdir token written")

  def read_back() -> None:
    try:
      seen = epath.Path(path).read_text().strip()
    except OSError:
      seen = None
    if seen != token:
      raise ConfigError(f"--workdir={workdir} is not the folder process 0 wrote ("
                        f"{'no token' if seen is None else 'another token'} in it): give every "
                        "host the same shared path (NFS, a bucket mount), not a host-local one")
  cluster.agree(read_back, f"--workdir={workdir}")
  if jax.process_index() == 0:
    epath.Path(path).unlink()


OWNER_FILE = ".jaxguide-owner"
HEARTBEAT_S = 30.0   # how often the training job renews its claim
LEASE_S = 120.0      # a claim not renewed for this long is a dead job's


def job_id(environ: Mapping[str, str] = os.environ) -> str:
  """This job: the scheduler's job id (a requeued SLURM job keeps its id, and takes its own
  workdir back at once), else this host and process."""
  if environ.get("SLURM_JOB_ID"):
    return "slurm:" + environ["SLURM_JOB_ID"]
  return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
  """Whether process `pid` of this host runs (a zombie, killed but not yet reaped, does not)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
  except OSError:
    return True


def _read_owner(path: str) -> dict[str, Any] | None:
  """The claim in OWNER_FILE, None if there is none; a claim being written, or damaged, counts as
  renewed when the file last changed."""
  try:
    owner = json.loads(epath.Path(path).read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    owner = None
  if not isinstance(owner, dict):
    try:   # an object store's modification time: counted as long dead
      owner = {"heartbeat": os.path.getmtime(path) if checkpoint.is_local(path) else 0.0}
    except OSError:
      return None
  return owner


def check_owner(workdir: str, environ: Mapping[str, str] = os.environ) -> None:
  """Refuses a workdir that another training job holds: one whose claim (`Owner`) is renewed
  within LEASE_S, and which is not this job and not a dead process of this host. Read-only."""
  path = os.path.join(workdir, OWNER_FILE)
  owner = _read_owner(path)
  if owner is None or owner.get("job") == job_id(environ):
    return
  age = time.time() - float(owner.get("heartbeat", 0.0))
  if age > LEASE_S:
    return
  host, pid = owner.get("host"), int(owner.get("pid", -1))
  if host == socket.gethostname() and not _alive(pid):
    return
  raise ConfigError(f"--workdir={workdir} is being trained by job {owner.get('job')} (process {pid} "
                    f"on {host}, last seen {age:.0f} s ago): wait for it to end, or use another "
                    f"--workdir; if that job is gone, delete {path}")


class Owner:
  """The running training job's claim on its workdir (process 0's): OWNER_FILE names the job, its
  host and process, renewed every HEARTBEAT_S by a daemon thread and removed at exit. A job killed
  outright leaves it behind; it then stops counting once its process is gone (same host) or
  LEASE_S after its last renewal (any host), so resuming after a crash is never blocked for
  long. A second job on the same workdir is refused by `check_owner`, or here if both check at
  once."""

  def __init__(self, workdir: str, environ: Mapping[str, str] = os.environ):
    self.workdir, self.path, self.environ = workdir, os.path.join(workdir, OWNER_FILE), environ
    self.record = {"job": job_id(environ), "host": socket.gethostname(), "pid": os.getpid(),
                   "token": os.urandom(8).hex()}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _write(self) -> None:
    checkpoint.atomic_write_text(self.path, json.dumps({**self.record, "heartbeat": time.time()}))

  def __enter__(self) -> "Owner":
    check_owner(self.workdir, self.environ)   # the claim may have changed since prepare's check
    if _read_owner(self.path) is None and checkpoint.is_local(self.path):
      try:   # created only if absent: of two jobs starting at once, one gets it
        os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
      except FileExistsError:
        raise ConfigError(f"--workdir={self.workdir} was claimed by another job as this one "
                          "started: use another --workdir") from None
    self._write()
    self._thread = threading.Thread(target=self._beat, daemon=True, name="jaxguide-owner")
    self._thread.start()
    return self

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S) and self.renew():
      pass

  def renew(self) -> bool:
    """Renews the claim; False (and a warning) once another job has taken it over, which
    happens only if this one looked dead: no renewal for LEASE_S."""
    owner = _read_owner(self.path)
    if owner is not None and owner.get("token") != self.record["token"]:
      logging.warning("%s was taken over by job %s: this job's claim ends", self.workdir,
                      owner.get("job"))
      return False
    try:
      self._write()
    except OSError as e:
      logging.warning("cannot renew the claim on %s (%s)", self.workdir, e.strerror)
    return True

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    owner = _read_owner(self.path)
    if owner is not None and owner.get("token") == self.record["token"]:
      epath.Path(self.path).unlink()


METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "train_report.json"
CONDITIONS_FILE = "conditions.npz"
SAMPLES_DIR = "samples"


def metrics_path(workdir: str) -> str:
  return os.path.join(workdir, METRICS_FILE)


def checkpoint_dir(workdir: str, name: str) -> str:
  """The orbax folder of one model (score, classifier, evaluator, guide)."""
  return os.path.join(workdir, "checkpoints", name)


def samples_dir(workdir: str) -> str:
  return os.path.join(workdir, SAMPLES_DIR)


def read_data_info(workdir: str) -> tuple[tuple[int, ...], int]:
  """(example shape, class count) from data_info.json; ConfigError if missing or damaged."""
  path = os.path.join(workdir, DATA_INFO_FILE)
  if not epath.Path(path).exists():
    raise ConfigError(f"--workdir={workdir} holds no trained run (no {DATA_INFO_FILE}): "
                      f"train one first with python train.py --workdir {workdir}")
  info = read_json(path)
  try:
    return tuple(int(n) for n in info["shape"]), int(info["num_classes"])
  except (KeyError, TypeError, ValueError):
    raise ConfigError(f"{path} is damaged (it needs 'shape' and 'num_classes'): restore it, "
                      "or retrain in a new --workdir") from None


def read_report(workdir: str) -> dict[str, Any]:
  """train_report.json's entries, {} if there is none; a damaged report reads as {} (training
  rewrites it rather than refusing to train)."""
  path = os.path.join(workdir, REPORT_FILE)
  try:
    report = read_json(path) if epath.Path(path).exists() else None
  except ConfigError:
    report = None
  return report if isinstance(report, dict) else {}


def write_report(workdir: str, report: dict[str, Any]) -> None:
  checkpoint.atomic_write_text(os.path.join(workdir, REPORT_FILE), json.dumps(report, indent=2))


def read_conditions(workdir: str) -> Optional[dict[str, np.ndarray]]:
  """conditions.npz's arrays (`jaxguide.conditioning.Captions`), or None if there is none."""
  path = os.path.join(workdir, CONDITIONS_FILE)
  if not epath.Path(path).exists():
    return None
  try:
    with np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except (OSError, ValueError):
    raise damaged_conditions(workdir) from None


def damaged_conditions(workdir: str) -> ConfigError:
  """The one-line error for an unreadable or incomplete conditions.npz."""
  return ConfigError(f"{os.path.join(workdir, CONDITIONS_FILE)} is damaged: delete it (the captions "
                     "are encoded again at the next train.py run, which needs the text encoder)")


def write_conditions(workdir: str, **arrays: np.ndarray) -> None:
  checkpoint.atomic_write_npz(os.path.join(workdir, CONDITIONS_FILE), **arrays)


def latest_step(workdir: str, name: str) -> int | None:
  """The latest complete checkpoint step of one model as this host lists it, or None."""
  directory = checkpoint_dir(workdir, name)
  if not epath.Path(directory).is_dir():
    return None
  ckpt = checkpoint.Checkpointer(directory, read_only=True)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def restore_latest(workdir: str, name: str, target: Callable[[], Any] | None = None,
                   step: int | None = None, part: str | None = None) -> Any | None:
  """The latest complete checkpoint of one model (or the one at `step`), or None when it has
  none; read-only.

  `target` (called only when there is a checkpoint) gives the tree to restore into (structure,
  dtypes, placement: `checkpoint.Checkpointer.restore`); None reads the tree as saved into host
  memory. `part` reads one top-level entry alone (e.g. "ema_params"). A damaged checkpoint, or a
  `step` this host does not see, raises `checkpoint.CheckpointError` (one line, with the fix)."""
  directory = checkpoint_dir(workdir, name)
  if not epath.Path(directory).is_dir():
    if step is None:
      return None
    raise checkpoint.CheckpointError(f"{directory} not found on this host, where process 0 "
                                     f"restores step {step}: the workdir must be one shared folder")
  ckpt = checkpoint.Checkpointer(directory, read_only=True)
  try:
    if step is None:
      step = ckpt.latest_step()
      if step is None:
        return None
    elif step not in ckpt.all_steps():
      raise checkpoint.CheckpointError(f"{directory}: step {step}, which process 0 restores, is "
                                       "not listed on this host: the workdir must be one folder "
                                       "shared by every host")
    return ckpt.restore(None if target is None else target(), step=step, part=part)
  finally:
    ckpt.close()
