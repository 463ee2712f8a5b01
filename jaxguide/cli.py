"""What train.py and sample.py share: absl flag parsing that turns bad input into one line and exit 2."""
from __future__ import annotations

import os
import re
import sys
from typing import Callable, Sequence

from absl import app, flags, logging

from jaxguide.errors import ConfigError

USAGE_EXIT = 2


def fail(message: str) -> None:
  """Prints one line on stderr and exits with code 2: bad input, nothing changed."""
  print(f"error: {message}", file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  # os._exit, not sys.exit: a failed orbax/tensorstore read can leave reads in flight whose
  # callbacks print tracebacks into stderr while the interpreter shuts down. Nothing is left to
  # flush or finalize here: every file the scripts write is complete (atomic) or not written.
  os._exit(USAGE_EXIT)


def check_args(argv: Sequence[str], workdir: str | None, hint: str) -> None:
  """Both scripts take flags only, and a --workdir."""
  if len(argv) > 1:
    fail(f"unexpected arguments {list(argv[1:])}: pass options as --name=value")
  if not workdir:
    fail(f"--workdir is required: {hint}, e.g. --workdir runs/mnist")


def one_line(message: str) -> str:
  """The line that says what went wrong: a config file's own error is the last line of the
  traceback text that ml_collections embeds in its message."""
  lines = [l.strip() for l in message.splitlines() if l.strip()]
  if not lines:
    return "invalid input"
  if any(l.startswith("Traceback") for l in lines):
    return f"{lines[0].split(':')[0]}: {lines[-1].split(': ', 1)[-1]}"
  return lines[0]


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's parser, with flag and config-file errors reported as one line (absl prints a page)."""
  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      flags.FLAGS.config.keys()   # config_flags loads lazily: make a missing file fail here
    return rest
  except (AttributeError, KeyError) as e:
    # An override of a field the config does not have; ml_collections suggests the near miss.
    near = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', str(e))
    if near:
      fail(f"--config.*.{near[2]}: the config has no field {near[2]!r}: did you mean {near[1]!r}?")
    field = re.sub(r"[^\w.]+", " ", str(e)).strip()
    fail(f"--config: unknown field {field}: check the name in the config file")
  except OSError as e:
    fail(f"--config: {one_line(str(e).splitlines()[-1].strip())}: give an existing config file")
  except (flags.Error, ValueError, ImportError, SyntaxError) as e:
    fail(one_line(str(e)) if str(e) else type(e).__name__)
  return []


CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def use_cpu_cores() -> None:
  """Splits the host CPU into one XLA device per core (a power of two, at most 8) unless
  XLA_FLAGS already says otherwise.

  XLA:CPU runs one program on a thread pool that leaves much of a 2-core machine idle during
  convolutions; with one device per core and the batch split over them (the same `data` mesh a
  multi-GPU host uses), a training step of the quick UNet ran 25 % faster and the classifier's
  70 % faster (docs/benchmarks.md). It changes nothing on GPU/TPU hosts: the flag only makes
  CPU devices, and jax uses the accelerator by default. Must run before jax starts its backend.
  """
  if CPU_DEVICES_FLAG in os.environ.get("XLA_FLAGS", ""):
    return
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  n = 1
  while n * 2 <= min(cores, 8):
    n *= 2
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_DEVICES_FLAG}={n}".strip()


# glibc's malloc backs its large blocks with transparent huge pages (2 MiB) where the kernel
# offers them on request (madvise mode).
GLIBC_MALLOC_TUNABLES = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _huge_pages_on_request() -> bool:
  """glibc >= 2.35 (the `hugetlb` tunable) and a kernel whose transparent huge pages are
  `madvise` (with `always` every block gets them already, with `never` none can). Asks the C
  library for its version (`confstr`), which costs nothing at start-up; elsewhere than Linux
  there is no such answer or no such file, and the answer is no."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()          # e.g. "glibc 2.36"
    major, minor = (int(v) for v in version.split(".")[:2])
    with open(THP_SETTING) as f:
      mode = f.read()
  except (AttributeError, OSError, ValueError):
    return False
  return name == "glibc" and (major, minor) >= (2, 35) and "[madvise]" in mode


def tune_host_malloc() -> None:
  """Re-executes this process once with GLIBC_TUNABLES=GLIBC_MALLOC_TUNABLES where that helps
  (Linux, glibc >= 2.35, transparent huge pages on request), unless GLIBC_TUNABLES is already
  set: any value, even empty, opts out.

  XLA:CPU allocates each execution's temporaries as one block (114 MB per device for the quick
  UNet's training step at batch 64) from its worker threads. glibc serves a block that large
  with a fresh mmap and unmaps it when it is freed, so every step faults all of it in again in
  4 KiB pages: 55,700 page faults and 110 ms of kernel time per step on the 2-core host. With
  glibc asking for huge pages the same block takes about 1,000 faults and 28 ms, and the step
  runs 236-242 -> 182 ms (docs/benchmarks.md); the classifier's step (26 MB, reused from
  glibc's heap) is unchanged. Results are bit-identical: only where the memory comes from changes.
  glibc reads the variable at start-up, hence the exec; call this before importing jax.
  Research code can set the variable in its own launcher instead.
  """
  if "GLIBC_TUNABLES" in os.environ or not sys.executable or not _huge_pages_on_request():
    return
  os.environ["GLIBC_TUNABLES"] = GLIBC_MALLOC_TUNABLES
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execv(sys.executable, sys.orig_argv)
  except OSError:               # cannot re-execute (an embedded interpreter): run as we are
    del os.environ["GLIBC_TUNABLES"]


def run(main: Callable[[list[str]], None]) -> None:
  """app.run with our parser; ConfigError from anywhere in main becomes one line and exit 2."""
  use_cpu_cores()
  def guarded(argv):
    logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
    try:
      main(argv)
    except ConfigError as e:
      fail(str(e))
  app.run(guarded, flags_parser=parse_flags)
