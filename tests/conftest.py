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
