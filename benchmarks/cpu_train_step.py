"""Training-step throughput of the mnist:quick models on this host, for 1, 2 and 4 XLA CPU devices.

  python benchmarks/cpu_train_step.py [--models score,classifier,evaluator] [--devices 1,2,4]
                                      [--batches 64,128,256] [--smoke]

Each configuration runs in a fresh process (the device count is fixed when XLA starts): one
compiled `training.make_train_step` over the `data` mesh, a batch of mnist5k (64 unless
`--batches` lists others), median of 12 steps after a warm-up step. Prints one line per configuration and a table at the end.
--smoke cuts the UNets and the classifier to one level of 8 channels (the evaluator has no size
to cut) and times 1 step: that the script runs, not how fast (CI).
"""
import json
import subprocess
import sys

import common
from absl import flags

from jaxguide import cpu

CHILD = r"""
import json, sys, time
import jax, numpy as np
sys.path.insert(0, ROOT)
from configs import mnist
from jaxguide import config as config_lib, data, parallel, training
name, bs, n_dev, smoke = sys.argv[1], int(sys.argv[2]), jax.device_count(), sys.argv[3] == "smoke"
c = mnist.get_config("quick")
if smoke:
  for role in ("score", "guide", "classifier"):
    c[role].model.update(ch=8, ch_mult=(1,), groups=4)
ds = data.load("mnist5k")
spec = training.model_spec(name, c, ds)
tc = config_lib.model_train_config(c, name)
mesh = parallel.data_mesh(jax.devices())
state = training.create_train_state(jax.random.PRNGKey(0), spec.model, spec.init_args,
                                     training.make_optimizer(tc), 0.99)
state = parallel.replicate(state, mesh)
step = training.make_train_step(spec.loss_fn, mesh)
batch = parallel.shard_batch(data.batch_at(ds, 0, bs, 0), mesh)
t0 = time.perf_counter()
state, m = step(state, batch); jax.block_until_ready(m)
compile_s = time.perf_counter() - t0
times = []
for _ in range(1 if smoke else 12):
  t0 = time.perf_counter(); state, m = step(state, batch); jax.block_until_ready(m)
  times.append(time.perf_counter() - t0)
med = float(np.median(times))
print(json.dumps({"model": name, "devices": n_dev, "batch": bs, "step_ms": 1000 * med, "images_per_s": bs / med,
                  "first_step_s": compile_s}))
"""


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("models", "score,classifier,evaluator", "Comma list of the models to time.",
                      flag_values=fv)
  flags.DEFINE_string("devices", "1,2,4", "Comma list of XLA CPU device counts.", flag_values=fv)
  flags.DEFINE_string("batches", "64", "Comma-separated global batch sizes.", flag_values=fv)
  flags.DEFINE_bool("smoke", False, "Tiny networks, 1 timed step (CI).", flag_values=fv)


FLAGS = flags.FLAGS


def main(argv):
  del argv
  cpu.tune_host_malloc(children=True)   # before jax starts: huge pages for XLA:CPU's per-step buffers (jaxguide/cpu.py), inherited by the timed children
  rows = []
  for name in FLAGS.models.split(","):
    for n, bs in [(int(d), int(b)) for d in FLAGS.devices.split(",") for b in FLAGS.batches.split(",")]:
      out = subprocess.run([sys.executable, "-c", CHILD.replace("ROOT", repr(common.ROOT)), name, str(bs),
                            "smoke" if FLAGS.smoke else "full"],
                           capture_output=True, text=True, env=common.cpu_env(n))
      if out.returncode:
        sys.exit(f"{name} on {n} device(s), batch {bs}: the child failed:\n{out.stderr[-3000:]}")
      row = json.loads(out.stdout.strip().splitlines()[-1])
      common.print_record(row)
      rows.append(row)
  print(f"\n{'model':<11}{'devices':>8}{'batch':>7}{'step ms':>10}{'images/s':>10}{'first step s':>14}")
  for r in rows:
    print(f"{r['model']:<11}{r['devices']:>8}{r['batch']:>7}{r['step_ms']:>10.0f}{r['images_per_s']:>10.0f}"
          f"{r['first_step_s']:>14.1f}")


if __name__ == "__main__":
  define_flags(FLAGS)
  common.run(main)
