"""TensorFlow Datasets sources through Grain: `tfds.data_source` (array_record; no TensorFlow
needed), a fast failure where there is no network to download from, whole splits read into
memory, and lazy training splits (`Records`) whose batches Grain reads ahead.
"""
from __future__ import annotations

import dataclasses
import functools
import socket
import threading
import urllib.parse
import urllib.request
from typing import Any

import numpy as np

from jaxguide.data.dataset import Dataset
from jaxguide.errors import ConfigError

# TFDS downloads prepared datasets from this bucket first, then the original URLs.
_TFDS_HOST = ("storage.googleapis.com", 443)


# `tfds build` writes TFRecord by default, which `tfds.data_source` cannot index.
_ARRAY_RECORD = "--file_format=array_record"


@dataclasses.dataclass(frozen=True, eq=False)
class Records:
  """One split read lazily: `source[i]` is record i, {'image': uint8 (H, W, C), 'label': int}
  (a `tfds.data_source`). Has the dataset's shape, num_classes and name, not its arrays."""

  source: Any
  shape: tuple[int, ...]
  num_classes: int
  name: str

  def __len__(self) -> int:
    return len(self.source)


def _probe_address() -> tuple[str, int]:
  """Where a download would connect first: the HTTPS proxy if one is set, else the TFDS bucket."""
  proxy = urllib.request.getproxies().get("https")
  if proxy:
    parts = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    if parts.hostname:
      return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
  return _TFDS_HOST


def _can_download(timeout: float = 3.0) -> bool:
  """Whether a TCP connection to the download host opens within `timeout` seconds.

  Without network TFDS retries for minutes; this answers in seconds. The probe runs in a daemon
  thread because name resolution ignores socket timeouts and can stall on its own.
  """
  opened = []

  def probe():
    try:
      socket.create_connection(_probe_address(), timeout=timeout).close()
      opened.append(True)
    except OSError:
      pass

  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(opened)


def _tfds_builder(name: str, data_dir: str | None, source: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # only tfds users pay
  try:
    return tfds.builder(name, data_dir=data_dir)
  except (ValueError, AssertionError) as e:  # unknown name, version or config
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
    raise ConfigError(f"data.source={source!r}: {reason}: use a TFDS name such as tfds:mnist, "
                      "tfds:fashion_mnist or tfds:cifar10") from None


def _tfds_info(builder, source: str) -> tuple[tuple[int, ...], int]:
  """(image shape, num_classes) from the builder's features, which need no downloaded data."""
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise ConfigError(f"data.source={source!r} has features {sorted(features)}, not image and "
                      "label: use a labelled image dataset such as tfds:mnist or tfds:cifar10")
  if None in features["image"].shape or features["image"].np_dtype != np.uint8:
    raise ConfigError(f"data.source={source!r}: images must be fixed-size uint8, got "
                      f"{features['image'].shape}: use e.g. tfds:mnist or tfds:cifar10")
  return tuple(features["image"].shape), int(features["label"].num_classes)


def _tfds_records(name: str, split: str, data_dir: str | None, source: str) -> Records:
  """The split as Records over `tfds.data_source`, after the checks that fail fast offline."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _tfds_builder(name, data_dir, source)
  shape, classes = _tfds_info(builder, source)
  if not builder.is_prepared() and not _can_download():
    raise ConfigError(
        f"data.source={source!r}: the dataset is not prepared in {builder.data_dir} and cannot be "
        f"downloaded from this host: run 'tfds build {name} {_ARRAY_RECORD}' on a host with "
        "internet and copy the folder, or use mnist5k / idx:DIR")
  if builder.info.splits and split not in builder.info.splits:
    raise ConfigError(f"data.split={split!r}: {source} has splits {sorted(builder.info.splits)}: "
                      "use a source with train and test splits")
  try:
    records = tfds.data_source(name, split=split, data_dir=data_dir)
  except NotImplementedError:  # prepared as TFRecord, `tfds build`'s default: no random access
    raise ConfigError(
        f"data.source={source!r}: {builder.data_dir} holds no array_record files: run 'tfds build "
        f"{name} {_ARRAY_RECORD}' and copy the folder, or use mnist5k / idx:DIR") from None
  return Records(records, shape, classes, source)


READ_THREADS, READ_AHEAD = 4, 8   # Grain's reader threads, and elements read ahead
_READ_CHUNK = 1024   # records per element when a whole split is read into memory


def _read_records(examples, idx: np.ndarray) -> dict[str, np.ndarray]:
  """{'image': uint8 (n, H, W, C), 'label': int32 (n,)} of records `idx`, one by one:
  `__getitems__` is broken under tfds' mock_data."""
  items = [examples[int(i)] for i in idx]
  return {"image": np.stack([np.asarray(ex["image"], np.uint8) for ex in items]),
          "label": np.asarray([ex["label"] for ex in items], np.int32)}


def _grain_read(records: Records, elements: int, indices_of) -> Any:
  """A Grain iterator whose element e is _read_records(indices_of(e)), e in [0, elements), read
  in order by READ_THREADS worker threads up to READ_AHEAD elements ahead."""
  import grain  # pylint: disable=g-import-not-at-top  # only tfds users pay
  examples = grain.MapDataset.source(records.source)
  reads = grain.MapDataset.range(elements).map(lambda e: _read_records(examples, indices_of(e)))
  return iter(reads.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS,
                                                      prefetch_buffer_size=READ_AHEAD)))


def read_all(records: Records) -> Dataset:
  """Every record of the split in memory, in index order, read in chunks through Grain."""
  n = len(records)
  chunks = list(_grain_read(records, -(-n // _READ_CHUNK),
                            lambda c: np.arange(c * _READ_CHUNK, min(n, (c + 1) * _READ_CHUNK))))
  if not chunks:
    raise ConfigError(f"data.source={records.name!r}: the split holds no records: use another source")
  return Dataset(np.concatenate([c["image"] for c in chunks]),
                 np.concatenate([c["label"] for c in chunks]), records.num_classes, records.name)


@functools.lru_cache(maxsize=8)
def _load_tfds(name: str, split: str, data_dir: str | None, source: str) -> Dataset:
  # Cached like mnist5k: the evaluation and figures after training reuse the split in memory.
  return read_all(_tfds_records(name, split, data_dir, source))
