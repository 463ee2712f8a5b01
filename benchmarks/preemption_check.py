"""What train.py's agreed stop costs per step with several processes: one call of
`multihost_utils.reached_preemption_sync_point`, which `training.loop.StopSignal.due` makes every step.

  python benchmarks/preemption_check.py [--calls 100000]

Starts 2 processes on 127.0.0.1 (jax.distributed on the CPU, as tests/multiprocess_test.py does);
each times `calls` back-to-back calls with no preemption pending (the state every step but the
last is in) and prints µs per call. The last line is `sync_point_us=N`, the slower process's.
"""
import argparse
import os
import socket
import subprocess
import sys
import time


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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--calls", type=int, default=100_000)
  parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--process_id", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.process_id is not None:
    return worker(args.port, args.process_id, args.calls)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, __file__, f"--calls={args.calls}", f"--port={port}",
                             f"--process_id={i}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True) for i in range(2)]
  try:
    times = [float(p.communicate(timeout=300)[0].split()[-1]) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, t in enumerate(times):
    print(f"process {i}: {t:.3f} us per reached_preemption_sync_point call ({args.calls} calls)")
  print(f"sync_point_us={max(times):.3f}")


if __name__ == "__main__":
  main()
