"""Trains the models a config lists (score, classifier, evaluator), resuming from --workdir.

  python train.py --config configs/mnist.py:quick --workdir runs/mnist [--config.train.steps=200]
"""
import json
import sys

from jaxguide import cli
from jaxguide import cpu

if __name__ == "__main__":
  cpu.tune_host_malloc()   # on a CPU host: re-executes with glibc backing XLA's per-step buffers by huge pages

import jax
from absl import flags
from ml_collections import config_flags

from jaxguide import config as config_lib
from jaxguide.cli import sample_output
from jaxguide.cli import train_job
from jaxguide import training

WORKDIR_HINT = "the run folder (created, or resumed if it exists)"


def define_flags(fv: flags.FlagValues, argv: list[str] | None = None) -> None:
  """train.py's flags on `fv`; `argv`: the command line whose --config.* overrides to define
  (default sys.argv, as ml_collections reads it)."""
  config_flags.DEFINE_config_file("config", "configs/mnist.py:quick", "Config file, with :preset.",
                                  lock_config=True, flag_values=fv, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, figures. Resumed if it "
                      "exists.", flag_values=fv)
  flags.DEFINE_bool("progress", True, "Show tqdm progress bars.", flag_values=fv)
  flags.DEFINE_bool("grids", True, "End with guided sample grids in WORKDIR/samples.", flag_values=fv)
  cli.define_distributed_flags(fv)


FLAGS = flags.FLAGS


def main(argv):
  cli.check_args(argv, FLAGS.workdir, WORKDIR_HINT)
  cli.start_distributed(FLAGS)
  try:
    with training.StopSignal() as stop:   # a signal stops training, evaluation or the grids
      report = train_job.train_and_evaluate(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress,
                                            stop=stop)
      if FLAGS.grids and "score" in config_lib.model_names(FLAGS.config):   # this command's score network
        # Several processes: each samples its share on the global mesh; process 0 writes.
        report["grids"] = sample_output.final_grids(FLAGS.workdir, stop=stop)
  except training.Preempted as e:
    if jax.process_index() == 0:
      print(str(e), file=sys.stderr)
    sys.exit(cli.PREEMPTED_EXIT)
  except training.Diverged as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if jax.process_index() == 0:   # several processes: process 0 alone prints
    print(json.dumps(report, indent=2), file=sys.stdout)


if __name__ == "__main__":
  define_flags(FLAGS)
  cli.run(main)
