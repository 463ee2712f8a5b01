"""sample.py and the pipeline on a tiny trained toy workdir: outputs, one compile, bad input."""
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from cli_test import tree_hash
from jaxguide import pipeline, train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def toy_workdir(tmp_path_factory):
  from configs import toy2d
  c = toy2d.get_config()
  c.train.update({"steps": 40, "batch_size": 64, "log_every": 20, "ckpt_every": 40})
  c.score.model.update({"hidden": 32, "depth": 2})
  c.classifier.model.update({"hidden": 32, "depth": 2})
  c.sample.update({"steps": 10, "num_per_class": 4})
  workdir = str(tmp_path_factory.mktemp("toy") / "run")
  train_lib.train_and_evaluate(c, workdir, progress=False)
  return workdir


def run_sample(*args, timeout=180):
  # Two devices while the workdir was trained on one: checkpoints must not pin their devices.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True,
                        text=True, env=env, timeout=timeout)


def test_sample_writes_outputs(toy_workdir, tmp_path):
  out = tmp_path / "s"
  res = run_sample(f"--workdir={toy_workdir}", "--guidance=cfg", "--scale=0,1,3", "--steps=10",
                   "--num_per_class=5", f"--out={out}", "--evaluate")
  assert res.returncode == 0, res.stderr[-3000:]
  with np.load(out / "samples.npz") as f:
    assert f["image"].shape == (3 * 4 * 5, 2) and f["image"].dtype == np.float32
    np.testing.assert_array_equal(f["scale"], np.repeat([0, 1, 3], 20).astype(np.float32))
    np.testing.assert_array_equal(f["label"], np.tile(np.repeat(np.arange(4), 5), 3))
  names = sorted(os.listdir(out))
  assert names == ["points_cfg_s0.png", "points_cfg_s1.png", "points_cfg_s3.png", "report.json",
                   "report.md", "samples.npz"], names


def test_scale_list_compiles_once(toy_workdir):
  run = pipeline.load_run(toy_workdir)
  labels = np.arange(8) % 4
  first, second = {}, {}
  a = pipeline.generate(run, jax.random.PRNGKey(0), labels, np.full(8, 2.0), kind="cfg", steps=5,
                        sampler="ddim", timings=first)
  b = pipeline.generate(run, jax.random.PRNGKey(0), labels, np.linspace(0, 5, 8), kind="cfg", steps=5,
                        sampler="ddim", timings=second)
  assert first["compile_s"] > 0 and second["compile_s"] == 0.0
  assert a.shape == b.shape == (8, 2) and not np.allclose(a, b)


def _no_classifier(workdir, tmp_path):
  copy = str(tmp_path / "noclf")
  shutil.copytree(workdir, copy)
  shutil.rmtree(os.path.join(copy, "checkpoints", "classifier"))
  return copy


def _incomplete(workdir, tmp_path):
  copy = str(tmp_path / "incomplete")
  shutil.copytree(workdir, copy)
  shutil.rmtree(os.path.join(copy, "checkpoints", "score"))
  return copy


BAD_SAMPLE = [
    ("no workdir", lambda w, t: str(t / "nothing"), [], "no trained run"),
    ("no classifier", _no_classifier, ["--guidance=classifier"], "classifier"),
    ("label out of range", None, ["--labels=0,7"], "--labels"),
    ("unknown sampler", None, ["--sampler=heun3"], "sampler"),
    ("unknown guidance", None, ["--guidance=magic"], "guidance"),
    ("zero steps", None, ["--steps=0"], "steps"),
    ("bad scale", None, ["--scale=1,x"], "--scale"),
    ("missing score checkpoint", _incomplete, [], "score"),
    ("eta without ddim", None, ["--sampler=pc", "--eta=0.5"], "eta"),
    ("bad interval", None, ["--interval=0.9,0.1"], "interval"),
]


@pytest.mark.parametrize("case,make,args,needle", BAD_SAMPLE, ids=[c[0] for c in BAD_SAMPLE])
def test_bad_sample_input(case, make, args, needle, toy_workdir, tmp_path):
  workdir = make(toy_workdir, tmp_path) if make else toy_workdir
  before = tree_hash(workdir)
  res = run_sample(f"--workdir={workdir}", *args)
  lines = [l for l in res.stderr.splitlines() if l.strip()]
  assert res.returncode == 2, res.stderr[-3000:]
  assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
  assert needle in lines[0], lines[0]
  assert tree_hash(workdir) == before
