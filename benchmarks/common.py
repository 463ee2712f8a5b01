"""What the scripts in benchmarks/ share: this checkout on sys.path, absl's flag parsing with bad
input refused in one line, the environment of a child process on XLA:CPU, JSON output, and the
wall time of a call.

A script run as `python benchmarks/X.py` has benchmarks/ first on sys.path and imports this as
`common`; importing it puts the repository root (ROOT) first on sys.path, so that jaxguide, configs
and benchmarks come from this checkout.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from jaxguide import cli, cpu
from jaxguide.errors import ConfigError


# --------------------------------------------------------------------------- flags


def usage_error(message: str) -> NoReturn:
  """Refuses bad command-line input as train.py does (`cli.fail`): one line on stderr, exit 2."""
  cli.fail(message)


def run(main: Callable[[list[str]], Any], positional: bool = False) -> None:
  """app.run(main) on flags.FLAGS, a bad flag refused by `usage_error`. Unless `positional`, an
  argument that is not a flag is refused too; else main gets them as argv[1:]."""
  def parse(argv: list[str]) -> list[str]:
    try:
      rest = cli.parse(flags.FLAGS, argv)
    except ConfigError as e:
      usage_error(str(e))
    if len(rest) > 1 and not positional:
      usage_error(f"unexpected arguments {rest[1:]}: pass options as --name=value")
    return rest
  app.run(main, flags_parser=parse)


# --------------------------------------------------------------------------- child processes


def xla_flags(devices: int) -> str:
  """This process's XLA_FLAGS with the host split into `devices` XLA CPU devices: a device count
  already there is replaced, the other flags stay."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(cpu.CPU_DEVICES_FLAG)]
  return " ".join(kept + [f"{cpu.CPU_DEVICES_FLAG}={devices}"])


def cpu_env(devices: int | None = None) -> dict[str, str]:
  """The environment for a child process on XLA:CPU: this one's with JAX_PLATFORMS=cpu and, given
  `devices`, that many XLA devices (the count is fixed when a process starts its backend)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  if devices is not None:
    env["XLA_FLAGS"] = xla_flags(devices)
  return env


# --------------------------------------------------------------------------- output


def print_record(record: dict, label: str | None = None) -> None:
  """One record as a JSON line on stdout (after `label` where given), flushed at once so that a
  run cut short has printed what it measured."""
  print(*([label] if label is not None else []), json.dumps(record), flush=True)


def write_json(path: str | None, data: Any, indent: int = 2, **dump_kw: Any) -> None:
  """`data` as JSON at `path` (a --json flag; nothing when it is empty), written through a
  temporary name so that the file is always complete."""
  if path:
    from jaxguide.training.checkpoint import atomic_write_text   # orbax: only when writing
    atomic_write_text(path, json.dumps(data, indent=indent, **dump_kw))


# --------------------------------------------------------------------------- timing


def timed(call: Callable[..., Any], *args: Any) -> tuple[Any, float]:
  """call(*args)'s result and its wall seconds (a compile, a first step)."""
  start = time.perf_counter()
  out = call(*args)
  return out, time.perf_counter() - start


def timed_runs(call: Callable[[], Any], runs: int, warmup: int = 1) -> list[float]:
  """Wall seconds of each of `runs` calls, after `warmup` untimed ones. `call` must return only
  once its work is done (jax.block_until_ready)."""
  for _ in range(warmup):
    call()
  return [timed(call)[1] for _ in range(runs)]
