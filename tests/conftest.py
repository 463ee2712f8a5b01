"""Shared fixtures: tiny configs that train in seconds."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


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
