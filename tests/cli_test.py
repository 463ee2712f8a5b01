"""train.py on bad input: one line on stderr naming the field, exit code 2, the workdir untouched."""
import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_hash(path):
  """Hash of every file name and content under path (or of its absence)."""
  if not os.path.exists(path):
    return "absent"
  h = hashlib.sha256()
  for base, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(base, name)
      h.update(full.encode())
      with open(full, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


def run_concurrently(jobs, workers=2):
  """{key: fn()} for {key: fn}, `workers` at a time. A script refusing bad input spends most of its
  seconds in one core's Python imports, so on 2 cores two at once halve a table's wall time."""
  with ThreadPoolExecutor(workers) as pool:
    futures = {key: pool.submit(fn) for key, fn in jobs.items()}
    return {key: f.result() for key, f in futures.items()}


def assert_one_line_error(res, needle):
  """A script refused bad input: exit code 2, one stderr line naming `needle`, no traceback."""
  lines = [l for l in res.stderr.splitlines() if l.strip()]
  assert res.returncode == 2, res.stderr[-3000:]
  assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
  assert needle in lines[0], lines[0]


def copy_without(workdir, tmp_path, model):
  """A copy of a trained workdir with one model's checkpoints removed."""
  copy = str(tmp_path / f"no_{model}")
  shutil.copytree(workdir, copy)
  shutil.rmtree(os.path.join(copy, "checkpoints", model))
  return copy


BAD_TRAIN = [
    ("unknown source", ["--config.data.source=mnist6k"], "data.source"),
    ("missing idx", ["--config.data.source=idx:/nonexistent/fashion"], "idx"),
    ("beta order", ["--config.sde.beta_min=20.0"], "beta_min"),
    ("zero steps", ["--config.train.steps=0"], "train.steps"),
    ("negative batch", ["--config.train.batch_size=-4"], "batch_size"),
    ("indivisible batch", ["--config.train.batch_size=12"], "divisible"),
    ("unknown model", ["--config.models=score,critic"], "models"),
    ("bad preset", ["--config=configs/mnist.py:huge"], "preset"),
    ("unknown flag", ["--sampler=foo"], "sampler"),
    ("bad dtype", ["--config.train.dtype=float8"], "dtype"),
    ("bad sample dtype", ["--config.sample.dtype=float16"], "sample.dtype"),
    ("bad interval", ["--config.sample.interval=(0.7, 0.2)"], "sample.interval"),
    ("unknown field", ["--config.train.stepz=3"], "steps"),
    ("bad value", ["--config.train.steps=abc"], "train.steps"),
    ("no config file", ["--config=configs/nothere.py"], "nothere.py"),
    ("bad p_uncond", ["--config.score.p_uncond=1.5"], "p_uncond"),
    ("too many devices", ["--config.train.num_devices=9"], "num_devices"),
]


@pytest.fixture(scope="module")
def bad_train_results(tmp_path_factory):
  """Every BAD_TRAIN command, each on its own workdir holding a researcher's file, two at a time:
  {case: (workdir, its hash before, the finished process)}."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  base = tmp_path_factory.mktemp("bad_train")
  workdirs, jobs = {}, {}
  for i, (case, args, _) in enumerate(BAD_TRAIN):
    workdir = base / f"case{i}" / "run"
    workdir.mkdir(parents=True)
    (workdir / "notes.txt").write_text("a researcher's file")
    workdirs[case] = (workdir, tree_hash(str(workdir)))
    cmd = [sys.executable, "train.py", "--config=configs/toy2d.py", f"--workdir={workdir}", *args]
    if case in ("bad preset", "no config file"):
      cmd = [sys.executable, "train.py", *args, f"--workdir={workdir}"]
    jobs[case] = lambda cmd=cmd: subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                                env=env, timeout=120)
  done = run_concurrently(jobs)
  return {case: (*workdirs[case], done[case]) for case in jobs}


@pytest.mark.parametrize("case,args,needle", BAD_TRAIN, ids=[c[0] for c in BAD_TRAIN])
def test_bad_train_input(case, args, needle, bad_train_results):
  workdir, before, out = bad_train_results[case]
  assert_one_line_error(out, needle)
  assert tree_hash(str(workdir)) == before


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "afile"
  blocker.write_text("x")
  out = subprocess.run([sys.executable, "train.py", "--config=configs/toy2d.py",
                        f"--workdir={blocker}/run"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
  assert "--workdir" in out.stderr and blocker.read_text() == "x"
