"""Checkpoints: a thin wrapper over orbax's `CheckpointManager`, and atomic writes of the
workdir's other files (their formats: `training.workdir`). A workdir is a local folder or any
URL that etils.epath opens (gs://bucket/run): orbax takes both, and the other files go through
epath where they are not local.

Orbax writes each step into a temporary folder and renames it when complete (its "finalize"), so
a run killed mid-save leaves no half checkpoint that could be loaded: `latest_step` only sees
finished ones, and the leftover is named in a warning (then removed by the next save). A
checkpoint that is damaged, or holds another model than the one asked for, raises
`CheckpointError`: one line naming the folder and the fix. No pickle anywhere: arrays go through
orbax.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging as logging_std
import os
import re
import sys
import tempfile
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from jaxguide.errors import ConfigError


class CheckpointError(ConfigError):
  """A checkpoint that cannot be used (damaged files, or another model's arrays)."""


def incomplete_saves(directory: str) -> list[str]:
  """Folders a save left unfinished (killed before orbax's finalizing rename)."""
  if not epath.Path(directory).is_dir():
    return []
  return sorted(ocp.step.tmp_checkpoints(directory))


def _one_line(e: Exception, limit: int = 120) -> str:
  text = " ".join(str(e).split()) or "no detail"
  return f"{type(e).__name__}: {text[:limit]}{'…' if len(text) > limit else ''}"


class _SiblingReadFailures(logging_std.Filter):
  """asyncio's "Task exception was never retrieved" reports that a failed checkpoint read leaves
  (its sibling reads' tasks, garbage-collected with their own copy of the failure). While a read
  is in flight they are held; if the read fails they are dropped, and so is every later one (the
  remaining siblings are collected at any time up to exit); if it succeeds they are logged as
  usual. No other asyncio report is touched."""

  def __init__(self):
    super().__init__()
    self.held: list[logging_std.LogRecord] | None = None
    self.failed = False

  def filter(self, record: logging_std.LogRecord) -> bool:
    if not str(record.msg).startswith("Task exception was never retrieved"):
      return True
    if self.failed:
      return False
    if self.held is not None:
      self.held.append(record)
      return False
    return True

  @contextlib.contextmanager
  def reading(self) -> Iterator[None]:
    self.held = []
    try:
      yield
    except BaseException:
      self.failed = True
      raise
    finally:
      held, self.held = self.held, None
      if not self.failed:
        for record in held:
          logging_std.getLogger(record.name).handle(record)


_SIBLINGS = _SiblingReadFailures()


def _ignore_closed_loop_callbacks() -> None:
  """After a failed read (metadata or arrays), the other reads are still in flight; as they
  finish, their callbacks find orbax's event loop closed and each raises RuntimeError('Event loop
  is closed') into `sys.unraisablehook`, which prints a traceback per read. Those are drops of
  already failed work, not errors of their own. A hook installed once, when the first
  Checkpointer opens (before any read, so that no callback can beat it), discards exactly them
  and hands everything else to the hook that was there: a damaged checkpoint's one-line error is
  all a user sees."""
  previous = sys.unraisablehook
  if getattr(previous, "_jaxguide_filter", False):
    return
  # The same drops can also surface as asyncio's "Task exception was never retrieved".
  logging_std.getLogger("asyncio").addFilter(_SIBLINGS)

  def hook(unraisable):
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
      previous(unraisable)
  hook._jaxguide_filter = True
  sys.unraisablehook = hook


class _Manager(ocp.CheckpointManager):
  """orbax's manager without its own look at jax's preemption sync point. orbax asks it on every
  save, passing the checkpoint's step, and jax's protocol reads the last number any caller
  passed: that would move the per-step count that the training loop's `StopSignal.due` keeps.
  Every save here is asked for explicitly (a due step, or a stop the loop agreed on)."""

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


# The folder of a step's tree inside its step folder: orbax's name for a manager's single item.
ITEM = "default"


def _abstract_leaf(leaf: Any) -> Any:
  """What orbax restores a target leaf as: numpy leaves stay numpy (read to host memory)."""
  return leaf if isinstance(leaf, np.ndarray) else ocp.utils.to_shape_dtype_struct(leaf)


class Checkpointer:
  """Saves every `save_every` steps (and when forced), keeps the last `keep`, restores the latest.
  `read_only` never creates, cleans or writes anything (sampling must leave a workdir as it was)."""

  def __init__(self, directory: str, *, save_every: int = 1000, keep: int = 3,
               read_only: bool = False, warn_incomplete: bool = True):
    _ignore_closed_loop_callbacks()
    self.directory = absolute(directory)
    self.incomplete = incomplete_saves(self.directory)
    if self.incomplete and warn_incomplete:
      logging.warning("ignoring %d incomplete checkpoint(s) in %s left by an interrupted save (%s): "
                      "using the last complete one", len(self.incomplete), self.directory,
                      ", ".join(self.incomplete))
    # Read-only is by convention (no create, no cleanup, `save` refused), not orbax's read_only
    # option, which logs a warning on every open.
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only,
        # Saves on multiples of save_every only (orbax would also save the first step it sees).
        should_save_fn=lambda step, last_saved: step % save_every == 0,
        cleanup_tmp_directories=not read_only,   # the next save removes what a killed one left
        enable_async_checkpointing=False,    # a returned save is on disk: simple, preemption-safe
        # With several processes a save is collective (each writes what it owns, process 0
        # finalizes); a read is each process's own, with no barrier: each reads alone.
        multiprocessing_options=self._read_alone() if read_only else ocp.options.MultiprocessingOptions())
    self._manager = _Manager(self.directory, options=options,
                             item_handlers=ocp.StandardCheckpointHandler())

  @staticmethod
  def _read_alone() -> "ocp.options.MultiprocessingOptions":
    index = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=index, active_processes={index})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, tree: Any, *, force: bool = False) -> bool:
    """Saves `tree` at `step` if the interval says so (or `force`); returns whether it saved."""
    if self.read_only:
      raise RuntimeError(f"{self.directory} was opened read-only")
    saved = self._manager.save(step, args=ocp.args.StandardSave(tree), force=force)
    self._manager.wait_until_finished()
    return saved

  def _error(self, step: int, what: str) -> CheckpointError:
    earlier = [s for s in self.all_steps() if s < step]
    fallback = f"fall back to step {max(earlier)}" if earlier else "start that model over"
    return CheckpointError(f"checkpoint {os.path.join(self.directory, str(step))} {what}: move that "
                           f"folder away to {fallback}, or use a new --workdir")

  def _saved_tree(self, step: int) -> Any:
    """The saved tree of ArrayMetadata; CheckpointError if its metadata is missing or damaged."""
    try:
      with _SIBLINGS.reading():
        saved = self._manager.item_metadata(step)
      tree = getattr(saved, "tree", saved)
      if not jax.tree.leaves(tree):
        raise ValueError("no arrays")
      return tree
    except Exception as e:   # orbax and tensorstore raise many types; all mean "unreadable"
      raise self._error(step, f"is unreadable ({_one_line(e)})") from None

  def metadata(self, step: int | None = None) -> dict[str, Any]:
    """{array name: ArrayMetadata} of a saved step (names like 'params.Dense_0.kernel')."""
    step = self.latest_step() if step is None else step
    return {leaf.name: leaf for leaf in jax.tree.leaves(self._saved_tree(step))}

  def verify(self, target: Any, step: int | None = None, part: str | None = None) -> None:
    """Checks, from metadata alone, that a saved step holds exactly `target`'s arrays and shapes
    (under its top-level entry `part`, when given): a checkpoint of another architecture or image
    shape is refused before anything is loaded."""
    step = self.latest_step() if step is None else step
    prefix = "" if part is None else f"{part}."
    saved = {name[len(prefix):]: tuple(m.shape) for name, m in self.metadata(step).items()
             if name.startswith(prefix)}
    if part is not None and not saved:
      raise self._error(step, f"holds no {part}")
    wanted = {jax.tree_util.keystr(path, simple=True, separator="."): tuple(np.shape(leaf))
              for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    for name in sorted(set(saved) | set(wanted)):
      if saved.get(name) != wanted.get(name):
        raise self._error(step, f"holds {prefix}{name} with shape {saved.get(name)} where the "
                                f"config builds {wanted.get(name)} (another config or image shape)")

  def restore(self, target: Any = None, step: int | None = None, *,
              part: str | None = None) -> Any:
    """Restores into the structure, dtypes and placement of `target`, after `verify`. A leaf
    with a sharding (an array, or a ShapeDtypeStruct) is read straight onto it, each device its
    own part, nothing gathered on one device; a numpy leaf is read into host memory. Without a
    target, the saved tree as host arrays: never onto the saving run's devices, which a host with
    another device count does not have. `part` reads one top-level entry alone (e.g.
    'ema_params': sampling never reads the optimizer state); `target` is then that entry's."""
    step = self.latest_step() if step is None else step
    if target is None:
      saved = self._saved_tree(step)
      if part is not None and part not in saved:
        raise self._error(step, f"holds no {part}")
      target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype),
                            saved if part is None else saved[part])
    self.verify(target, step, part)
    abstract = jax.tree.map(_abstract_leaf, target)
    try:
      with _SIBLINGS.reading():
        if part is None:
          return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        return self._restore_part(step, part, abstract)
    except Exception as e:   # damaged array data: tensorstore's decode and read errors
      raise self._error(step, f"is unreadable ({_one_line(e)})") from None

  def _restore_part(self, step: int, part: str, abstract: Any) -> Any:
    """One top-level entry of a step, through orbax's PyTree handler's partial restore (the
    standard handler reads whole trees only)."""
    item = {part: abstract}
    restore_args = jax.tree.map(
        lambda a: (ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype) if isinstance(a, np.ndarray)
                   else ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype)), item)
    if "partial_restore" in inspect.signature(ocp.args.PyTreeRestore).parameters:
      partial = {"partial_restore": True}
    else:   # orbax before 0.11: entries missing from `item` are dropped by an empty transform
      partial = {"transforms": {}}
    handler = ocp.PyTreeCheckpointHandler(multiprocessing_options=self._read_alone())
    with ocp.Checkpointer(handler, multiprocessing_options=self._read_alone()) as reader:
      restored = reader.restore(os.path.join(self.directory, str(step), ITEM),
                                args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                            **partial))
    return restored[part]

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def is_local(path: str) -> bool:
  """Whether `path` is a folder of this host's filesystem, not a URL such as gs://bucket/run
  (which goes through etils.epath, as orbax's own paths do)."""
  return _URL.match(str(path)) is None


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def absolute(path: str) -> str:
  """A local path made absolute; a URL as given."""
  return os.path.abspath(path) if is_local(path) else str(path)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary local path; when the block succeeds its file replaces `path`: beside it
  and by a rename on a local filesystem, so a reader never sees half a file and a failure leaves
  the old file (or none) in place; by one upload for a URL (an object store shows whole objects
  only)."""
  local = is_local(path)
  directory = os.path.dirname(os.path.abspath(path)) if local else None
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
  os.close(fd)
  try:
    yield tmp
    if local:
      # mkstemp makes the file private (0600); give it the mode a plain open() would have.
      umask = os.umask(0)
      os.umask(umask)
      os.chmod(tmp, 0o666 & ~umask)
      os.replace(tmp, path)
    else:
      with open(tmp, "rb") as f:
        epath.Path(path).write_bytes(f.read())
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def atomic_write_text(path: str, text: str) -> None:
  """Writes a text file through a temporary file and a rename, so readers never see half of it."""
  with atomic_path(path) as tmp:
    with open(tmp, "w") as f:
      f.write(text)


def atomic_write_npz(path: str, **arrays: np.ndarray) -> None:
  """np.savez through a temporary file and a rename."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(buffer.getvalue())


