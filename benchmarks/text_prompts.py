"""A text-conditioned workdir (configs/mnist_text.py) judged as the README reports it.

  python benchmarks/text_prompts.py --workdir runs/mnist_text --judge runs/judge \
      --scales 1,1.5,2,3 --num_per_prompt 13 --splits held_out --negative 1,7 \
      --negative_scales 1,2,3 --num_negative 300 \
      --json runs/mnist_text/text_eval.json --plot docs/images/text_sweep.png

1. Held-out paraphrases: every caption of condition.held_out (templates never trained on) sampled
   with CFG at each scale (∅ = the encoding of ""), judged by the workdir's evaluator and, with
   --judge, by an independently trained one; the class a caption names is its label. Also the
   training captions at the same scales, for the gap, and the Fréchet distance to held-out digits
   over its same-size floor.
2. Negative prompts: for each digit d of --negative, samples of the empty prompt "" guided away
   from the caption "the digit d" in ∅'s place, ε(neg) + s (ε("") − ε(neg)) (s = 1 is the
   unconditional model exactly), and the share of samples judged to be d at each scale.
Every point uses the same key; the sampler and steps are the run's defaults unless given.
"""
from __future__ import annotations

import json
import time

import common
import jax
import numpy as np
from absl import flags

from benchmarks.quality import judge_of
from jaxguide import conditioning
from jaxguide import pipeline
from jaxguide import evaluation
from jaxguide.cli import sample_request
from jaxguide.evaluation import plotting


def accuracy_rows(run, judges, prompts, classes, scales, n, opts, seed):
  """One row per scale: each judge's accuracy, and the FD/floor under the workdir's evaluator."""
  conds = conditioning.embed_prompts(run.config, run.captions, prompts)
  groups = evaluation.draw(run, jax.random.PRNGKey(seed), {"cfg": scales}, list(range(len(prompts))),
                         n, conditions=conds, **opts)
  g = groups[0]
  labels = np.asarray(classes)[g.labels]
  rows = []
  own_rows, ref = evaluation.measure(judges["evaluator"],
                                   [evaluation.Samples(g.kind, g.scale_list, np.clip(g.images, -1, 1),
                                                     labels, g.scales, None, 0.0, 0.0)], seed)
  preds = {name: j.predict(np.clip(g.images, -1, 1))[0] for name, j in judges.items()}
  for (scale, block), own in zip(g.blocks(), own_rows):
    row = {"scale": scale, "fd_ratio": own["frechet_distance"] / ref["floor"]}
    for name, pred in preds.items():
      row[f"accuracy_{name}"] = float(np.mean(pred[block] == labels[block]))
    rows.append(row)
  return rows, g.sample_s


def negative_rows(run, judge, digits, scales, n, opts, seed):
  rows = []
  null = np.asarray(run.captions.null)
  for d in digits:
    caption = f"the digit {d}"
    neg = conditioning.embed_prompts(run.config, run.captions, [caption])[0]
    y = np.broadcast_to(null, (n * len(scales), null.shape[0]))
    s = np.repeat(np.asarray(scales, np.float32), n)
    x0 = pipeline.generate(run, jax.random.PRNGKey(seed), y, s, kind="negative",
                           negative_label=tuple(float(v) for v in neg), **opts)
    pred = judge.predict(np.clip(x0, -1, 1))[0]
    for i, scale in enumerate(scales):
      share = float(np.mean(pred[i * n:(i + 1) * n] == d))
      rows.append({"digit": int(d), "negative_prompt": caption, "scale": float(scale),
                   "share": share})
  return rows


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "A folder trained on text (configs/mnist_text.py).",
                      flag_values=fv)
  flags.mark_flag_as_required("workdir", flag_values=fv)
  flags.DEFINE_string("judge", None, "A workdir holding an independent evaluator "
                      "(configs/mnist.py:judge).", flag_values=fv)
  flags.DEFINE_string("scales", "1,2,3", "Comma list of CFG scales for the captions.", flag_values=fv)
  flags.DEFINE_integer("num_per_prompt", 13, "Samples per caption and scale.", flag_values=fv)
  flags.DEFINE_string("negative", "1,7", "Digits whose 'the digit d' is the negative prompt.",
                      flag_values=fv)
  flags.DEFINE_string("negative_scales", "1,2,3", "Comma list of scales for the negative prompts.",
                      flag_values=fv)
  flags.DEFINE_integer("num_negative", 500, "Samples per negative prompt and scale.", flag_values=fv)
  flags.DEFINE_string("splits", "held_out,train", "Caption splits to judge.", flag_values=fv)
  flags.DEFINE_string("sampler", None, "Sampler (default: the run's).", flag_values=fv)
  flags.DEFINE_integer("steps", None, "Sampling steps (default: the run's).", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
  flags.DEFINE_string("json", None, "Output file: the printed result.", flag_values=fv)
  flags.DEFINE_string("plot", None, "Output PNG: accuracy per scale and the negative prompts' share.",
                      flag_values=fv)


FLAGS = flags.FLAGS


def main(argv) -> int:
  del argv
  run = pipeline.load_run(FLAGS.workdir)
  if run.captions is None:
    raise SystemExit(f"error: --workdir={FLAGS.workdir} was not trained on text")
  req = sample_request.complete_request(sample_request.Request(
      guidance=("cfg",), sampler=FLAGS.sampler, steps=FLAGS.steps, prompts=["<held_out>"]), run)
  opts = dict(sampler=req.sampler, steps=req.steps, spacing=req.spacing, **req.options)
  judges = {"evaluator": evaluation.run_judge(run)}
  if FLAGS.judge:
    judges["judge"] = judge_of(FLAGS.judge, run)
  scales = [float(v) for v in FLAGS.scales.split(",")]
  cap = run.captions
  out = {"workdir": FLAGS.workdir, "sampler": req.sampler, "steps": req.steps,
         "num_per_prompt": FLAGS.num_per_prompt}
  start = time.perf_counter()
  splits = [v for v in FLAGS.splits.split(",") if v]
  for split in splits:
    keep = cap.split == split
    prompts, classes = [str(c) for c in cap.captions[keep]], cap.labels[keep]
    out[split], _ = accuracy_rows(run, judges, prompts, classes, scales, FLAGS.num_per_prompt,
                                  opts, FLAGS.seed)
    out[f"{split}_prompts"] = len(prompts)
  digits = [int(d) for d in FLAGS.negative.split(",") if d.strip()]
  out["negative"] = negative_rows(run, judges.get("judge", judges["evaluator"]), digits,
                                  [float(v) for v in FLAGS.negative_scales.split(",")],
                                  FLAGS.num_negative, opts, FLAGS.seed)
  out["seconds"] = time.perf_counter() - start
  print(json.dumps(out, indent=2))
  common.write_json(FLAGS.json, out, indent=2)
  if FLAGS.plot:
    plt = plotting.pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    for split, style in (("held_out", "-o"), ("train", ":s")):
      if split not in out:
        continue
      xs = [r["scale"] for r in out[split]]
      for name in judges:
        a.plot(xs, [r[f"accuracy_{name}"] for r in out[split]], style,
               label=f"{split.replace('_', '-')} captions, {name}")
    a.set_xlabel("CFG scale s"), a.set_ylabel("judged accuracy"), a.legend(fontsize=7)
    a.set_title("prompt → digit", fontsize=9)
    for d in digits:
      mine = [r for r in out["negative"] if r["digit"] == d]
      b.plot([r["scale"] for r in mine], [r["share"] for r in mine], "-o",
             label=f"negative 'the digit {d}'")
    b.set_xlabel("scale s (1 = unconditional)"), b.set_ylabel("share judged as that digit")
    b.set_title('prompt "" with a negative prompt', fontsize=9), b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(FLAGS.plot)
  return 0


if __name__ == "__main__":
  define_flags(FLAGS)
  common.run(main)
