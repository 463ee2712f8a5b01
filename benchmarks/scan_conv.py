"""Why jaxguide/conv.py exists: one classifier-guided ε evaluation of the mnist:quick networks
(UNet forward on ε(x,t,∅) plus the classifier's ∇ₓ log p_t(y|x)), looped 24 times three ways —
inside one `lax.scan` (how every sampler runs), fully unrolled, and as a Python loop over one
compiled step — with flax's convolutions on `lax.conv_general_dilated` ("lax") and on
`jaxguide.models.conv.conv_general_dilated` ("jaxguide"). Random weights: speed does not depend on them.

  python benchmarks/scan_conv.py [--batch 8] [--devices 1] [--smoke]

Prints one JSON line per (convolution, loop): milliseconds per guided step, median of 5 runs.
--smoke: networks of one level of 8 channels, 2 steps, 1 run: that the script runs (CI).
"""
import functools
import os

import common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax import lax

from configs import mnist
from jaxguide.models import conv
from jaxguide import guidance
from jaxguide.diffusion import score
from jaxguide import models
from jaxguide.diffusion.sde import VPSDE

STEPS, RUNS = 24, 5
SMOKE_STEPS, SMOKE_RUNS = 2, 1
SMOKE_MODEL = dict(ch=8, ch_mult=(1,), groups=4)


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("batch", 8, "Samples per guided step.", flag_values=fv)
  flags.DEFINE_integer("devices", 1, "XLA CPU devices (replaces any count in XLA_FLAGS).",
                       flag_values=fv)
  flags.DEFINE_bool("smoke", False, f"Tiny networks, {SMOKE_STEPS} steps, {SMOKE_RUNS} run (CI).",
                    flag_values=fv)


FLAGS = flags.FLAGS


def guided_step(conv_fn):
  models.Conv = functools.partial(nn.Conv, conv_general_dilated=conv_fn)   # what the modules build
  config = mnist.get_config("quick")
  config.score.model.param = "eps"   # the bare UNet (v-prediction adds two elementwise ops)
  if FLAGS.smoke:
    config.score.model.update(SMOKE_MODEL)
    config.classifier.model.update(SMOKE_MODEL)
  unet = models.build_model(config.score.model, 10, jnp.float32)
  clf = models.build_model(config.classifier.model, 10, jnp.float32)
  b = FLAGS.batch
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


def ms_per_step(fn, args, steps: int, runs: int) -> float:
  """Median milliseconds per guided step of `fn(*args)`, a loop of `steps` steps."""
  return 1000 * float(np.median(common.timed_runs(lambda: fn(*args).block_until_ready(), runs))) / steps


def main(argv):
  del argv
  # Before jax starts its backend: the device count replaces any in XLA_FLAGS.
  os.environ["XLA_FLAGS"] = common.xla_flags(FLAGS.devices)
  steps, runs = (SMOKE_STEPS, SMOKE_RUNS) if FLAGS.smoke else (STEPS, RUNS)
  times = jnp.linspace(1.0, 0.01, steps)
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
      common.print_record({"conv": name, "loop": loop, "batch": FLAGS.batch, "devices": FLAGS.devices,
                           "ms_per_step": round(ms_per_step(fn, (params, x0), steps, runs), 2)})


if __name__ == "__main__":
  define_flags(FLAGS)
  common.run(main)
