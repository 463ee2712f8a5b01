"""What train.py and sample.py share: absl flag parsing that turns bad input into one line and exit 2."""
from __future__ import annotations

import os
import re
import sys
from typing import Callable, Mapping, Sequence

from absl import app, flags, logging

from jaxguide import cluster, cpu
from jaxguide.errors import ConfigError

USAGE_EXIT = 2
# A run stopped by SIGTERM/SIGINT after saving its checkpoint: not done, resumable by the same
# command (sysexits' EX_TEMPFAIL), so `afterok` chains and wrappers do not take it for success.
PREEMPTED_EXIT = 75


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
  """The scripts take flags only, and a --workdir."""
  if len(argv) > 1:
    raise ConfigError(f"unexpected arguments {list(argv[1:])}: pass options as --name=value")
  if not workdir:
    raise ConfigError(f"--workdir is required: {hint}, e.g. --workdir runs/mnist")


def define_distributed_flags(fv: flags.FlagValues) -> None:
  """The multi-host flags train.py and sample.py take (read by `start_distributed`)."""
  flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() first (its "
                    "coordinator, process count and id come from the cluster's environment).", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "Multi-host without auto-detection: HOST:PORT of "
                      "process 0's coordinator (with --num_processes and --process_id).", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Multi-host: how many processes take part.", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0 .. num_processes-1.", flag_values=fv)
  flags.DEFINE_string("local_device_ids", None, "Multi-host: the devices this process drives, e.g. "
                      "0,1,2,3,4,5,6,7 for one process per node (default: jax's choice, one GPU "
                      "per task under SLURM); env JAXGUIDE_LOCAL_DEVICE_IDS.", flag_values=fv)
  flags.DEFINE_bool("single_process", False, "Run alone although the scheduler started several "
                    "tasks (each task its own job: give each its own --workdir).", flag_values=fv)


def distributed_args(coordinator_address: str | None, num_processes: int | None,
                     process_id: int | None) -> dict | None:
  """The explicit `jax.distributed.initialize` arguments, checked; None when none is given (then
  `--distributed` alone leaves them to the cluster's auto-detection). ConfigError when they are
  half given or out of range."""
  given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
           "--process_id": process_id}
  if all(v is None for v in given.values()):
    return None
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise ConfigError(f"{', '.join(missing)} missing: give --coordinator_address, --num_processes "
                      "and --process_id together, or --distributed alone for the cluster's "
                      "auto-detection")
  host, _, port = coordinator_address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(f"--coordinator_address={coordinator_address}: give HOST:PORT, e.g. "
                      "10.0.0.1:1234 (process 0's host)")
  if num_processes < 1:
    raise ConfigError(f"--num_processes={num_processes}: give at least 1")
  if not 0 <= process_id < num_processes:
    raise ConfigError(f"--process_id={process_id} is out of range for --num_processes="
                      f"{num_processes}: use 0 .. {num_processes - 1}")
  return {"coordinator_address": coordinator_address, "num_processes": num_processes,
          "process_id": process_id}


def start_distributed(f: flags.FlagValues, environ: Mapping[str, str] = os.environ) -> None:
  """`jax.distributed.initialize`, before jax's backend starts: with the explicit flags when
  given (checked first), else auto-detected under --distributed; otherwise nothing. A launch
  that would run wrong silently is refused first (`cluster.check_launch`)."""
  explicit = distributed_args(f.coordinator_address, f.num_processes, f.process_id)
  device_ids = cluster.parse_device_ids(f.local_device_ids or environ.get("JAXGUIDE_LOCAL_DEVICE_IDS"))
  cluster.check_launch(distributed=f.distributed, explicit=explicit is not None,
                       single_process=f.single_process, local_device_ids=device_ids,
                       environ=environ)
  if explicit is None and not f.distributed:
    if device_ids is not None:
      raise ConfigError("--local_device_ids is a multi-host option: add --distributed (or the "
                        "explicit --coordinator_address, --num_processes, --process_id)")
    return
  import jax
  jax.distributed.initialize(**(explicit or {}), local_device_ids=device_ids)


def leave_distributed() -> None:
  """Several processes refusing the same bad input: each leaves the coordination service in step
  (its shutdown waits for every process), so that process 0, whose exit takes the coordinator
  down, does not abort the others before they print their own line."""
  if "jax" in sys.modules and sys.modules["jax"].distributed.is_initialized():
    sys.modules["jax"].distributed.shutdown()


def one_line(message: str) -> str:
  """The line that says what went wrong: a config file's own error is the last line of the
  traceback text that ml_collections embeds in its message."""
  lines = [l.strip() for l in message.splitlines() if l.strip()]
  if not lines:
    return "invalid input"
  if any(l.startswith("Traceback") for l in lines):
    return f"{lines[0].split(':')[0]}: {lines[-1].split(': ', 1)[-1]}"
  return lines[0]


def parse(flag_values: flags.FlagValues, argv: Sequence[str]) -> list[str]:
  """absl's parser on `flag_values`, a flag or config-file error raised as a one-line ConfigError
  (absl prints a page). The scripts parse flags.FLAGS; tests parse their own FlagValues."""
  try:
    rest = flag_values(argv)
    if "config" in flag_values:
      flag_values.config.keys()   # config_flags loads lazily: make a missing file fail here
    return rest
  except (AttributeError, KeyError) as e:
    # An override of a field the config does not have; ml_collections suggests the near miss.
    near = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', str(e))
    if near:
      raise ConfigError(f"--config.*.{near[2]}: the config has no field {near[2]!r}: did you mean "
                        f"{near[1]!r}?") from None
    field = re.sub(r"[^\w.]+", " ", str(e)).strip()
    raise ConfigError(f"--config: unknown field {field}: check the name in the config file") from None
  except OSError as e:
    raise ConfigError(f"--config: {one_line(str(e).splitlines()[-1].strip())}: give an existing "
                      "config file") from None
  except (flags.Error, ValueError, ImportError, SyntaxError) as e:
    raise ConfigError(one_line(str(e)) if str(e) else type(e).__name__) from None


def parse_flags(argv: Sequence[str]) -> list[str]:
  """`parse` on flags.FLAGS for app.run: an error is one line on stderr and exit 2."""
  try:
    return parse(flags.FLAGS, argv)
  except ConfigError as e:
    fail(str(e))
  return []


def run(main: Callable[[list[str]], None]) -> None:
  """app.run with our parser; ConfigError from anywhere in main becomes one line and exit 2.
  On a CPU host the process first gets one XLA device per core (`cpu.split_host`)."""
  cpu.split_host()
  def guarded(argv):
    logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
    try:
      main(argv)
    except ConfigError as e:
      leave_distributed()
      fail(str(e))
  app.run(guarded, flags_parser=parse_flags)
