"""What train.py's agreed stop costs per step with several processes: one call of
`multihost_utils.reached_preemption_sync_point`, which `training.loop.StopSignal.due` makes every step.

  python benchmarks/preemption_check.py [--calls 100000]

Starts 2 processes on 127.0.0.1 (jax.distributed on the CPU, as tests/multiprocess_test.py does);
each times `calls` back-to-back calls with no preemption pending (the state every step but the
last is in) and prints µs per call. The last line is `sync_point_us=N`, the slower process's.
"""
import socket
import subprocess
import sys
import time

import common
from absl import flags


def worker(port: int, process_id: int, calls: int) -> None:
  import jax
  from jax.experimental import multihost_utils
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id)
  start = time.perf_counter()
  for i in range(1, calls + 1):
    multihost_utils.reached_preemption_sync_point(i)
  print(f"{(time.perf_counter() - start) / calls * 1e6:.3f}", flush=True)
  jax.distributed.shutdown()


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("calls", 100_000, "Timed calls per process.", flag_values=fv)
  # Set by the script itself for the 2 processes it starts.
  flags.DEFINE_integer("port", None, "Internal: the coordinator's port.", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "Internal: this worker's process id.", flag_values=fv)


FLAGS = flags.FLAGS


def main(argv) -> None:
  del argv
  if FLAGS.process_id is not None:
    return worker(FLAGS.port, FLAGS.process_id, FLAGS.calls)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, __file__, f"--calls={FLAGS.calls}", f"--port={port}",
                             f"--process_id={i}"], env=common.cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True) for i in range(2)]
  try:
    times = [float(p.communicate(timeout=300)[0].split()[-1]) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, t in enumerate(times):
    print(f"process {i}: {t:.3f} us per reached_preemption_sync_point call ({FLAGS.calls} calls)")
  print(f"sync_point_us={max(times):.3f}")


if __name__ == "__main__":
  define_flags(FLAGS)
  common.run(main)
