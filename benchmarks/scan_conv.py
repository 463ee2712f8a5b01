"""Why jaxguide/conv.py exists: one classifier-guided ε evaluation of the mnist:quick networks
(UNet forward on ε(x,t,∅) plus the classifier's ∇ₓ log p_t(y|x)), looped 24 times three ways —
inside one `lax.scan` (how every sampler runs), fully unrolled, and as a Python loop over one
compiled step — with flax's convolutions on `lax.conv_general_dilated` ("lax") and on
`jaxguide.models.conv.conv_general_dilated` ("jaxguide"). Random weights: speed does not depend on them.

  python benchmarks/scan_conv.py [--batch 8] [--devices 1] [--smoke]

Prints one JSON line per (convolution, loop): milliseconds per guided step, median of 5 runs.
--smoke: networks of one level of 8 channels, 2 steps, 1 run: that the script runs (CI).
"""
import argparse
import functools
import json
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--smoke", action="store_true", help="tiny networks, 2 steps, 1 run (CI)")
args = parser.parse_args()
# The device count replaces any in XLA_FLAGS; the other flags there stay.
DEVICES_FLAG = "--xla_force_host_platform_device_count"
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICES_FLAG)]
    + [f"{DEVICES_FLAG}={args.devices}"])

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import mnist  # noqa: E402
from jaxguide.models import conv
from jaxguide import guidance
from jaxguide.diffusion import score
from jaxguide import models
from jaxguide.diffusion.sde import VPSDE  # noqa: E402

STEPS, RUNS = (2, 1) if args.smoke else (24, 5)
SMOKE_MODEL = dict(ch=8, ch_mult=(1,), groups=4)


def guided_step(conv_fn):
  models.Conv = functools.partial(nn.Conv, conv_general_dilated=conv_fn)   # what the modules build
  config = mnist.get_config("quick")
  config.score.model.param = "eps"   # the bare UNet (v-prediction adds two elementwise ops)
  if args.smoke:
    config.score.model.update(SMOKE_MODEL)
    config.classifier.model.update(SMOKE_MODEL)
  unet = models.build_model(config.score.model, 10, jnp.float32)
  clf = models.build_model(config.classifier.model, 10, jnp.float32)
  b = args.batch
  x, t, y = jnp.zeros((b, 28, 28, 1)), jnp.full((b,), 0.5), jnp.arange(b) % 10
  # Shapes only, filled with numpy's noise: an eager init of the UNet, or jax.random per leaf
  # (one threefry compile per shape), spends seconds on values that do not change the speed.
  params = {"score": jax.eval_shape(unet.init, jax.random.PRNGKey(0), x, t, y)["params"],
            "classifier": jax.eval_shape(clf.init, jax.random.PRNGKey(1), x, t)["params"]}
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda p: jnp.asarray(0.1 * rng.standard_normal(p.shape), jnp.float32), params)
  sde = VPSDE()

  def eps(p, x, t):
    e = guidance.unconditional(score.eps_fn(unet.apply, p["score"]), 10)
    g = guidance.classifier(e, score.log_prob_fn(clf.apply, p["classifier"]), sde, 8.0)
    return g(x, jnp.full((b,), t), y)
  return eps, params, x


def timed(fn, *a):
  fn(*a).block_until_ready()
  runs = []
  for _ in range(RUNS):
    start = time.perf_counter()
    fn(*a).block_until_ready()
    runs.append(time.perf_counter() - start)
  return 1000 * float(np.median(runs)) / STEPS


def main():
  times = jnp.linspace(1.0, 0.01, STEPS)
  for name, conv_fn in (("lax", lax.conv_general_dilated), ("jaxguide", conv.conv_general_dilated)):
    eps, params, x0 = guided_step(conv_fn)
    body = lambda p: lambda x, t: (x - 1e-3 * eps(p, x, t), None)
    loops = {"scan": jax.jit(lambda p, x: lax.scan(body(p), x, times)[0]),
             "unrolled": jax.jit(lambda p, x: lax.scan(body(p), x, times, unroll=True)[0])}
    one = jax.jit(lambda p, x, t: x - 1e-3 * eps(p, x, t))

    def python_loop(p, x):
      for t in np.asarray(times):
        x = one(p, x, t)
      return x
    for loop, fn in (*loops.items(), ("python", python_loop)):
      print(json.dumps({"conv": name, "loop": loop, "batch": args.batch, "devices": args.devices,
                        "ms_per_step": round(timed(fn, params, x0), 2)}), flush=True)


if __name__ == "__main__":
  main()
