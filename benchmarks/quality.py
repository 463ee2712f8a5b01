"""Sample quality of a trained workdir, as docs/quality.md reports it: accuracy under the workdir's
evaluator and under a second, independently trained judge, and the Fréchet distance read against
its same-size floor, for the conditional network alone and for both guidance kinds over scales.

  python benchmarks/quality.py --workdir runs/mnist --judge runs/judge --num_per_class 50 \
      --scale none=1 --scale cfg=1.5,2,3 --scale classifier=1,2,4 --json runs/mnist/quality.json

`none` is the conditional network as trained (CFG at s = 1, one network pass). The judge workdir
holds only an evaluator: `python train.py --config configs/mnist.py:judge --workdir runs/judge`.
Every kind and scale is drawn with the same key, DDIM with the run's sampling defaults unless
--sampler / --steps say otherwise.
"""
from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from jaxguide import pipeline
from jaxguide.evaluation import plotting
from jaxguide.training import workdir as wd
from jaxguide import models
from jaxguide import evaluation
from jaxguide.cli import sample_request

if __package__:   # imported as benchmarks.quality (tests/diagnose_test.py)
  from benchmarks import common
else:   # python benchmarks/quality.py, or `import quality` with benchmarks/ on sys.path
  import common


def judge_of(workdir: str, run: pipeline.Run) -> evaluation.Judge:
  """A Judge from another workdir's evaluator, on the run's own data splits."""
  config = wd.load_config(workdir)
  if config is None:
    raise SystemExit(f"error: --judge={workdir} holds no trained run (no config.json)")
  model = models.build_model(config.evaluator.model, run.num_classes, jnp.float32)
  params = pipeline.restore_ema(workdir, "evaluator", model,
                                 models.example_inputs("evaluator", run.shape))
  if params is None:
    raise SystemExit(f"error: --judge={workdir} has no evaluator checkpoint")
  own = evaluation.run_judge(run)
  return evaluation.Judge(evaluation.make_predict(model.apply, params), own.test, own.train)


def parse_scales(entries: list[str]) -> dict[str, list[float]]:
  out = {}
  for entry in entries:
    kind, _, values = entry.partition("=")
    out[kind] = [float(v) for v in values.split(",")]
  return out


def summarise(rows: list[dict], floor: float) -> dict[str, dict]:
  """Per kind: the best-accuracy scale with its FD/floor, and the best FD/floor anywhere."""
  out = {}
  for kind in dict.fromkeys(r["guidance"] for r in rows):
    mine = [r for r in rows if r["guidance"] == kind]
    best = max(mine, key=lambda r: (r["accuracy"], -r["frechet_distance"]))
    out[kind] = {"best_acc_scale": best["scale"], "best_acc": best["accuracy"],
                 "fd_ratio_at_best_acc": best["frechet_distance"] / floor,
                 "best_fd_ratio": min(r["frechet_distance"] for r in mine) / floor}
  return out


def misclassified(samples: list, predictions: dict[str, list[np.ndarray]]) -> list[dict]:
  """Per kind and scale, the samples that at least one judge reads as another class: their index
  in the kind's batch, the requested label and each judge's reading."""
  out = []
  for g, group in enumerate(samples):
    for scale, block in group.blocks():
      labels = group.labels[block]
      read = {name: np.asarray(pred[g])[block] for name, pred in predictions.items()}
      wrong = np.flatnonzero(np.any([r != labels for r in read.values()], axis=0))
      out.append({"guidance": group.kind, "scale": scale, "samples": [
          {"index": int(block.start + i), "requested": int(labels[i]),
           **{name: int(r[i]) for name, r in read.items()}} for i in wrong]})
  return out


def save_errors(samples: list, errors: list[dict], path: str, max_per_row: int = 12) -> None:
  """The misclassified samples as one figure: a row per kind and scale (at most max_per_row
  tiles, the row's count in its label), each tile titled requested -> the judges' readings."""
  plt = plotting.pyplot()
  groups = {group.kind: group for group in samples}
  rows = len(errors)
  fig, axes = plt.subplots(rows, max_per_row, figsize=(0.9 * max_per_row + 1.2, 1.05 * rows + 0.3),
                           squeeze=False)
  for r, point in enumerate(errors):
    group = groups[point["guidance"]]
    axes[r, 0].set_ylabel(f"{point['guidance']} {point['scale']:g}\n{len(point['samples'])} wrong",
                          fontsize=7)
    for k in range(max_per_row):
      ax = axes[r, k]
      ax.set_xticks([]); ax.set_yticks([])
      for side in ax.spines.values():
        side.set_visible(False)
      if k < len(point["samples"]):
        e = point["samples"][k]
        plotting.show_image(ax, group.images[e["index"]])
        reads = "/".join(str(v) for name, v in e.items() if name not in ("index", "requested"))
        ax.set_title(f"{e['requested']}→{reads}", fontsize=7)
  plotting.save_figure(fig, path)


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "A folder trained by train.py.", flag_values=fv)
  flags.mark_flag_as_required("workdir", flag_values=fv)
  flags.DEFINE_string("judge", None, "Workdir of a second, independent evaluator.", flag_values=fv)
  flags.DEFINE_multi_string("scale", None, "KIND=LIST, repeatable (default: none=1, cfg=2,3, "
                            "classifier=2,4).", flag_values=fv)
  flags.DEFINE_integer("num_per_class", 50, "Samples per class, kind and scale.", flag_values=fv)
  flags.DEFINE_string("sampler", None, "Sampler (default: the run's sample.sampler).", flag_values=fv)
  flags.DEFINE_integer("steps", None, "Sampling steps (default: the run's sample.steps).",
                       flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
  flags.DEFINE_bool("guide_conditional", None, "Classifier guidance on ε(x,t,y) or "
                    "(--noguide_conditional) ε(x,t,∅); default: the run's sample.guide_conditional, "
                    "as sample.py.", flag_values=fv)
  flags.DEFINE_string("json", None, "Output file: settings, each judge's rows and summary, and the "
                      "misclassified samples.", flag_values=fv)
  flags.DEFINE_string("frontier", None, "PNG: FD ÷ floor against accuracy, a line per kind (the "
                      "first judge's).", flag_values=fv)
  flags.DEFINE_string("errors", None, "PNG: every sample a judge puts in another class, a row per "
                      "kind and scale, each titled requested -> what each judge read (also listed in "
                      "--json under 'errors').", flag_values=fv)
  flags.DEFINE_multi_string("option", [], "NAME=VALUE guidance option (pipeline.GUIDE_OPTIONS) or sampling option (recurrence, spacing, edm's churn ...), e.g. "
                            "norm_threshold=15; repeatable.", flag_values=fv)


FLAGS = flags.FLAGS


# Guidance options, and the sampling options that apply to every guidance.
OPTION_NAMES = (*pipeline.GUIDE_OPTIONS, "recurrence", "spacing", "rho", "churn", "s_tmin", "s_tmax",
                "s_noise")


def main(argv) -> None:
  del argv
  scales = parse_scales(FLAGS.scale or ["none=1", "cfg=2,3", "classifier=2,4"])
  run = pipeline.load_run(FLAGS.workdir)
  if FLAGS.errors and len(run.shape) != 3:
    raise SystemExit(f"error: --errors draws image samples; {FLAGS.workdir} holds data of shape "
                     f"{run.shape}: leave --errors out (the JSON lists the misclassified samples)")
  sc = run.config.sample
  # The run's sampling defaults (spacing, clip_x0), exactly as sample.py fills them.
  flagged = {} if FLAGS.guide_conditional is None else {"guide_conditional": FLAGS.guide_conditional}
  for entry in FLAGS.option:
    name, _, value = entry.partition("=")
    if name not in OPTION_NAMES:
      raise SystemExit(f"error: --option {name}: use one of {', '.join(OPTION_NAMES)}")
    parsed = json.loads(value) if value[:1] in "[0123456789-." else value
    tuples = lambda v: tuple(tuples(x) for x in v) if isinstance(v, list) else v
    flagged[name] = tuples(parsed)   # hashable: options key the compile cache
  opts = {"sampler": FLAGS.sampler or sc.sampler, "steps": FLAGS.steps or sc.steps,
          **sample_request.config_options(run, flagged)}
  judges = {"evaluator": evaluation.run_judge(run)}
  if FLAGS.judge:
    judges["judge2"] = judge_of(FLAGS.judge, run)
  start = time.perf_counter()
  samples = evaluation.draw(run, jax.random.PRNGKey(FLAGS.seed), scales, list(range(run.num_classes)),
                          FLAGS.num_per_class, **opts)
  if len(run.shape) == 3:   # images are judged as sample.py writes them: clipped to [−1, 1]
    samples = [dataclasses.replace(s, images=np.clip(s.images, -1.0, 1.0)) for s in samples]
  sample_s = time.perf_counter() - start
  result = {"workdir": FLAGS.workdir, "options": opts, "num_per_class": FLAGS.num_per_class,
            "sample_s": sample_s}
  predictions = {}
  for name, judge in judges.items():
    predicted = [judge.predict(group.images) for group in samples]
    predictions[name] = [pred for pred, _ in predicted]
    rows, ref = evaluation.measure(judge, samples, predicted=predicted)
    result[name] = {"floor": ref["floor"], "rows": rows, "summary": summarise(rows, ref["floor"])}
    test_acc = float(np.mean(judge.predict(judge.test.image)[0] == judge.test.label))
    result[name]["test_accuracy"] = test_acc
    print(f"[{name}] test accuracy {test_acc:.4f}, FD floor {ref['floor']:.2f} (n={ref['n_samples']})")
    for r in rows:
      print(f"  {r['guidance']:>10} {r['scale']:>6g}  acc {r['accuracy']:.3f}  worst {r['worst_class']} "
            f"({r['worst_class_accuracy']:.2f})  FD {r['frechet_distance']:8.2f} "
            f"({r['frechet_distance'] / ref['floor']:.2f}x)  div {r['diversity']:.2f}")
  print(f"sampling {sample_s:.0f} s")
  result["errors"] = misclassified(samples, predictions)
  if FLAGS.errors:
    save_errors(samples, result["errors"], FLAGS.errors)
  if FLAGS.frontier:
    first = next(iter(judges))
    plotting.save_frontier(result[first]["rows"], FLAGS.frontier, floor=result[first]["floor"],
                           title=f"{opts['sampler']}, {opts['steps']} steps, {FLAGS.num_per_class * run.num_classes} "
                                 f"samples per point ({first})")
  common.write_json(FLAGS.json, result, indent=1, default=float)


if __name__ == "__main__":
  define_flags(FLAGS)
  common.run(main)
