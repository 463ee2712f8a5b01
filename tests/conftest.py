"""Shared fixtures (tiny configs that train in seconds, one trained toy workdir) and the suite's
hermetic guard: no test reads the user's ~/.cache/jaxguide."""
import atexit
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# What a test needs it makes, or finds under JAXGUIDE_DATA (.ci/run points it at a fresh folder
# that it prepares). Unset, it becomes an empty folder of this session's, so a test that relies on
# a dataset or model prepared by hand fails here as it would on a fresh machine.
if not os.environ.get("JAXGUIDE_DATA"):
  os.environ["JAXGUIDE_DATA"] = tempfile.mkdtemp(prefix="jaxguide-test-data-")
  atexit.register(shutil.rmtree, os.environ["JAXGUIDE_DATA"], ignore_errors=True)
# One persistent XLA compilation cache per pytest run, inherited by every child interpreter and
# removed at exit: a test that builds a program another test (or process) already compiled, such
# as a fresh jit of the same network, loads the executable instead of compiling it again.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxguide-test-xla-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# XLA's backend at optimisation level 0, here and in every child interpreter (`xla_flags`): a third
# less compile time, most of the suite's time; nothing a test checks depends on how fast the
# generated code runs.
XLA_TEST_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{XLA_TEST_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a child interpreter with `devices` CPU devices."""
  return f"{XLA_TEST_FLAGS} --xla_force_host_platform_device_count={devices}"


USER_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "jaxguide")
_user_cache_reads: list[str] = []


def _audit(event: str, args: tuple) -> None:
  """Records every open or listing of a path inside the user's ~/.cache/jaxguide."""
  if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes)):
    path = os.fsdecode(args[0])
    if path.startswith(USER_CACHE) and os.path.abspath(path).startswith(USER_CACHE + os.sep):
      _user_cache_reads.append(path)


sys.addaudithook(_audit)


@pytest.fixture(autouse=True)
def _never_reads_the_user_cache():
  """Fails the test that opened or listed anything under ~/.cache/jaxguide."""
  del _user_cache_reads[:]
  yield
  if _user_cache_reads:
    pytest.fail(f"read {_user_cache_reads[0]}: tests use fabricated files, mnist5k or "
                "$JAXGUIDE_DATA, never the user's cache", pytrace=False)


def skip_or_fail(env: str, reason: str) -> None:
  """Skips the calling test (or module, at import) for `reason`; fails it instead where the
  variable `env` is 1, as CI sets it: there the missing piece is required, not optional."""
  if os.environ.get(env) == "1":
    pytest.fail(f"{reason} ({env}=1: required)", pytrace=False)
  pytest.skip(reason, allow_module_level=True)


BENCH_MISSING = "torch missing: pip install torch==2.13.0 then -e .[bench]"


def need_torch() -> None:
  """The bench extra's torch is importable, or the test skips (fails under JAXGUIDE_REQUIRE_BENCH=1).
  Looks the package up without importing it (seconds) for tests that run it in a subprocess."""
  import importlib.util
  if importlib.util.find_spec("torch") is None:
    skip_or_fail("JAXGUIDE_REQUIRE_BENCH", BENCH_MISSING)


@pytest.fixture
def toy_config():
  """toy2d with a tiny MLP and few steps: a whole score+classifier run takes seconds."""
  from configs import toy2d
  c = toy2d.get_config()
  c.train.update({"steps": 40, "batch_size": 64, "log_every": 10, "ckpt_every": 20,
                  "warmup_steps": 5, "schedule": "constant"})
  c.score.model.update({"hidden": 32, "depth": 2})
  c.classifier.model.update({"hidden": 32, "depth": 2})
  return c


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
  """A tiny toy2d workdir trained once for the session, in process: score, classifier and guide
  (autoguidance's weak network), 40 steps, checkpoints at 20 and 40. Read-only: a test that
  changes a workdir copies it first."""
  from configs import toy2d
  from jaxguide.cli import train_job
  c = toy2d.get_config()
  c.train.update({"steps": 40, "batch_size": 64, "log_every": 20, "ckpt_every": 20})
  c.score.model.update({"hidden": 32, "depth": 2})
  c.classifier.model.update({"hidden": 32, "depth": 2})
  c.models = "score,classifier,guide"
  c.sample.update({"steps": 10, "num_per_class": 4})
  workdir = str(tmp_path_factory.mktemp("toy_run") / "run")
  train_job.train_and_evaluate(c, workdir, progress=False)
  return workdir


def pytest_configure(config):
  # absltest helpers (create_tempdir) read absl flags; under pytest nobody parses them.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# Tests whose tolerances assume CPU float32 arithmetic (bit-exact resume, two implementations
# compared to 1e-5, 1 device == 8 devices) carry @pytest.mark.cpu_exact. On a GPU/TPU host each
# such test runs again in a child pytest pinned to the CPU backend (JAX_PLATFORMS=cpu), so that
# the suite passes there: TF32 matmuls or another reduction order would break the tolerances, not
# the code. On a CPU host they run in place. JAXGUIDE_PIN_TEST_SELF=1 takes the child path on
# the CPU too (tests/cpu_test.py checks the mechanism that way).
PIN_ENV = "JAXGUIDE_PIN_TEST_SELF"
PINNED_CHILD_ENV = "JAXGUIDE_PINNED_CHILD"


def _run_pinned(item) -> None:
  import subprocess
  env = {k: v for k, v in os.environ.items() if k != PIN_ENV}
  env.update({"JAX_PLATFORMS": "cpu", PINNED_CHILD_ENV: "1"})
  out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "",
                        item.nodeid], cwd=str(item.config.rootpath), env=env, capture_output=True,
                       text=True, timeout=1800)
  if out.returncode != 0:
    pytest.fail(f"{item.nodeid} on the CPU backend (child pytest):\n{out.stdout[-4000:]}",
                pytrace=False)
  print(f"[cpu_exact] {item.nodeid}: passed on the CPU backend in a child pytest")


def pytest_collection_modifyitems(config, items):
  for item in items:
    if item.get_closest_marker("cpu_exact") is None or os.environ.get(PINNED_CHILD_ENV):
      continue
    original = item.runtest

    def runtest(item=item, original=original):
      import jax
      if jax.default_backend() == "cpu" and not os.environ.get(PIN_ENV):
        return original()
      return _run_pinned(item)
    item.runtest = runtest
