"""train.py on bad input: one line naming the field, the workdir untouched. The table runs in
process against the checks train.py calls (flag parsing, `training.prepare`); two commands keep
the end-to-end contract (exit code 2, one line on stderr, nothing written)."""
import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from absl import flags
import pytest

import conftest
from jaxguide import cli
from jaxguide import training
from jaxguide.errors import ConfigError

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


def script_flags(script: str, argv: list[str]) -> flags.FlagValues:
  """The flags of train.py, sample.py or diagnose.py, defined on a fresh FlagValues and parsed from
  `argv` as the script parses them (a ConfigError where the script would exit 2)."""
  module, argv = __import__(script), [f"{script}.py", *argv]
  fv = flags.FlagValues()
  if script == "train":
    module.define_flags(fv, argv)   # config_flags defines the --config.* overrides argv names
  else:
    module.define_flags(fv)
  rest = cli.parse(fv, argv)
  cli.check_args(rest, fv.workdir, module.__dict__.get("WORKDIR_HINT", "a workdir"))
  return fv


def refusal(check: Callable[[], object]) -> str:
  """The one-line message of the ConfigError `check()` raises (it must raise one)."""
  with pytest.raises(ConfigError) as e:
    check()
  message = str(e.value)
  assert message and "\n" not in message, message
  return message


def train_refusal(argv: list[str]) -> str:
  """What train.py would print after 'error: ' for `argv`, checked in process."""
  def check():
    fv = script_flags("train", argv)
    training.prepare(fv.config, fv.workdir)
  return refusal(check)


def sample_refusal(argv: list[str]) -> str:
  """What sample.py would print after 'error: ' for `argv`, checked in process."""
  from jaxguide.cli import sample_request
  def check():
    fv = script_flags("sample", argv)
    sample_request.load_request(fv.workdir, sample_request.request_from_flags(fv), dtype=fv.dtype)
  return refusal(check)


def diagnose_refusal(argv: list[str]) -> str:
  """What diagnose.py would print after 'error: ' for `argv`, checked in process."""
  return refusal(lambda: __import__("diagnose").check(script_flags("diagnose", argv)))


def copy_without(workdir, tmp_path, model):
  """A copy of a trained workdir with one model's checkpoints removed."""
  copy = str(tmp_path / f"no_{model}")
  shutil.copytree(workdir, copy)
  shutil.rmtree(os.path.join(copy, "checkpoints", model))
  return copy


TOY = f"--config={os.path.join(ROOT, 'configs', 'toy2d.py')}"
BAD_TRAIN = [
    ("unknown source", ["--config.data.source=mnist6k"], "data.source"),
    ("missing idx", ["--config.data.source=idx:/nonexistent/fashion"], "idx"),
    ("beta order", ["--config.sde.beta_min=20.0"], "beta_min"),
    ("zero steps", ["--config.train.steps=0"], "train.steps"),
    ("negative batch", ["--config.train.batch_size=-4"], "batch_size"),
    ("unknown model", ["--config.models=score,critic"], "models"),
    ("bad preset", [f"--config={os.path.join(ROOT, 'configs', 'mnist.py')}:huge"], "preset"),
    ("unknown flag", ["--sampler=foo"], "sampler"),
    ("bad dtype", ["--config.train.dtype=float8"], "dtype"),
    ("bad sample dtype", ["--config.sample.dtype=float16"], "sample.dtype"),
    ("bad interval", ["--config.sample.interval=(0.7, 0.2)"], "sample.interval"),
    ("unknown field", ["--config.train.stepz=3"], "steps"),
    ("bad value", ["--config.train.steps=abc"], "train.steps"),
    ("no config file", ["--config=configs/nothere.py"], "nothere.py"),
    ("bad p_uncond", ["--config.score.p_uncond=1.5"], "p_uncond"),
    ("too many devices", ["--config.train.num_devices=9"], "num_devices"),
    ("stray argument", ["extra"], "unexpected arguments"),
]


@pytest.mark.parametrize("case,args,needle", BAD_TRAIN, ids=[c[0] for c in BAD_TRAIN])
def test_bad_train_input(case, args, needle, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("a researcher's file")
  before = tree_hash(str(workdir))
  config = [] if case in ("bad preset", "no config file") else [TOY]
  message = train_refusal([*config, f"--workdir={workdir}", *args])
  assert needle in message, message
  assert tree_hash(str(workdir)) == before


def test_missing_workdir_flag():
  assert "--workdir is required" in refusal(lambda: script_flags("train", [TOY]))


def test_bad_train_input_end_to_end(tmp_path):
  """The script itself: exit 2, one line on stderr, the workdir as it was (8 devices that do not
  divide the batch: a check that needs the devices the script sets up)."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("a researcher's file")
  before = tree_hash(str(workdir))
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": conftest.xla_flags(8)}
  out = subprocess.run([sys.executable, "train.py", "--config=configs/toy2d.py",
                        f"--workdir={workdir}", "--config.train.batch_size=12"], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=120)
  assert_one_line_error(out, "divisible")
  assert tree_hash(str(workdir)) == before


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "afile"
  blocker.write_text("x")
  out = subprocess.run([sys.executable, "train.py", "--config=configs/toy2d.py",
                        f"--workdir={blocker}/run"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
  assert "--workdir" in out.stderr and blocker.read_text() == "x"


def test_unprepared_mnist_names_the_prepare_command(tmp_path):
  """CI's promise: under an empty JAXGUIDE_DATA the full MNIST is absent, and train.py says how to
  prepare it in one line (exit 2) instead of reading a folder prepared by hand."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXGUIDE_DATA": str(tmp_path / "empty")}
  out = subprocess.run([sys.executable, "train.py", f"--workdir={tmp_path / 'run'}",
                        "--config=configs/mnist.py:quick", "--config.data.source=mnist"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
  assert_one_line_error(out, "python -m jaxguide.prepare mnist")
  assert str(tmp_path / "empty") in out.stderr and not (tmp_path / "run").exists()


def test_the_suite_never_reads_the_user_cache():
  """conftest's guard sees an open under ~/.cache/jaxguide (the test it happens in fails)."""
  import conftest
  path = os.path.join(conftest.USER_CACHE, "mnist", "train-images-idx3-ubyte")
  try:
    open(path, "rb").close()
  except OSError:
    pass
  assert conftest._user_cache_reads == [path]   # pylint: disable=protected-access
  conftest._user_cache_reads.clear()            # pylint: disable=protected-access
  assert os.environ["JAXGUIDE_DATA"] and not os.environ["JAXGUIDE_DATA"].startswith(conftest.USER_CACHE)
