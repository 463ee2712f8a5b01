"""jaxguide's GroupNorm against flax's `nn.GroupNorm` in the sampling loop on XLA:CPU, each with
XLA's YNNPACK dots/convolutions on (the default) and off (`xla_cpu_experimental_ynn_fusion_type`
empty, passed as a compile option).

One classifier-guided Euler–Maruyama step of the mnist:quick networks (UNet on ε(x,t,∅) plus
the classifier's ∇ₓ log p_t(y|x)), 20 steps in one `lax.scan` through `samplers.sample`, for the
four combinations, compiled up front and then timed in alternating rounds (the machine's speed
drifts; alternation spreads the drift over all four). Random weights: speed does not depend on
them. Also the UNet forward alone and the classifier gradient alone.

  python benchmarks/cpu_sampling.py [--batch 80] [--rounds 7] [--smoke]

--smoke runs every configuration on networks of one level of 8 channels for 2 steps: that the
script runs, not how fast (CI).

The host is split into one XLA device per core as the scripts do (set XLA_FLAGS to override).
Prints one JSON line per configuration: milliseconds per sampling step, median over rounds.
"""
import time

import common
from absl import flags

from jaxguide import cpu

cpu.tune_host_malloc()   # before jax starts: huge pages for XLA:CPU's per-step buffers (jaxguide/cpu.py)
cpu.split_host()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import mnist  # noqa: E402
from jaxguide import guidance
from jaxguide import samplers
from jaxguide.diffusion import score
from jaxguide import models
from jaxguide.diffusion.sde import VPSDE  # noqa: E402

STEPS = 20
SMOKE_STEPS, SMOKE_MODEL = 2, dict(ch=8, ch_mult=(1,), groups=4)
YNNPACK_OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}
ORIGINAL_GROUP_NORM = models.group_norm   # build() swaps models.group_norm between the two


def flax_group_norm(num_groups, dtype=jnp.float32):
  return nn.GroupNorm(num_groups=num_groups, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32)


def build(norm: str, part: str, batch: int, steps: int = STEPS, smoke: bool = False):
  """(jitted function of (params, key), params) for one GroupNorm and one part of the step."""
  models.group_norm = {"flax": flax_group_norm, "jaxguide": ORIGINAL_GROUP_NORM}[norm]
  config = mnist.get_config("quick")
  config.score.model.param = "eps"   # the bare UNet (v-prediction adds two elementwise ops)
  if smoke:
    config.score.model.update(SMOKE_MODEL)
    config.classifier.model.update(SMOKE_MODEL)
  unet = models.build_model(config.score.model, 10, jnp.float32)
  clf = models.build_model(config.classifier.model, 10, jnp.float32)
  x, t = jnp.zeros((batch, 28, 28, 1)), jnp.full((batch,), 0.5)
  y = jnp.arange(batch, dtype=jnp.int32) % 10
  # Shapes only, filled with numpy's noise: an eager init of the UNet, or jax.random per leaf
  # (one threefry compile per shape), spends seconds on values that do not change the speed.
  params = {"score": jax.eval_shape(unet.init, jax.random.PRNGKey(0), x, t, y)["params"],
            "classifier": jax.eval_shape(clf.init, jax.random.PRNGKey(1), x, t)["params"]}
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda p: jnp.asarray(0.1 * rng.standard_normal(p.shape), jnp.float32), params)
  sde = VPSDE()

  def fn(p, key):
    eps = guidance.unconditional(score.eps_fn(unet.apply, p["score"]), 10)
    logp = score.log_prob_fn(clf.apply, p["classifier"])
    g = {"guided step": guidance.classifier(eps, logp, sde, 8.0),
         "UNet forward": eps,
         "classifier gradient": lambda x, t, y: guidance.classifier_grad(logp, x, t, y)}[part]
    return samplers.sample(key, g, sde, (batch, 28, 28, 1), y, "euler_maruyama", steps)
  return fn, params


def compile_step(fn, params, key, options: dict):
  """jit, lower and compile `fn` for (params, key) with the XLA compile `options`."""
  return jax.jit(fn).lower(params, key).compile(options)


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("batch", 80, "Samples per sampling call.", flag_values=fv)
  flags.DEFINE_integer("rounds", 7, "Timed rounds over all configurations.", flag_values=fv)
  flags.DEFINE_bool("smoke", False, f"Networks of one level, {SMOKE_STEPS} steps: a check that it "
                    "runs (CI).", flag_values=fv)


FLAGS = flags.FLAGS


def main(argv):
  del argv
  steps = SMOKE_STEPS if FLAGS.smoke else STEPS
  configs = [("guided step", norm, ynn) for norm in ("flax", "jaxguide") for ynn in ("on", "off")]
  configs += [(part, norm, "on") for part in ("UNet forward", "classifier gradient")
              for norm in ("flax", "jaxguide")]
  compiled = {}
  for part, norm, ynn in configs:
    fn, params = build(norm, part, FLAGS.batch, steps, FLAGS.smoke)
    key = jax.random.PRNGKey(0)
    options = YNNPACK_OFF if ynn == "off" else {}
    exe, compile_s = common.timed(compile_step, fn, params, key, options)
    jax.block_until_ready(exe(params, key))
    compiled[part, norm, ynn] = (exe, params, key, compile_s)
  times = {c: [] for c in configs}
  for _ in range(FLAGS.rounds):
    for c in configs:
      exe, params, key, _ = compiled[c]
      start = time.perf_counter()
      jax.block_until_ready(exe(params, key))
      times[c].append(1000 * (time.perf_counter() - start) / steps)
  for part, norm, ynn in configs:
    t = times[part, norm, ynn]
    common.print_record({"part": part, "group_norm": norm, "ynnpack": ynn, "batch": FLAGS.batch,
                         "devices": jax.device_count(), "ms_per_step": round(float(np.median(t)), 1),
                         "min_ms": round(min(t), 1),
                         "compile_s": round(compiled[part, norm, ynn][3], 1)})


if __name__ == "__main__":
  define_flags(FLAGS)
  common.run(main)
