"""Models of different workdirs (e.g. the quick VP preset and `configs/mnist.py:flow`) side by
side, from benchmarks/quality.py --json runs read by one independent judge (a workdir's own
evaluator differs between workdirs, so only the shared --judge compares them).

  python benchmarks/compare_models.py runs/mnist/quality.json runs/mnist_flow/quality.json \
      runs/*/passes_*.json --name runs/mnist=VP --name runs/mnist_flow=flow \
      --png docs/images/flow_vs_vp.png

Prints per model its unguided point, its best CFG accuracy (with the FD ÷ floor there), its
lowest FD ÷ floor, and a table of accuracy and FD ÷ floor by sampler and network passes (runs of
one scale and kind at several step counts). The plot: FD ÷ floor against accuracy along each
model's guidance scales (left), and FD ÷ floor against network passes per model and sampler
(right). Runs must share the judge's floor (the same judge and sample count).
"""
from __future__ import annotations

import json
from collections import defaultdict

import common
from absl import flags

from jaxguide.evaluation import plotting

# Network evaluations per step: Heun's corrector doubles the samplers that have one (every step
# corrected, the grid ends at t_eps > 0); pc's is its corrector_steps Langevin steps.
TWO_PASSES = ("edm", "ode_heun")


def passes(options: dict) -> int:
  steps = int(options["steps"])
  if options["sampler"] in TWO_PASSES:
    return 2 * steps
  if options["sampler"] == "pc":
    return steps * (1 + int(options.get("corrector_steps", 1)))
  return steps


def load(paths: list[str], judge: str, names: dict[str, str]) -> tuple[float, list[dict]]:
  """(the judge's floor, every row tagged with its model's name, sampler, steps and passes)."""
  rows, floor = [], None
  for path in paths:
    run = json.load(open(path))
    if judge not in run:
      raise SystemExit(f"error: {path} holds no {judge!r} verdicts: draw it with --judge")
    f = float(run[judge]["floor"])
    if floor is not None and abs(f - floor) > 1e-6 * floor:
      raise SystemExit(f"error: {path}: the {judge} floor is {f:.3f}, not {floor:.3f}: combine runs "
                       "of one judge and one sample count")
    floor = f
    model = names.get(run["workdir"].rstrip("/"), run["workdir"])
    opts = run["options"]
    for r in run[judge]["rows"]:
      rows.append({**r, "model": model, "sampler": opts["sampler"], "steps": int(opts["steps"]),
                   "passes": passes(opts), "ratio": r["frechet_distance"] / f})
  return floor, rows


def main_setting(rows: list[dict]) -> tuple[tuple[str, int], list[dict]]:
  """A model's most-drawn (sampler, steps), its scale sweep, and the rows drawn so."""
  setting = max(dict.fromkeys((r["sampler"], r["steps"]) for r in rows),
                key=lambda k: sum(1 for r in rows if (r["sampler"], r["steps"]) == k))
  return setting, [r for r in rows if (r["sampler"], r["steps"]) == setting]


def summary(rows: list[dict]) -> str:
  lines = ["| model | unguided (s = 1) | best CFG accuracy (s, FD ÷ floor) | lowest FD ÷ floor (kind s, accuracy) |",
           "|---|---|---|---|"]
  for model in dict.fromkeys(r["model"] for r in rows):
    default, mine = main_setting([r for r in rows if r["model"] == model])
    none = [r for r in mine if r["guidance"] == "none"]
    cfg = [r for r in mine if r["guidance"] == "cfg"]
    cell = lambda r: f"{r['accuracy']:.1%}, {r['ratio']:.2f}×"
    best = max(cfg, key=lambda r: (r["accuracy"], -r["ratio"])) if cfg else None
    low = min(mine, key=lambda r: r["ratio"])
    lines.append(f"| {model} ({default[0]} {default[1]}) | {cell(none[0]) if none else '—'} | "
                 + (f"{best['accuracy']:.1%} ({best['scale']:g}, {best['ratio']:.2f}×)" if best else "—")
                 + f" | {low['ratio']:.2f}× ({low['guidance']} {low['scale']:g}, {low['accuracy']:.1%}) |")
  return "\n".join(lines)


def by_passes(rows: list[dict]) -> tuple[str, dict]:
  """A table of (model, kind, scale) × sampler by passes, for the settings drawn at ≥ 2 step counts."""
  curves = defaultdict(dict)
  for r in rows:
    curves[(r["model"], r["guidance"], r["scale"], r["sampler"])][r["passes"]] = r
  curves = {k: v for k, v in curves.items() if len(v) >= 2}
  counts = sorted({p for v in curves.values() for p in v})
  lines = ["| model, guidance | sampler | " + " | ".join(f"{p} passes" for p in counts) + " |",
           "|---|---|" + "---|" * len(counts)]
  for (model, kind, scale, sampler), points in curves.items():
    cells = [f"{points[p]['accuracy']:.1%}, {points[p]['ratio']:.2f}×" if p in points else "—"
             for p in counts]
    lines.append(f"| {model}, {kind} {scale:g} | {sampler} | " + " | ".join(cells) + " |")
  return "\n".join(lines), curves


def plot(rows: list[dict], curves: dict, path: str, judge: str) -> None:
  plt = plotting.pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  models = list(dict.fromkeys(r["model"] for r in rows))
  colours = dict(zip(models, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  for model in models:
    setting, mine = main_setting([r for r in rows if r["model"] == model])
    line = sorted((r for r in mine if r["guidance"] in ("none", "cfg")), key=lambda r: r["scale"])
    left.plot([100 * r["accuracy"] for r in line], [r["ratio"] for r in line], "o-",
              color=colours[model], label=f"{model} ({setting[0]} {setting[1]})")
    for r in line:
      left.annotate(f"{r['scale']:g}", (100 * r["accuracy"], r["ratio"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
  left.set(xlabel=f"accuracy (%, {judge})", ylabel="FD ÷ floor", title="CFG scale (s = 1: unguided)")
  left.legend(fontsize=8)
  styles = dict(zip(dict.fromkeys(k[3] for k in curves), ("o-", "s--", "^:", "d-.", "v-")))
  for (model, kind, scale, sampler), points in curves.items():
    p = sorted(points)
    right.plot(p, [points[q]["ratio"] for q in p], styles[sampler], color=colours[model],
               label=f"{model} {sampler}")
  right.set(xscale="log", xlabel="network passes", ylabel="FD ÷ floor", title="samplers")
  right.set_xticks(sorted({q for v in curves.values() for q in v}))
  right.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
  right.get_xaxis().set_minor_formatter(plt.matplotlib.ticker.NullFormatter())
  right.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  plotting.save_figure(fig, path)


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("judge", "judge2", "The judge every run shares (evaluator only within one "
                      "workdir).", flag_values=fv)
  flags.DEFINE_multi_string("name", [], "WORKDIR=NAME, the model's name in tables and plot.",
                            flag_values=fv)
  flags.DEFINE_string("png", None, "The plot.", flag_values=fv)


FLAGS = flags.FLAGS


def main(argv) -> None:
  paths = argv[1:]
  if not paths:
    common.usage_error("give benchmarks/quality.py --json files")
  names = {}
  for item in FLAGS.name:
    workdir, sep, name = item.partition("=")
    if not sep or not name:
      common.usage_error(f"--name={item!r}: give WORKDIR=NAME, e.g. runs/mnist=VP")
    names[workdir.rstrip("/")] = name
  _, rows = load(paths, FLAGS.judge, names)
  print(summary(rows))
  table, curves = by_passes(rows)
  if curves:
    print("\n" + table)
  if FLAGS.png:
    plot(rows, curves, FLAGS.png, FLAGS.judge)


if __name__ == "__main__":
  define_flags(FLAGS)
  common.run(main, positional=True)
