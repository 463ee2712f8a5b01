"""Guided samples from a trained workdir: each guidance kind samples all its scales in one compiled call.

  python sample.py --workdir runs/mnist --guidance cfg --scale 1,3,5 --sampler ddim --steps 100 \
                   --num_per_class 8 --out runs/mnist/samples [--gif] [--evaluate]

A sweep of several guidance kinds, each with its own scales, in one command:

  python sample.py --workdir runs/mnist --guidance cfg,classifier \
                   --scale cfg=0,1,3,5,7,9 --scale classifier=0,4,8,16,32,64 --evaluate

--scale takes LIST (every kind in --guidance without a list of its own) or KIND=LIST, and repeats;
without --guidance the kinds are those --scale names (else cfg); a kind without scales takes the
config's sample.cfg_scale (classifier: sample.clf_scale).

Sampling stops at the score network's training t_eps; the time grid (--spacing) and x̂₀ clipping
(--clip_x0, on at 1 for the image presets, off for toy2d) default to the config's sample block.

A workdir trained on text (configs/mnist_text.py) samples prompts instead of labels:

  python sample.py --workdir runs/mnist_text --prompt "a handwritten seven" --prompt "number two" \
                   --scale 1,3,5 --num_per_class 8 [--negative_prompt "the digit 1"] [--evaluate]

Writes samples.npz (image float32 in [-1, 1] (N, H, W, C), clipped there unless --raw, toy2d points
never clipped; label, scale, guidance, and for prompts `prompt`, `label` the class it names),
one PNG grid per kind and scale (classes or prompts as rows), with
--gif the denoising trajectory of each kind's first scale, and with --evaluate report.json,
report.md (one row per kind × scale: accuracy, worst class, Fréchet distance beside its
train-vs-test floor and noise ceiling, diversity) and sweep.png.

On several hosts, the same command on each with --coordinator_address HOST:PORT --num_processes N
--process_id I (or --distributed under SLURM / on a TPU pod): every process samples its share of
each batch on the global mesh, process 0 alone writes and prints, and the files are those one
process writes for the same arguments.
"""
import json
import os
import sys

from jaxguide import cli
from jaxguide import cpu

if __name__ == "__main__":
  cpu.tune_host_malloc()   # on a CPU host: re-executes with glibc backing XLA's per-step buffers by huge pages

from absl import flags

from jaxguide import parallel
from jaxguide.guidance import registry
from jaxguide.cli import sample_output
from jaxguide.cli import sample_request

WORKDIR_HINT = "the folder train.py wrote"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "A folder trained by train.py.", flag_values=fv)
  flags.DEFINE_string("guidance", None, f"{' | '.join(registry.NAMES)}, or a comma list of them "
                      "to sweep, e.g. cfg,classifier. Default: the kinds --scale names, else cfg.",
                      flag_values=fv)
  flags.DEFINE_multi_string("scale", None, "LIST: scales for every --guidance kind without its own, "
                            "e.g. 1,3,5; KIND=LIST: one kind's scales, e.g. classifier=0,4,8 (repeat "
                            "--scale per kind). Each kind samples all its scales in one compiled call. "
                            "Default: the config's sample.cfg_scale / sample.clf_scale.",
                            flag_values=fv)
  flags.DEFINE_float("clf_scale", None, "With --guidance both: the classifier scale (--scale is CFG's).",
                     flag_values=fv)
  flags.DEFINE_string("sampler", None, "euler_maruyama | pc | ode_heun | ddpm | ddim | dpmpp_2m.",
                      flag_values=fv)
  flags.DEFINE_integer("steps", None, "Sampling steps (default: the config's sample.steps).",
                       flag_values=fv)
  flags.DEFINE_string("spacing", None, "Time grid: linear (uniform in t) | logsnr (uniform in "
                      "log(α²/σ²)) | karras (uniform in σ̃^(1/ρ), EDM's). Default: the config's "
                      "sample.spacing.", flag_values=fv)
  flags.DEFINE_float("rho", None, "--spacing karras: the exponent ρ (default 7).", flag_values=fv)
  flags.DEFINE_integer("num_per_class", None, "Samples per label and scale.", flag_values=fv)
  flags.DEFINE_string("labels", None, "Comma list of class indices (default: every class).",
                      flag_values=fv)
  flags.DEFINE_multi_string("prompt", None, "A text run (configs/mnist_text.py): a prompt to sample, "
                            "e.g. 'a handwritten seven'; repeat for several. Default: one held-out "
                            "caption per class.", flag_values=fv)
  flags.DEFINE_string("prompt_set", None, "A text run: sample every caption of a split, held_out "
                      "(the paraphrases never trained on) or train, instead of --prompt.",
                      flag_values=fv)
  flags.DEFINE_string("negative_prompt", None, "A text run: guide away from this prompt in the "
                      "empty prompt's place, ε(neg) + s (ε(prompt) − ε(neg)) (--guidance negative, "
                      "the default with it).", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/samples).", flag_values=fv)
  flags.DEFINE_bool("gif", False, "Also write a GIF of the denoising trajectory.", flag_values=fv)
  flags.DEFINE_bool("evaluate", False, "Judge the samples with the workdir's evaluator: report.json/.md, sweep.png.",
                    flag_values=fv)
  flags.DEFINE_bool("guide_conditional", None, "Classifier guidance on ε(x,t,y) instead of ε(x,t,∅) "
                    "(--noguide_conditional: ε(x,t,∅)); default: the config's sample.guide_conditional.",
                    flag_values=fv)
  flags.DEFINE_float("eta", None, "ddim: stochasticity η (0 = deterministic).", flag_values=fv)
  flags.DEFINE_float("snr", None, "pc: Langevin corrector signal-to-noise ratio.", flag_values=fv)
  flags.DEFINE_float("churn", None, "edm: stochastic churn S_churn >= 0 (default 0, deterministic; "
                     "EDM's 40-80).", flag_values=fv)
  flags.DEFINE_float("s_tmin", None, "edm: churn only for σ̃ >= s_tmin (default 0).", flag_values=fv)
  flags.DEFINE_float("s_tmax", None, "edm: churn only for σ̃ <= s_tmax (default: every level).",
                     flag_values=fv)
  flags.DEFINE_float("s_noise", None, "edm: the churn noise's scale (default 1).", flag_values=fv)
  flags.DEFINE_float("clip_x0", None, "Clip x̂₀ to [-c, c] at every step; 0 = off. Default: the "
                     "config's sample.clip_x0 (1 for image presets, 0 for toy2d).", flag_values=fv)
  flags.DEFINE_bool("raw", False, "Write image samples as sampled: not clipped to [-1, 1].",
                    flag_values=fv)
  flags.DEFINE_float("rescale", 0.0, "CFG rescale φ in [0, 1].", flag_values=fv)
  flags.DEFINE_string("interval", None, "Guide only for t in 'lo,hi' (default: the config's "
                      "sample.interval; 0,1 guides at every t).", flag_values=fv)
  flags.DEFINE_string("schedule", None, "Every scale as a function of t: constant | linear | cosine "
                      "(guidance.schedule: the same guidance on average, none at t = 1).",
                      flag_values=fv)
  flags.DEFINE_integer("negative", None, "--guidance negative: the label to guide away from "
                       "(default ∅, which is CFG).", flag_values=fv)
  flags.DEFINE_string("compose", None, "--guidance compose: LABEL:WEIGHT pairs, e.g. 3:1.5,8:-0.5 "
                      "(ε(∅) + s Σ w (ε(label) − ε(∅)); a negative weight is 'not label').",
                      flag_values=fv)
  flags.DEFINE_float("apg_eta", None, "--guidance apg: weight η of the update's part parallel to x̂₀ "
                     "(default 0; 1 with no threshold is CFG).", flag_values=fv)
  flags.DEFINE_float("norm_threshold", None, "--guidance apg: bound r on the x̂₀ update's norm per "
                     "sample (default: none).", flag_values=fv)
  flags.DEFINE_float("apg_momentum", None, "--guidance apg: momentum β in (-1, 1) of the x̂₀ update "
                     "across steps (the paper's -0.5; default 0, none).", flag_values=fv)
  flags.DEFINE_float("fdg_low", None, "--guidance fdg: the scale of the coarse band (--scale is the "
                     "fine band's; default 1: the coarse structure conditional, unguided).",
                     flag_values=fv)
  flags.DEFINE_integer("fdg_levels", None, "--guidance fdg: bands of the Laplacian pyramid, >= 2 "
                       "(default 2).", flag_values=fv)
  flags.DEFINE_integer("zero_init_steps", None, "--guidance cfg_zero_star: the first sampler steps "
                       "whose prediction is zeroed (default 0).", flag_values=fv)
  flags.DEFINE_integer("recurrence", None, "Self-recurrence: repeat every step but the last n more "
                       "times, re-noised back to its start (every sampler and guidance; default 0).",
                       flag_values=fv)
  flags.DEFINE_integer("batch_size", 1000, "Samples per compiled call.", flag_values=fv)
  flags.DEFINE_string("dtype", None, "The networks' compute dtype: float32 | bfloat16 (default: the "
                      "config's sample.dtype, float32 whatever they were trained in).",
                      flag_values=fv)
  cli.define_distributed_flags(fv)


FLAGS = flags.FLAGS


def main(argv):
  cli.check_args(argv, FLAGS.workdir, WORKDIR_HINT)
  request = sample_request.request_from_flags(FLAGS)   # flags alone: refused before any process connects
  cli.start_distributed(FLAGS)
  run, request = sample_request.load_request(FLAGS.workdir, request, dtype=FLAGS.dtype)
  out = sample_output.prepare_out(FLAGS.out or os.path.join(FLAGS.workdir, "samples"))
  # Several processes: each samples its share of every batch; process 0 writes and prints.
  summary = sample_output.sample_and_write(run, request, out)
  if parallel.is_primary():
    print(json.dumps(summary, indent=2), file=sys.stdout)


if __name__ == "__main__":
  define_flags(FLAGS)
  cli.run(main)
