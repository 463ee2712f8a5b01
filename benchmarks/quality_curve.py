"""The quality-vs-compute figure of docs/quality.md from benchmarks/quality.py's JSON files.

  python benchmarks/quality_curve.py --point 5.6=runs/q5/quality.json --point 13=runs/mnist/quality.json \
      [--baseline 11.8=runs/old/quality.json] --out docs/images/quality_curve.png

Each point is MINUTES=FILE: the train.py wall time of the run and its quality.py result; read with
the run's own evaluator, or with --judge judge2 (quality.py's --judge) so that runs whose own
evaluators differ are read by one yardstick. s = 1 is the `none` row (the conditional network alone); the best CFG
scale is the most accurate one measured (the lowest of a tie). --baseline also takes
MINUTES=ACC_S1,BEST_ACC,FD_RATIO, the three numbers of a run whose JSON is not kept (e.g. a
row of docs/quality.md's study). The FD panel also shows the FD at the lowest CFG scale that
reaches 98 % (the issue's accuracy target) and marks its FD targets, 2x and 3x the floor.
"""
from __future__ import annotations

import json
import os
import sys

import common
from absl import flags

from jaxguide.evaluation import plotting


def point(entry: str, judge: str = "evaluator") -> dict:
  minutes, _, path = entry.partition("=")
  if not os.path.exists(path) and path.count(",") == 2:
    try:
      acc_s1, best_acc, fd_ratio = (float(v) for v in path.split(","))
    except ValueError:
      print(f"quality_curve.py: {entry!r}: give MINUTES=FILE or MINUTES=ACC_S1,BEST_ACC,FD_RATIO",
            file=sys.stderr)
      sys.exit(2)
    return {"minutes": float(minutes), "acc_s1": acc_s1, "best_acc": best_acc, "fd_ratio": fd_ratio}
  with open(path) as f:
    data = json.load(f)
  if judge not in data:
    print(f"quality_curve.py: {path} has no {judge!r} result (it has: "
          f"{', '.join(k for k in data if isinstance(data[k], dict) and 'rows' in data[k])}); "
          f"pass --judge with one of those, or run quality.py with --judge", file=sys.stderr)
    sys.exit(2)
  result = data[judge]
  rows = result["rows"]
  s1 = next(r for r in rows if r["guidance"] == "none")
  cfg_rows = [r for r in rows if r["guidance"] == "cfg"]
  cfg = max(cfg_rows, key=lambda r: r["accuracy"])
  at_98 = [r for r in cfg_rows if r["accuracy"] >= 0.98]
  first_98 = min(at_98, key=lambda r: r["scale"]) if at_98 else None
  return {"minutes": float(minutes), "acc_s1": s1["accuracy"], "best_acc": cfg["accuracy"],
          "fd_ratio": cfg["frechet_distance"] / result["floor"],
          "fd_ratio_98": first_98["frechet_distance"] / result["floor"] if first_98 else None}


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_multi_string("point", None, "MINUTES=FILE: a run's train.py minutes and its quality.py "
                            "JSON; repeatable.", flag_values=fv)
  flags.mark_flag_as_required("point", flag_values=fv)
  flags.DEFINE_string("baseline", None, "MINUTES=FILE or MINUTES=ACC_S1,BEST_ACC,FD_RATIO: the run "
                      "to compare with.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output PNG.", flag_values=fv)
  flags.mark_flag_as_required("out", flag_values=fv)
  flags.DEFINE_string("title", "mnist:quick recipe on the 2-core CPU", "Figure title.", flag_values=fv)
  flags.DEFINE_string("judge", "evaluator", "Whose reading of each file: evaluator (the run's own) "
                      "or judge2.", flag_values=fv)


FLAGS = flags.FLAGS


def main(argv) -> None:
  del argv
  points = [point(e, FLAGS.judge) for e in FLAGS.point]
  baseline = point(FLAGS.baseline, FLAGS.judge) if FLAGS.baseline else None
  plotting.save_quality_curve(points, FLAGS.out, baseline=baseline,
                              title=FLAGS.title, fd_targets=(2.0, 3.0))
  print(json.dumps(points))


if __name__ == "__main__":
  define_flags(FLAGS)
  common.run(main)
