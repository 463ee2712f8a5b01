"""Everything jaxguide does only because it runs on XLA:CPU, in one place.

The rest of the library asks `enabled()` ("on the CPU?") and gets the plain JAX/flax code path
everywhere else:

  conv_general_dilated  every network convolution: on the CPU with an input gradient that stays a
                        canonical convolution inside `lax.scan` (models/conv.py), elsewhere lax's
  group_norm_impl       GroupNorm's statistics as dots on the CPU, as reductions elsewhere
  split_host            one XLA CPU device per core (the scripts, before jax starts)
  tune_host_malloc      glibc huge pages for XLA:CPU's large per-step buffers (the scripts, before
                        jax starts; re-executes the interpreter once)

Why and by how much each helps: docs/benchmarks.md, "XLA:CPU workarounds" and "Training
throughput". `force()` selects either path on any backend, so that tests check both on the CPU.

Nothing here imports jax at module level: the two process set-ups run before jax starts.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
from typing import Any, Iterator, Optional

_forced: Optional[bool] = None


def enabled() -> bool:
  """Whether the CPU code paths apply: jax's default backend is the CPU, unless `force` says."""
  if _forced is not None:
    return _forced
  import jax
  return jax.default_backend() == "cpu"


@contextlib.contextmanager
def force(on: Optional[bool]) -> Iterator[None]:
  """Within the block (at trace time), the CPU paths are used (True), not used (False), or chosen
  by the backend (None). For tests and measurements; jit caches what it traced, so trace anew."""
  global _forced
  before, _forced = _forced, on
  try:
    yield
  finally:
    _forced = before


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, with conv.py's input-gradient rule on the CPU (flax's
  `nn.Conv(conv_general_dilated=...)` hook). Same values on both paths."""
  from jax import lax

  from jaxguide.models import conv
  fn = conv.conv_general_dilated if enabled() else lax.conv_general_dilated
  return fn(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type)


def group_norm_impl() -> str:
  """"dots" on the CPU (models.layers.GroupNorm's statistics as matrix products), else "reduce"."""
  return "dots" if enabled() else "reduce"


# ---------------------------------------------------------------------------------------------
# Process set-up, before jax starts.

ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                       "jax_rocm7_plugin")


def accelerator_plugins() -> list[str]:
  """The jax accelerator plugins installed (PJRT plugins, libtpu, a CUDA jaxlib), found without
  importing jax or them."""
  found = [m for m in ACCELERATOR_MODULES if importlib.util.find_spec(m) is not None]
  spec = importlib.util.find_spec("jax_plugins")          # jax's namespace package for plugins
  if spec is not None and spec.submodule_search_locations:
    found += [f"jax_plugins.{m.name}" for m in pkgutil.iter_modules(spec.submodule_search_locations)]
  found += [f"entry point {e.name}" for e in importlib.metadata.entry_points(group="jax_plugins")]
  try:
    if "+cuda" in importlib.metadata.version("jaxlib") or "+rocm" in importlib.metadata.version("jaxlib"):
      found.append("jaxlib (CUDA/ROCm build)")
  except importlib.metadata.PackageNotFoundError:
    pass
  return sorted(set(found))


def backend_will_be_cpu(environ: Optional[dict] = None) -> bool:
  """Before jax starts: will its default backend be the CPU? JAX_PLATFORMS (or the older
  JAX_PLATFORM_NAME) decides when set (its first entry); otherwise yes exactly when no accelerator
  plugin is installed. A plugin installed on a host without its hardware reads as "no": the CPU
  set-up is then skipped, which only costs CPU speed."""
  env = os.environ if environ is None else environ
  platforms = env.get("JAX_PLATFORMS") or env.get("JAX_PLATFORM_NAME") or ""
  if platforms.strip():
    return platforms.split(",")[0].strip().lower() == "cpu"
  return not accelerator_plugins()


CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def split_host() -> None:
  """On a CPU host: one XLA device per core (a power of two, at most 8), unless XLA_FLAGS already
  says how many. XLA:CPU's one thread pool leaves cores idle in the convolutions; with the batch
  split over one device per core (the `data` mesh a multi-GPU host uses) all of them work
  (docs/benchmarks.md, "Training throughput"). Does nothing where the backend will be an
  accelerator. Must run before jax starts its backend."""
  if CPU_DEVICES_FLAG in os.environ.get("XLA_FLAGS", "") or not backend_will_be_cpu():
    return
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  n = 1
  while n * 2 <= min(cores, 8):
    n *= 2
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_DEVICES_FLAG}={n}".strip()


def one_step_in_flight(mesh: Any) -> bool:
  """Whether a training loop must wait for each step before dispatching the next: on the CPU with
  several devices. There, two data-parallel steps in flight (jax's asynchronous dispatch) can
  leave a step's gradient all-reduce waiting for a device whose thread the next step holds: XLA
  then aborts the process after its 40-second rendezvous timeout ("Termination timeout for `all
  reduce`"). The wait costs little speed (docs/benchmarks.md, "One training step in flight").
  Accelerators keep their asynchronous dispatch."""
  return enabled() and mesh.devices.size > 1


# glibc's malloc backs its large blocks with transparent huge pages (2 MiB) where the kernel
# offers them on request (madvise mode).
GLIBC_MALLOC_TUNABLES = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
_REEXEC_MARK = "JAXGUIDE_MALLOC_REEXEC"   # set only across the one re-execution


def huge_pages_on_request() -> bool:
  """glibc >= 2.35 (the `hugetlb` tunable) and transparent huge pages in `madvise` mode (with
  `always` every block gets them already, with `never` none can). Elsewhere than Linux: no."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()          # e.g. "glibc 2.36"
    major, minor = (int(v) for v in version.split(".")[:2])
    with open(THP_SETTING) as f:
      mode = f.read()
  except (AttributeError, OSError, ValueError):
    return False
  return name == "glibc" and (major, minor) >= (2, 35) and "[madvise]" in mode


def can_reexecute() -> bool:
  """A launch that runs the same way twice: a script file or `python -m module` (sys.argv[0] is
  then the file), not `python -c CODE`, stdin, or an interactive or embedded interpreter."""
  argv0 = sys.argv[0] if sys.argv else ""
  return bool(sys.executable and getattr(sys, "orig_argv", None) and argv0 not in ("", "-", "-c")
              and os.path.isfile(argv0))


def tune_host_malloc(*, children: bool = False) -> None:
  """Re-executes this process once with GLIBC_TUNABLES=GLIBC_MALLOC_TUNABLES, where all of these
  hold: the backend will be the CPU, glibc and the kernel offer huge pages on request, the launch
  can be re-executed (`can_reexecute`), and GLIBC_TUNABLES is not set (any value, even empty,
  opts out). Call it first thing, before importing jax: glibc reads the variable at start-up.

  XLA:CPU allocates each execution's temporaries as one large block, which glibc maps afresh and
  faults in 4 KiB at a time on every step; huge pages remove most of those faults
  (docs/benchmarks.md, "Huge pages for XLA's per-step buffers"). Results are bit-identical. The
  re-executed process drops the variable from its environment again, so processes it starts do
  not inherit it, unless `children` is True (benchmarks that time child processes under the same
  set-up)."""
  if os.environ.pop(_REEXEC_MARK, None) is not None:   # we are the re-executed process
    if not children:
      os.environ.pop("GLIBC_TUNABLES", None)
    return
  if ("GLIBC_TUNABLES" in os.environ or not can_reexecute() or not backend_will_be_cpu()
      or not huge_pages_on_request()):
    return
  os.environ["GLIBC_TUNABLES"] = GLIBC_MALLOC_TUNABLES
  os.environ[_REEXEC_MARK] = "1"
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execv(sys.executable, sys.orig_argv)
  except OSError:               # cannot re-execute after all: run as we are
    del os.environ["GLIBC_TUNABLES"], os.environ[_REEXEC_MARK]

