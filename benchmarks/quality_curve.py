"""The quality-vs-compute figure of docs/quality.md from benchmarks/quality.py's JSON files.

  python benchmarks/quality_curve.py --point 5.6=runs/q5/quality.json --point 13=runs/mnist/quality.json \
      [--baseline 11.8=runs/old/quality.json] --out docs/images/quality_curve.png

Each point is MINUTES=FILE: the train.py wall time of the run and its quality.py result; read with
the run's own evaluator. s = 1 is the `none` row (the conditional network alone).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxguide import plotting  # noqa: E402


def point(entry: str) -> dict:
  minutes, _, path = entry.partition("=")
  with open(path) as f:
    result = json.load(f)["evaluator"]
  rows = result["rows"]
  s1 = next(r for r in rows if r["guidance"] == "none")
  cfg = max((r for r in rows if r["guidance"] == "cfg"), key=lambda r: r["accuracy"])
  return {"minutes": float(minutes), "acc_s1": s1["accuracy"], "best_acc": cfg["accuracy"],
          "fd_ratio": cfg["frechet_distance"] / result["floor"]}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--point", action="append", required=True)
  p.add_argument("--baseline", default=None)
  p.add_argument("--out", required=True)
  args = p.parse_args()
  points = [point(e) for e in args.point]
  plotting.save_quality_curve(points, args.out, baseline=point(args.baseline) if args.baseline else None,
                              title="mnist:quick recipe on the 2-core CPU")
  print(json.dumps(points))


if __name__ == "__main__":
  main()
