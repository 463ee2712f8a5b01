"""Trains the models a config lists (score, classifier, evaluator), resuming from --workdir.

  python train.py --config configs/mnist.py:quick --workdir runs/mnist [--config.train.steps=200]
"""
import json
import sys

from absl import flags
from ml_collections import config_flags

from jaxguide import cli, sample_lib, train_lib

config_flags.DEFINE_config_file("config", "configs/mnist.py:quick", "Config file, with :preset.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, figures. Resumed if it exists.")
flags.DEFINE_bool("progress", True, "Show tqdm progress bars.")
flags.DEFINE_bool("grids", True, "End with guided sample grids in WORKDIR/samples.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}: pass options as --name=value")
  if not FLAGS.workdir:
    cli.fail("--workdir is required: e.g. --workdir runs/mnist")
  report = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
  if FLAGS.grids and "score" in report:
    report["grids"] = sample_lib.final_grids(FLAGS.workdir)
  print(json.dumps(report, indent=2), file=sys.stdout)


if __name__ == "__main__":
  cli.run(main)
