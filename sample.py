"""Guided samples from a trained workdir: every scale of --scale in one compiled call.

  python sample.py --workdir runs/mnist --guidance cfg --scale 1,3,5 --sampler ddim --steps 100 \
                   --num_per_class 8 --out runs/mnist/samples [--gif] [--evaluate]

Writes samples.npz (image float32 in [-1, 1] (N, H, W, C), label, scale), one PNG grid per scale
(classes as rows), with --gif the denoising trajectory, with --evaluate report.json and report.md.
"""
import json
import os
import sys

import jax
import numpy as np
from absl import flags

from jaxguide import cli, pipeline, sample_lib

flags.DEFINE_string("workdir", None, "A folder trained by train.py.")
flags.DEFINE_enum("guidance", "cfg", list(pipeline.GUIDANCES), "none | classifier | cfg | both.")
flags.DEFINE_string("scale", None, "Guidance scale, or a comma list (all in one compiled call). "
                    "Default: the config's sample.cfg_scale / sample.clf_scale.")
flags.DEFINE_float("clf_scale", None, "With --guidance both: the classifier scale (--scale is CFG's).")
flags.DEFINE_string("sampler", None, "euler_maruyama | pc | ode_heun | ddpm | ddim | dpmpp_2m.")
flags.DEFINE_integer("steps", None, "Sampling steps (default: the config's sample.steps).")
flags.DEFINE_integer("num_per_class", None, "Samples per label and scale.")
flags.DEFINE_string("labels", None, "Comma list of class indices (default: every class).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/samples).")
flags.DEFINE_bool("gif", False, "Also write a GIF of the denoising trajectory.")
flags.DEFINE_bool("evaluate", False, "Judge the samples with the workdir's evaluator: report.json/.md.")
flags.DEFINE_bool("guide_conditional", False, "Classifier guidance on ε(x,t,y) instead of ε(x,t,∅).")
flags.DEFINE_float("eta", None, "ddim: stochasticity η (0 = deterministic).")
flags.DEFINE_float("snr", None, "pc: Langevin corrector signal-to-noise ratio.")
flags.DEFINE_float("clip_x0", None, "Clip x̂₀ to [-c, c] at every step.")
flags.DEFINE_float("rescale", 0.0, "CFG rescale φ in [0, 1].")
flags.DEFINE_string("interval", None, "Guide only for t in 'lo,hi'.")
flags.DEFINE_integer("batch_size", 1000, "Samples per compiled call.")
FLAGS = flags.FLAGS


def main(argv):
  cli.check_args(argv, FLAGS.workdir, "the folder train.py wrote")
  request = sample_lib.request_from_flags(FLAGS)
  run = pipeline.load_run(FLAGS.workdir)
  request = sample_lib.complete_request(request, run)
  out = sample_lib.prepare_out(FLAGS.out or os.path.join(FLAGS.workdir, "samples"))
  summary = sample_lib.sample_and_write(run, request, out)
  print(json.dumps(summary, indent=2), file=sys.stdout)


if __name__ == "__main__":
  cli.run(main)
