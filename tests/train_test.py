"""Training end to end on the toy mixture: loss falls, resume is exact, 8 devices equal 1."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import chex
import jax
import numpy as np
import pytest

import conftest
from jaxguide.data import tfds as tfds_source
from jaxguide.training import checkpoint
from jaxguide import cli
from jaxguide.cli import train_job
from jaxguide import training
from jaxguide.errors import ConfigError
from jaxguide.training import workdir as wd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def final_tree(workdir, name="score"):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints", name))
  tree = ckpt.restore()
  ckpt.close()
  return tree


def test_toy_training_lowers_loss(toy_config, tmp_path):
  toy_config.train.update({"steps": 300, "log_every": 25, "ckpt_every": 300, "lr": 3e-3})
  report = train_job.train_and_evaluate(toy_config, str(tmp_path), progress=False)
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  score = [r["loss"] for r in records if r["model"] == "score"]
  assert np.mean(score[-2:]) < 0.8 * score[0], score
  # Noised points at large t are unclassifiable, so the classifier's loss stays well above 0;
  # it must still fall clearly below chance, log 4.
  clf = [r["loss"] for r in records if r["model"] == "classifier"]
  assert np.mean(clf[-2:]) < min(clf[0], np.log(4) - 0.2), clf
  assert all(np.isfinite(report[m]["images_per_s"]) for m in ("score", "classifier"))
  assert report["score"]["steps"] == 300 and report["classifier"]["steps"] == 150
  # The classifier is near-perfect on clean points and near chance (1/4) on pure noise.
  assert report["classifier"]["test_accuracy_t0.05"] > 0.9
  assert report["classifier"]["test_accuracy_t1"] < 0.45
  assert json.loads((tmp_path / "train_report.json").read_text())["score"]["steps"] == 300


@pytest.mark.cpu_exact
def test_resume_equals_straight_run(toy_config, tmp_path):
  toy_config.models = "score"
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train_job.train_and_evaluate(toy_config, straight, progress=False)
  toy_config.train.steps = 20          # stopped half-way at a checkpoint ...
  train_job.train_and_evaluate(toy_config, resumed, progress=False)
  assert checkpoint.Checkpointer(os.path.join(resumed, "checkpoints", "score")).latest_step() == 20
  toy_config.train.steps = 40          # ... then the same command again
  train_job.train_and_evaluate(toy_config, resumed, progress=False)
  a, b = final_tree(straight), final_tree(resumed)
  assert int(a["step"]) == int(b["step"]) == 40
  chex.assert_trees_all_close(a, b, atol=1e-6, rtol=0)


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = {xla_flags!r}
    sys.path.insert(0, {root!r})
    import chex, jax
    from configs import toy2d
    from jaxguide.cli import train_job
    from jaxguide.training import checkpoint
    assert jax.local_device_count() == 8
    trees = []
    for n in (1, 8):
      c = toy2d.get_config()
      c.models = "score"
      c.train.update(dict(steps=30, batch_size=64, ckpt_every=30, log_every=10, num_devices=n))
      c.score.model.update(dict(hidden=32, depth=2))
      workdir = os.path.join({tmp!r}, str(n))
      train_job.train_and_evaluate(c, workdir, progress=False)
      ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints", "score"))
      trees.append(ckpt.restore())
    chex.assert_trees_all_close(trees[0], trees[1], atol=2e-5, rtol=1e-4)
    print("EQUAL")
""")


@pytest.mark.integration
def test_eight_devices_equal_one(tmp_path):
  script = MULTI_DEVICE_SCRIPT.format(root=ROOT, tmp=str(tmp_path), xla_flags=conftest.xla_flags(8))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=300)
  assert out.returncode == 0 and "EQUAL" in out.stdout, out.stderr[-3000:]


def test_foreign_workdir_refused_untouched(toy_config, tmp_path):
  toy_config.models = "score"
  toy_config.train.steps = 10
  train_job.train_and_evaluate(toy_config, str(tmp_path), progress=False)
  before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
  toy_config.score.model.hidden = 48          # another architecture in the same workdir
  toy_config.train.steps = 20
  with pytest.raises(ConfigError, match="score.model"):
    train_job.train_and_evaluate(toy_config, str(tmp_path), progress=False)
  assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_nan_guard_keeps_last_good_checkpoint(toy_config, tmp_path):
  toy_config.models = "score"
  toy_config.train.update({"steps": 20, "ckpt_every": 10, "log_every": 10})
  train_job.train_and_evaluate(toy_config, str(tmp_path), progress=False)        # good: step 20
  toy_config.train.update({"steps": 60, "lr": 1e30, "warmup_steps": 1})           # then diverge
  with pytest.raises(training.Diverged, match=r"score diverged .*last good checkpoint: step 20"):
    train_job.train_and_evaluate(toy_config, str(tmp_path), progress=False)
  tree = final_tree(str(tmp_path))
  assert int(tree["step"]) == 20
  assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(tree))


@pytest.mark.integration
def test_sigterm_saves_and_exits_preempted(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "train.py", "--config=configs/toy2d.py", f"--workdir={workdir}",
         "--config.models=score", "--config.train.steps=1000000", "--config.train.log_every=5",
         "--config.train.ckpt_every=1000000", "--progress=false", "--grids=false"]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 120
  while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == cli.PREEMPTED_EXIT, err[-3000:]
  assert "resume" in err and "Traceback" not in err, err[-3000:]
  step = checkpoint.Checkpointer(str(workdir / "checkpoints" / "score")).latest_step()
  assert step is not None and step >= 5


def test_signal_during_evaluation_stops_at_its_end(toy_config, tmp_path):
  """A SIGTERM while a model is evaluated (nothing to save there) stops after that evaluation,
  before the next model trains, with Preempted naming the stage; the trained model is saved."""
  from jaxguide.training import run
  toy_config.train.steps = 10

  def evaluate(name, *args):
    os.kill(os.getpid(), signal.SIGTERM)   # StopSignal's handler records it
    return {}
  with pytest.raises(training.Preempted, match="during score's evaluation: score saved at step 10"):
    run.train(toy_config, str(tmp_path), progress=False, evaluate=evaluate)
  assert wd.latest_step(str(tmp_path), "score") == 10
  assert wd.latest_step(str(tmp_path), "classifier") is None


def test_signal_during_the_final_grids_stops_after_the_grid(toy_run, tmp_path):
  """A signal recorded while the CFG grid is drawn stops before the classifier grid."""
  from jaxguide.cli import sample_output
  workdir = str(tmp_path / "run")
  shutil.copytree(toy_run, workdir)
  with training.StopSignal() as stop:
    stop.requested = signal.SIGTERM
    with pytest.raises(training.Preempted, match="during the final grids: every model saved"):
      sample_output.final_grids(workdir, stop=stop)
  assert os.listdir(os.path.join(workdir, "samples")) == ["cfg"]


# ------------------------------------------------------------------ host work per training step


def test_prefetch_to_device_places_ahead_and_yields_the_same_batches():
  from jaxguide import data
  from jaxguide import parallel
  ds = data.load("mnist5k", "test")
  mesh = parallel.data_mesh(jax.devices()[:1])
  pulled = []

  def host():
    for step in range(5):
      pulled.append(step)
      yield data.host_batch_at(ds, step, 8, seed=0)

  stream = parallel.prefetch_to_device(host(), mesh, size=2)
  first = next(stream)
  assert pulled == [0, 1]      # the batch in use and the next one, already placed
  second = next(stream)        # the next is placed after the caller's step was dispatched
  assert pulled == [0, 1, 2]
  placed = [first, second, *stream]
  assert len(placed) == 5
  for step, batch in enumerate(placed):
    assert isinstance(batch["image"], jax.Array) and batch["image"].dtype == np.uint8
    assert batch["image"].sharding == parallel.batch_sharding(mesh)
    chex.assert_trees_all_equal(jax.device_get(batch), data.host_batch_at(ds, step, 8, seed=0))


def test_checkpointer_called_only_on_due_steps(toy_config, tmp_path, monkeypatch):
  toy_config.models = "score"
  toy_config.train.update({"steps": 23, "ckpt_every": 10, "log_every": 5})
  saves = []
  save = checkpoint.Checkpointer.save
  monkeypatch.setattr(checkpoint.Checkpointer, "save",
                      lambda self, step, tree, **kw: saves.append(step) or save(self, step, tree, **kw))
  train_job.train_and_evaluate(toy_config, str(tmp_path), progress=False)
  assert saves == [10, 20, 23]   # the due steps and the last, not a call per step


@pytest.mark.cpu_exact
def test_tfds_source_trains_through_grain_and_resumes_exactly(monkeypatch, tmp_path):
  import shutil
  import tempfile
  import tensorflow_datasets as tfds
  from configs import mnist
  from jaxguide import data
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))   # tfds.builder's leftover temp dirs
  monkeypatch.setattr(tfds_source, "_can_download", lambda *args, **kwargs: True)
  c = mnist.get_config("quick")
  c.models = "evaluator"
  c.data.update({"source": "tfds:mnist", "data_dir": str(tmp_path / "tfds")})
  c.evaluator.train.update({"steps": 6, "batch_size": 8, "ckpt_every": 3, "log_every": 3})
  opened = []
  open_split = data.open_split
  monkeypatch.setattr(data, "open_split", lambda *a, **k: opened.append(open_split(*a, **k)) or opened[-1])
  starts = []
  from jaxguide.training import run
  read_resumable = run.read_resumable
  monkeypatch.setattr(run, "read_resumable", lambda *a: starts.append(read_resumable(*a)) or starts[-1])
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  with tfds.testing.mock_data(num_examples=20):
    train_job.train_and_evaluate(c, straight, progress=False)        # checkpoints at 3 and 6
    shutil.copytree(straight, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "evaluator", "6"))
    train_job.train_and_evaluate(c, resumed, progress=False)         # steps 4..6 again, from 3
  assert len(opened) == 2 and all(isinstance(split, data.Records) for split in opened)   # lazy
  assert starts[0] is None and int(starts[1]["step"]) == 3   # the second run resumed at step 3
  a, b = final_tree(straight, "evaluator"), final_tree(resumed, "evaluator")
  assert int(a["step"]) == int(b["step"]) == 6
  chex.assert_trees_all_close(a, b, atol=1e-6, rtol=0)
