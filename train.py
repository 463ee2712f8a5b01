"""Trains the models a config lists (score, classifier, evaluator), resuming from --workdir.

  python train.py --config configs/mnist.py:quick --workdir runs/mnist [--config.train.steps=200]
"""
import json
import sys

from jaxguide import cli, cpu   # before jax: jaxguide loads lazily, so jax has not started yet

if __name__ == "__main__":
  cpu.tune_host_malloc()   # on a CPU host: re-executes with glibc backing XLA's per-step buffers by huge pages

import jax
from absl import flags
from ml_collections import config_flags

from jaxguide import config_lib, sample_lib, train_lib

config_flags.DEFINE_config_file("config", "configs/mnist.py:quick", "Config file, with :preset.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, figures. Resumed if it exists.")
flags.DEFINE_bool("progress", True, "Show tqdm progress bars.")
flags.DEFINE_bool("grids", True, "End with guided sample grids in WORKDIR/samples.")
flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() first (its "
                  "coordinator, process count and id come from the cluster's environment).")
flags.DEFINE_string("coordinator_address", None, "Multi-host without auto-detection: HOST:PORT of "
                    "process 0's coordinator (with --num_processes and --process_id).")
flags.DEFINE_integer("num_processes", None, "Multi-host: how many processes take part.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0 .. num_processes-1.")
FLAGS = flags.FLAGS


def main(argv):
  cli.check_args(argv, FLAGS.workdir, "the run folder (created, or resumed if it exists)")
  cli.start_distributed(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                        FLAGS.process_id)
  try:
    report = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
  except train_lib.Preempted as e:
    if jax.process_index() == 0:
      print(str(e), file=sys.stderr)
    sys.exit(0)
  except train_lib.Diverged as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if jax.process_index() != 0:   # several processes: process 0 alone samples, writes and prints
    return
  if FLAGS.grids and "score" in config_lib.model_names(FLAGS.config):   # the grids show this command's score network
    report["grids"] = sample_lib.final_grids(FLAGS.workdir)
  print(json.dumps(report, indent=2), file=sys.stdout)


if __name__ == "__main__":
  cli.run(main)
