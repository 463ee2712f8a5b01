"""What train.py and sample.py share: absl flag parsing that turns bad input into one line and exit 2."""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import app, flags, logging

from jaxguide.errors import ConfigError

USAGE_EXIT = 2


def fail(message: str) -> None:
  """Prints one line on stderr and exits with code 2: bad input, nothing changed."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(USAGE_EXIT)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's parser, with flag and config-file errors reported as one line (absl prints a page)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
  except (ConfigError, ValueError, ImportError, OSError, SyntaxError) as e:
    # A config file that fails to load (unknown preset, missing file) surfaces here.
    fail(str(e).splitlines()[0])
  return []


def run(main: Callable[[list[str]], None]) -> None:
  """app.run with our parser; ConfigError from anywhere in main becomes one line and exit 2."""
  def guarded(argv):
    logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
    try:
      main(argv)
    except ConfigError as e:
      fail(str(e))
  app.run(guarded, flags_parser=parse_flags)
