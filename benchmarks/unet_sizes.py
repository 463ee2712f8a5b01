"""Sizing the CPU preset: one jitted training step (MSE ε-loss or cross-entropy + adam) at batch
64 on 28x28x1 for UNets and noisy classifiers of several widths, on one XLA device.

  python benchmarks/unet_sizes.py [unet16_r1 clf16 ...] [--batch 64] [--repeats 7] [--smoke]

Prints one JSON line per network: parameters, compile seconds, median / best step ms, images/s.
--smoke builds each named network of one level of 8 channels instead (UNet or classifier as
named): that the script runs, not how fast (CI).
"""
import common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from jaxguide import models


def bench(model, kind, batch=64, repeats=7):
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, 28, 28, 1))
  t = jax.random.uniform(jax.random.PRNGKey(1), (batch,))
  y = jnp.arange(batch) % 10
  if kind == "eps":
    params = model.init(jax.random.PRNGKey(2), x, t, y)["params"]
    loss = lambda p: jnp.mean((model.apply({"params": p}, x, t, y) - x) ** 2)
  else:
    params = model.init(jax.random.PRNGKey(2), x, t)["params"]
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x, t), y).mean()
  opt = optax.adam(1e-3)

  def step(p, s):
    value, grads = jax.value_and_grad(loss)(p)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, value

  compiled, compile_s = common.timed(lambda: jax.jit(step).lower(params, opt.init(params)).compile())
  state = [params, opt.init(params)]

  def one_step():
    p, s, value = compiled(*state)
    jax.block_until_ready((p, value))
    state[:] = p, s
  times = common.timed_runs(one_step, repeats)   # after a first, untimed step
  med, best = float(np.median(times)), float(min(times))
  return {"params": models.count_params(params), "compile_s": round(compile_s, 2),
          "step_ms_median": round(med * 1e3), "step_ms_min": round(best * 1e3),
          "img_s_median": round(batch / med), "img_s_best": round(batch / best)}


CONFIGS = {
    "unet16_r1": (lambda: models.UNet(10, ch=16, num_res_blocks=1), "eps"),
    "unet16_r2": (lambda: models.UNet(10, ch=16, num_res_blocks=2), "eps"),
    "unet24_r1": (lambda: models.UNet(10, ch=24, num_res_blocks=1), "eps"),
    "unet32_r1": (lambda: models.UNet(10, ch=32, num_res_blocks=1), "eps"),
    "unet32_r2": (lambda: models.UNet(10, ch=32, num_res_blocks=2), "eps"),
    "clf16": (lambda: models.NoisyClassifier(10, ch=16), "clf"),
    "clf32": (lambda: models.NoisyClassifier(10, ch=32), "clf"),
}

SMOKE = {"eps": lambda: models.UNet(10, ch=8, ch_mult=(1,), groups=4),
         "clf": lambda: models.NoisyClassifier(10, ch=8, ch_mult=(1,), groups=4)}


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("batch", 64, "Batch size of the training step.", flag_values=fv)
  flags.DEFINE_integer("repeats", 7, "Timed steps after the first.", flag_values=fv)
  flags.DEFINE_bool("smoke", False, "Tiny networks of the named kinds (CI).", flag_values=fv)


FLAGS = flags.FLAGS


def main(argv) -> None:
  names = argv[1:]   # networks to time (default all)
  unknown = [n for n in names if n not in CONFIGS]
  if unknown:
    common.usage_error(f"unknown network(s) {', '.join(unknown)}: use {', '.join(CONFIGS)}")
  for name in names or list(CONFIGS):
    make, kind = CONFIGS[name]
    model = SMOKE[kind]() if FLAGS.smoke else make()
    common.print_record(bench(model, kind, FLAGS.batch, FLAGS.repeats), label=name)


if __name__ == "__main__":
  define_flags(FLAGS)
  common.run(main, positional=True)
