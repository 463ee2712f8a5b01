"""Workdirs written before the package's layout by stage stay usable: tests/data/workdir_v0 (made
by the flat layout, see tests/data/README.md) restores with today's code and samples exactly what
that layout's sample.py wrote for the same request."""
import os
import shutil
import subprocess
import sys

import jax
import numpy as np

from jaxguide import pipeline
from jaxguide.training import workdir as wd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD = os.path.join(ROOT, "tests", "data", "workdir_v0")


def test_old_workdir_restores_every_model_as_saved():
  run = pipeline.load_run(OLD)
  assert set(run.params) == {"score", "classifier", "guide"}
  assert run.shape == (2,) and run.num_classes == wd.read_data_info(OLD)[1]
  for name, params in run.params.items():
    saved = wd.restore_latest(OLD, name)["ema_params"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, saved)


def test_old_workdir_samples_what_the_old_layout_sampled(tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(OLD, workdir)   # sample.py writes nothing into it, but the committed copy stays pristine
  out = str(tmp_path / "out")
  done = subprocess.run([sys.executable, "sample.py", f"--workdir={workdir}", f"--out={out}",
                         "--guidance=cfg,classifier,autoguidance", "--scale=2", "--steps=5",
                         "--num_per_class=2", "--sampler=ddim"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  new = np.load(os.path.join(out, "samples.npz"))
  old = np.load(os.path.join(ROOT, "tests", "data", "workdir_v0_samples.npz"))
  assert set(new.files) == set(old.files)
  for k in ("label", "scale", "guidance"):
    np.testing.assert_array_equal(new[k], old[k])
  # float32 rounding of another codegen (the suite compiles at XLA optimisation level 0): relative
  np.testing.assert_allclose(new["image"], old["image"], atol=1e-5, rtol=1e-5)
