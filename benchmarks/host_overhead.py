"""Host work per training step and per sampling step, with a network so small the device does nothing.

  python benchmarks/host_overhead.py [--batches 64,256] [--train_steps 1000] [--sample_steps 1000]

Training runs `training.train_model` as `train.py` does: the mnist5k batch stream, placement on
the `data` mesh, the jitted step, the metric checks and the checkpointer, with checkpoints and
logs only at the last step. Its network is ε(x, t, y) = s·x (one parameter) and the ε-loss reads
one pixel of each image, so the XLA computation costs microseconds and the loop's wall time per
step is the host's time per step: what a GPU or TPU would wait for. The figure is
`train_model`'s own steady-state throughput (after the compiling first step), as µs per step.
Beside it, the bare jitted step (one placed batch, called back to back): on XLA:CPU, which runs so
small a step inline, that is dispatch plus the CPU's own execution of the step, the floor under
the loop's figure; the difference is what the loop adds.

Sampling times one jitted `jg.sample` (euler_maruyama, classifier-free guidance, `sample_steps`
steps) of the same network on (B, 2) points, per step: the fixed cost of one step of the sampler's
`lax.scan`, with the network's arithmetic negligible.

The last line is `train_step_us=N sample_step_us=M`, the batch-64 figures. It uses only the
public API that predates the host-overhead work, so it also runs against older trees:
`PYTHONPATH=/path/to/old/tree python benchmarks/host_overhead.py`.
"""
import os
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

# This checkout only where no jaxguide is on sys.path, so that PYTHONPATH=/old/tree times that tree
# (benchmarks/common.py would put this checkout first).
if not any(os.path.isfile(os.path.join(p, "jaxguide", "__init__.py")) for p in sys.path if p):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jaxguide as jg  # noqa: E402
from configs import default  # noqa: E402
from jaxguide import data
from jaxguide.diffusion import losses
from jaxguide import parallel
from jaxguide import config as config_lib
from jaxguide import models
from jaxguide.training import specs
from jaxguide import training


class ScaleNet(nn.Module):
  """ε = s·x: one parameter, so the device's share of a step is a few elementwise ops."""
  num_classes: int

  @nn.compact
  def __call__(self, x, t, y, train: bool = False):
    del t, y, train
    return x * self.param("scale", nn.initializers.zeros, ())


def one_pixel_loss(model: nn.Module, sde, num_classes: int):
  """The library's ε-loss on pixel (0, 0) of each image: the whole batch still crosses the host
  and the placement, and any conversion of the full images stays inside the jitted step."""
  loss = losses.make_eps_loss(model.apply, sde, num_classes=num_classes)

  def loss_fn(params, batch, key):
    image = batch["image"]
    pixel = image[:, :1, :1].astype(jnp.float32)
    if image.dtype == jnp.uint8:   # trees whose host batches are uint8 pixels
      pixel = pixel / 127.5 - 1.0
    return loss(params, {**batch, "image": pixel}, key)
  return loss_fn


def _spec_and_config(batch: int, steps: int):
  config = default.get_config()
  config.models = "score"
  config.train.update({"steps": steps, "batch_size": batch, "log_every": steps,
                       "ckpt_every": steps, "warmup_steps": 1})
  ds = data.load("mnist5k")
  model = ScaleNet(ds.num_classes)
  spec = specs.ModelSpec("score", model, models.example_inputs("score", ds.shape),
                              one_pixel_loss(model, jg.VPSDE(), ds.num_classes), ds.num_classes)
  return spec, config, ds, parallel.data_mesh(jax.devices()[:1])


def train_step_us(batch: int, steps: int) -> float:
  """Wall µs per step of `train_model`'s loop in its steady state (its own throughput figure)."""
  spec, config, ds, mesh = _spec_and_config(batch, steps)
  with tempfile.TemporaryDirectory() as workdir:
    writer = training.MetricsWriter(workdir)
    _, speed = training.train_model(spec, config, workdir, ds, mesh, writer, progress=False)
  return 1e6 * batch / speed["images_per_s"]


def bare_step_us(batch: int, steps: int) -> float:
  """Wall µs per call of the jitted step alone, on one batch placed once: XLA:CPU runs a step this
  small inline, so this is the floor of dispatch plus the CPU's own execution of the step."""
  spec, config, ds, mesh = _spec_and_config(batch, steps)
  tc = config_lib.model_train_config(config, "score")
  state = parallel.replicate(training.create_train_state(
      jax.random.PRNGKey(0), spec.model, spec.init_args, training.make_optimizer(tc), 0.99), mesh)
  step = training.make_train_step(spec.loss_fn, mesh)
  host = getattr(data, "host_batch_at", data.batch_at)(ds, 0, batch, 0)   # what the loop places
  placed = parallel.shard_batch(host, mesh)
  state, metrics = step(state, placed)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, placed)
  jax.block_until_ready(metrics)
  return 1e6 * (time.perf_counter() - t0) / steps


def sample_step_us(batch: int, steps: int, repeats: int = 5) -> float:
  model = ScaleNet(4)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.zeros((1,)),
                      jnp.zeros((1,), jnp.int32))["params"]
  guided = jg.guidance.classifier_free(jg.eps_fn(model.apply, params), 3.0, 4)
  draw = jax.jit(lambda key, y: jg.sample(key, guided, jg.VPSDE(), (batch, 2), y,
                                          sampler="euler_maruyama", steps=steps))
  y = jnp.arange(batch, dtype=jnp.int32) % 4
  jax.block_until_ready(draw(jax.random.PRNGKey(0), y))   # compiles
  times = []
  for i in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(draw(jax.random.PRNGKey(i + 1), y))
    times.append(time.perf_counter() - t0)
  return 1e6 * float(np.median(times)) / steps


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("batches", "64,256", "Comma list of batch sizes.", flag_values=fv)
  flags.DEFINE_integer("train_steps", 1000, "Training steps per batch size.", flag_values=fv)
  flags.DEFINE_integer("sample_steps", 1000, "Sampling steps per batch size.", flag_values=fv)


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  batches = [int(b) for b in FLAGS.batches.split(",")]
  print(f"jaxguide from {os.path.dirname(os.path.abspath(jg.__file__))}; jax {jax.__version__} "
        f"on {jax.devices()[0].platform}")
  train_step_us(batches[0], 2)   # one-time costs (data loading, first compilations) out of the way
  results = {}
  for b in batches:
    results[b] = (train_step_us(b, FLAGS.train_steps), bare_step_us(b, FLAGS.train_steps),
                  sample_step_us(b, FLAGS.sample_steps))
    print(f"batch {b:4d}: train loop {results[b][0]:7.1f} us/step (bare jitted step "
          f"{results[b][1]:6.1f})   sample {results[b][2]:6.1f} us/step", flush=True)
  first = results[64] if 64 in results else results[batches[0]]
  print(f"train_step_us={first[0]:.0f} sample_step_us={first[2]:.0f}")


if __name__ == "__main__":
  define_flags(FLAGS)
  app.run(main)
