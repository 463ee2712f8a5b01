"""Every guidance kind on one fidelity-against-accuracy frontier, from benchmarks/quality.py runs
on the same workdir, sampler, seed and sample count (each kind's rows may come from another run:
they are drawn with the same key, so they combine).

  python benchmarks/frontier.py runs/mnist4/quality.json runs/mnist4/quality_family.json \
      --png docs/images/frontier_quick.png --judge evaluator

Prints a markdown table per judge: per kind its best accuracy with the FD ÷ floor there, its
lowest FD ÷ floor, and the lowest FD ÷ floor among its points with accuracy ≥ --at (95 %). The
unguided point (`none`, the conditional network at s = 1) starts every line whose kind is
exactly that network at its neutral scale (CFG, APG and autoguidance at s = 1; classifier and
clean-classifier guidance at w = 0 on ε(x, t, y)).
"""
from __future__ import annotations

import json

import common
from absl import flags

from jaxguide.evaluation import plotting

# Kinds whose neutral scale is the conditional network itself, and that scale.
NEUTRAL = {"cfg": 1.0, "apg": 1.0, "autoguidance": 1.0, "fdg": 1.0, "classifier": 0.0,
           "x0_classifier": 0.0}
# Options that belong to one kind: runs that differ in them combine, their lines named by them.
KIND_OPTIONS = ("apg_eta", "norm_threshold", "apg_momentum", "fdg_low", "fdg_levels", "recurrence")
CONDITIONAL_BASE = ("classifier", "x0_classifier")   # neutral only when guiding ε(x, t, y)


def settings_of(run: dict) -> dict:
  """What every combined run must share: the workdir, the sample count and every option but a
  kind's own (APG's momentum, FDG's coarse scale, ...), which name the kind's line instead."""
  return {"workdir": run["workdir"], "num_per_class": run["num_per_class"],
          "options": {k: v for k, v in run["options"].items() if k not in KIND_OPTIONS}}


def labelled(run: dict, rows: list[dict]) -> list[dict]:
  """Rows of a run with a kind's own options: the kind named with them, e.g. 'apg apg_momentum=-0.5'."""
  own = {k: v for k, v in run["options"].items() if k in KIND_OPTIONS}
  if not own:
    return rows
  suffix = " ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in own.items())
  return [{**r, "guidance": f"{r['guidance']} {suffix}"} if r["guidance"] != "none" else r
          for r in rows]


def load(paths: list[str]) -> tuple[dict, dict[str, dict]]:
  """(the runs' shared settings, per judge: floor and all rows), refusing runs that differ."""
  runs = [json.load(open(p)) for p in paths]
  first = settings_of(runs[0])
  for path, run in zip(paths, runs):
    if settings_of(run) != first:
      raise SystemExit(f"error: {path} was drawn otherwise ({settings_of(run)}): "
                       f"combine only runs of {first}")
  judges = {}
  for name in ("evaluator", "judge2"):
    present = [r for r in runs if name in r]
    if not present:
      continue
    judges[name] = {"floor": present[0][name]["floor"],
                    "rows": [row for r in present for row in labelled(r, r[name]["rows"])]}
  return first, judges


def with_neutral(rows: list[dict], guide_conditional: bool) -> list[dict]:
  """The rows, plus the unguided point copied as each kind's neutral scale."""
  none = [r for r in rows if r["guidance"] == "none"]
  out = [r for r in rows if r["guidance"] != "none"]
  if not none:
    return out
  for kind in dict.fromkeys(r["guidance"] for r in out):
    base = kind.split(" ")[0]
    neutral = NEUTRAL.get(base)
    if neutral is None or (base in CONDITIONAL_BASE and not guide_conditional) or (
        base == "fdg" and "fdg_low" in kind and not kind.endswith("fdg_low=1")):
      continue   # FDG is the conditional network at s = 1 only with its coarse scale at 1
    if not any(r["guidance"] == kind and r["scale"] == neutral for r in out):
      out.append({**none[0], "guidance": kind, "scale": neutral})
  return none + out


def table(rows: list[dict], floor: float, at: float) -> str:
  lines = ["| kind | scales | best accuracy (scale, FD ÷ floor) | lowest FD ÷ floor (scale, accuracy) "
           f"| lowest FD ÷ floor at accuracy ≥ {at:.0%} (scale) |", "|---|---|---|---|---|"]
  for kind in dict.fromkeys(r["guidance"] for r in rows):
    mine = sorted((r for r in rows if r["guidance"] == kind), key=lambda r: r["scale"])
    ratio = lambda r: r["frechet_distance"] / floor
    best = max(mine, key=lambda r: (r["accuracy"], -r["frechet_distance"]))
    low = min(mine, key=ratio)
    good = [r for r in mine if r["accuracy"] >= at]
    at_cell = f"{ratio(min(good, key=ratio)):.2f}× ({min(good, key=ratio)['scale']:g})" if good else "not reached"
    scales = ", ".join(f"{r['scale']:g}" for r in mine)
    lines.append(f"| {kind} | {scales} | {best['accuracy']:.1%} "
                 f"({best['scale']:g}, {ratio(best):.2f}×) | {ratio(low):.2f}× ({low['scale']:g}, "
                 f"{low['accuracy']:.1%}) | {at_cell} |")
  return "\n".join(lines)


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("png", None, "Frontier plot (the --judge's verdicts).", flag_values=fv)
  flags.DEFINE_string("judge", "evaluator", "evaluator | judge2, for the plot.", flag_values=fv)
  flags.DEFINE_float("at", 0.95, "Accuracy for the last column.", flag_values=fv)


FLAGS = flags.FLAGS


def main(argv) -> None:
  paths = argv[1:]   # benchmarks/quality.py --json files
  if not paths:
    common.usage_error("give one or more benchmarks/quality.py --json files")
  settings, judges = load(paths)
  if FLAGS.judge not in judges:
    raise SystemExit(f"error: --judge={FLAGS.judge}: the runs hold {', '.join(judges)}")
  guide_conditional = bool(settings["options"].get("guide_conditional", False))
  opts = settings["options"]
  for name, judge in judges.items():
    rows = with_neutral(judge["rows"], guide_conditional)
    print(f"\n{name} (FD floor {judge['floor']:.2f}; {opts['sampler']} {opts['steps']} steps, "
          f"{settings['num_per_class']} per class)\n")
    print(table(rows, judge["floor"], FLAGS.at))
    if FLAGS.png and name == FLAGS.judge:
      plotting.save_frontier(rows, FLAGS.png, floor=judge["floor"],
                             title=f"{settings['workdir']}: {opts['sampler']}, {opts['steps']} steps, "
                                   f"{settings['num_per_class'] * len(rows[0]['per_class'])} samples per point "
                                   f"({name})")


if __name__ == "__main__":
  define_flags(FLAGS)
  common.run(main, positional=True)
