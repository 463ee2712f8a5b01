"""Where the CPU training-step gap to PyTorch comes from: the score UNet's step taken apart.

  python benchmarks/cpu_train_anatomy.py [--sections width,per_core,convs,allreduce] [--rounds 2]
                                         [--steps 12] [--json FILE] [--smoke]

Needs the `bench` extra (torch) for the `width` and `per_core` sections. Every measurement runs in
a fresh process, because the XLA device count and the CPU affinity are fixed when a process starts;
jaxguide and PyTorch processes alternate, `--rounds` times, and each reports the median of
`--steps` steps after two warm-up steps. Sections:

  width      the mnist:quick score UNet at widths ch = 16, 24, 32: jaxguide's training step on 2 XLA
             devices against the PyTorch twin (benchmarks/run.py) on 2 threads, batch 64;
  per_core   the same step with each side confined to one core (`sched_setaffinity`): one XLA
             device against one PyTorch thread, batch 32, i.e. one device's share of the batch;
  convs      one 3x3 convolution on one core at the UNet's first-level shapes (32 x 28 x 28), with
             whether XLA handed it to YNNPACK (a `ynn_fusion` in the compiled HLO) or ran its own,
             and four other ways of writing the 16 -> 16 one (their max |diff| to it is printed);
  allreduce  the operands of the training step's gradient all-reduce, and the step with the
             gradients averaged as one flat vector by a `shard_map` + `psum` instead (not adopted:
             see docs/benchmarks.md).

Prints one JSON line per measurement and a table per section. --smoke runs every section on UNets
of one level of 8 channels (one width) at batch 4, and each way of writing the convolution at
16 -> 16 only: that the script runs, not how fast (CI).
"""
import json
import statistics
import subprocess
import sys

import common
from absl import flags

from jaxguide import cpu

SECTIONS = ("width", "per_core", "convs", "allreduce")

CHILD = r"""
import json, os, sys, time
if os.environ.get("ANATOMY_PIN"):
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})   # before any thread pool exists
sys.path.insert(0, ROOT); sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import numpy as np
import common
mode, args = sys.argv[1], json.loads(sys.argv[2])


def median_ms(call, steps):
  return 1000 * float(np.median(common.timed_runs(call, steps, warmup=2)))


def config(ch, smoke):
  from configs import mnist
  c = mnist.get_config("quick")
  c.score.model.ch = ch
  if smoke:
    c.score.model.update(ch_mult=(1,), groups=4)
  return c


if mode == "jax_step":
  import jax, jax.numpy as jnp, optax
  from jax.flatten_util import ravel_pytree
  from jax.sharding import PartitionSpec as P
  from jaxguide import config as config_lib, data, parallel, training
  c = config(args["ch"], args.get("smoke", False))
  ds = data.load("mnist5k")
  spec = training.model_spec("score", c, ds)
  tc = config_lib.model_train_config(c, "score")
  mesh = parallel.data_mesh(jax.devices())
  state = parallel.replicate(training.create_train_state(
      jax.random.PRNGKey(0), spec.model, spec.init_args, training.make_optimizer(tc), 0.99), mesh)
  batch = parallel.shard_batch(data.batch_at(ds, 0, args["batch"], 0), mesh)
  if args["variant"] == "gspmd":
    step = training.make_train_step(spec.loss_fn, mesh)
  else:   # one flat psum of (loss, gradients); each device draws its own noise for its rows
    def train_step(state, batch):
      key = jax.random.fold_in(state.rng, state.step)
      def local(params, batch):
        (loss, _), grads = jax.value_and_grad(spec.loss_fn, has_aux=True)(params, batch, key)
        return jax.lax.pmean(ravel_pytree((loss, grads))[0], parallel.DATA_AXIS)
      flat = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(parallel.DATA_AXIS)), out_specs=P(),
                           check_vma=False)(state.params, batch)
      loss, grads = ravel_pytree((jnp.zeros(()), state.params))[1](flat)
      return state.apply_gradients(grads), {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    step = jax.jit(train_step, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                   out_shardings=parallel.replicated(mesh), donate_argnums=0)
  compiled = step.lower(state, batch).compile()
  text = compiled.as_text()
  reduces = [l for l in text.splitlines() if " all-reduce(" in l]
  operands = sum(l.split(" all-reduce(")[1].split(")")[0].count("%") for l in reduces)
  holder = [state]
  def call():
    holder[0], metrics = compiled(holder[0], batch)
    jax.block_until_ready(metrics)
  out = {"step_ms": median_ms(call, args["steps"]), "allreduce_ops": len(reduces),
         "allreduce_operands": operands, "devices": jax.device_count()}
elif mode == "torch_step":
  import torch
  torch.set_num_threads(args["threads"])
  import run as harness
  c = config(args["ch"], args.get("smoke", False))
  trainer = harness.torch_trainer(c, "score", harness.build_torch(c, "score", dropout=True), "cpu", None)
  rng = np.random.default_rng(2)
  x = torch.tensor(rng.uniform(-1, 1, (args["batch"], 1, 28, 28)).astype(np.float32))
  y = torch.tensor(np.arange(args["batch"]) % 10).long()
  out = {"step_ms": median_ms(lambda: trainer(x, y), args["steps"]), "threads": torch.get_num_threads()}
elif mode == "conv":
  import jax, jax.numpy as jnp
  from jax import lax
  cin, cout, form = args["cin"], args["cout"], args["form"]
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 28, 28, cin))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, cin, cout))
  dn = ("NHWC", "HWIO", "NHWC")
  plain = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)

  def shifted(x, axes):   # the 3x3 neighbourhood along `axes`, stacked on the channel axis
    p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, wd = x.shape[1:3]
    taps = [(i, j) for i in (range(3) if 1 in axes else (1,)) for j in (range(3) if 2 in axes else (1,))]
    return jnp.concatenate([p[:, i:i + h, j:j + wd] for i, j in taps], -1)
  forms = {
      "direct": plain,
      # the three W-neighbours on the channel axis, then a (3, 1) kernel: 48 input features
      "unfold_w": lambda x, w: lax.conv_general_dilated(shifted(x, (2,)), w.reshape(3, 1, 3 * cin, cout),
                                                        (1, 1), ((1, 1), (0, 0)), dimension_numbers=dn),
      # im2col: the nine neighbours on the channel axis, then one matmul
      "im2col_dot": lambda x, w: (shifted(x, (1, 2)).reshape(-1, 9 * cin) @ w.reshape(9 * cin, cout)
                                  ).reshape(x.shape[:3] + (cout,)),
      # two halves of the batch side by side as two feature groups, the kernel repeated per group
      "batch_as_groups": lambda x, w: jnp.concatenate(jnp.split(lax.conv_general_dilated(
          jnp.concatenate(jnp.split(x, 2), -1), jnp.concatenate([w, w], -1), (1, 1), "SAME",
          dimension_numbers=dn, feature_group_count=2), 2, -1), 0),
      # one zero output channel more (17 features), then the slice back to 16
      "pad_out_17": lambda x, w: plain(x, jnp.pad(w, ((0, 0), (0, 0), (0, 0), (0, 1))))[..., :cout],
  }
  conv = jax.jit(forms[form])
  ynn = "ynn_fusion" in conv.lower(x, w).compile().as_text()
  err = float(jnp.max(jnp.abs(conv(x, w) - jax.jit(plain)(x, w))))
  ms = median_ms(lambda: jax.block_until_ready(conv(x, w)), args["steps"])
  out = {"ms": ms, "gflops": 2 * 32 * 28 * 28 * 9 * cin * cout / ms / 1e6, "ynnpack": ynn,
         "max_abs_diff": err}
print("RESULT " + json.dumps(out))
"""


def child(mode: str, args: dict, devices: int = 1, pin: bool = False) -> dict:
  env = common.cpu_env(devices)
  if pin:
    env["ANATOMY_PIN"] = "1"
  out = subprocess.run([sys.executable, "-c", CHILD.replace("ROOT", repr(common.ROOT)), mode,
                        json.dumps(args)], capture_output=True, text=True, env=env)
  lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  if out.returncode or not lines:
    sys.exit(f"{mode} {args} failed:\n{out.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def alternate(jobs: list, rounds: int) -> list:
  """Runs each (label, mode, args, devices, pin) `rounds` times, alternating; medians per label."""
  runs = {job[0]: [] for job in jobs}
  for r in range(rounds):
    for label, mode, args, devices, pin in (jobs if r % 2 == 0 else jobs[::-1]):
      result = child(mode, args, devices, pin)
      common.print_record({"label": label, **args, **result})
      runs[label].append(result)
  rows = []
  for label, results in runs.items():
    row = dict(results[-1])
    row["step_ms"] = statistics.median(r["step_ms"] for r in results)
    row["runs_ms"] = [round(r["step_ms"], 1) for r in results]
    rows.append({"label": label, **row})
  return rows


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_list("sections", list(SECTIONS), f"Comma list of sections to run: {','.join(SECTIONS)}.",
                    flag_values=fv)
  flags.register_validator(
      "sections", lambda v: set(v) <= set(SECTIONS),
      f"unknown section: use {','.join(SECTIONS)}", flag_values=fv)
  flags.DEFINE_integer("rounds", 2, "Runs of each measurement, jaxguide and PyTorch alternating.",
                       flag_values=fv)
  flags.DEFINE_integer("steps", 12, "Timed steps per run (after two warm-up steps).", flag_values=fv)
  flags.DEFINE_string("json", "", "Output file: the report, a list of rows per section.", flag_values=fv)
  flags.DEFINE_bool("smoke", False, "One-level UNets of 8 channels at batch 4, convolutions at "
                    "16 -> 16 only (CI).", flag_values=fv)


FLAGS = flags.FLAGS


def main(argv):
  del argv
  cpu.tune_host_malloc(children=True)   # the scripts' host set-up (huge pages), inherited by the timed children
  sections = FLAGS.sections
  # The UNet's settings: its widths, the batch of 2 devices (one device's half per core), its
  # default width; --smoke marks every job so that the children cut the network to one level.
  widths, batch, ch = ((8,), 4, 8) if FLAGS.smoke else ((16, 24, 32), 64, 16)
  unet = {"smoke": True} if FLAGS.smoke else {}
  report = {}
  if "width" in sections:
    rows = []
    for w in widths:
      jobs = [(f"jaxguide ch={w}", "jax_step", {"ch": w, "batch": batch, "variant": "gspmd", "steps": FLAGS.steps, **unet}, 2, False),
              (f"pytorch ch={w}", "torch_step", {"ch": w, "batch": batch, "threads": 2, "steps": FLAGS.steps, **unet}, 1, False)]
      rows += alternate(jobs, FLAGS.rounds)
    report["width"] = rows
  if "per_core" in sections:
    jobs = [("jaxguide 1 device, 1 core", "jax_step", {"ch": ch, "batch": batch // 2, "variant": "gspmd", "steps": FLAGS.steps, **unet}, 1, True),
            ("pytorch 1 thread, 1 core", "torch_step", {"ch": ch, "batch": batch // 2, "threads": 1, "steps": FLAGS.steps, **unet}, 1, True)]
    report["per_core"] = alternate(jobs, FLAGS.rounds)
  if "convs" in sections:
    rows = []
    shapes = [(16, 16)] if FLAGS.smoke else [(16, 16), (16, 32), (32, 16), (32, 32)]
    cases = [(cin, cout, "direct") for cin, cout in shapes]
    cases += [(16, 16, form) for form in ("unfold_w", "im2col_dot", "batch_as_groups", "pad_out_17")]
    for cin, cout, form in cases:
      result = child("conv", {"cin": cin, "cout": cout, "form": form, "steps": FLAGS.steps if FLAGS.smoke else 40}, 1, True)
      common.print_record({"cin": cin, "cout": cout, "form": form, **result})
      rows.append({"label": f"3x3 conv {cin} -> {cout} {form}", **result})
    report["convs"] = rows
  if "allreduce" in sections:
    jobs = [("per-leaf all-reduce (GSPMD)", "jax_step", {"ch": ch, "batch": batch, "variant": "gspmd", "steps": FLAGS.steps, **unet}, 2, False),
            ("one flat psum (shard_map)", "jax_step", {"ch": ch, "batch": batch, "variant": "flat_psum", "steps": FLAGS.steps, **unet}, 2, False)]
    report["allreduce"] = alternate(jobs, FLAGS.rounds)
  for section, rows in report.items():
    print(f"\n{section}")
    for row in rows:
      extra = {k: v for k, v in row.items() if k not in ("label",)}
      print(f"  {row['label']:<32} " + "  ".join(
          (f"{k}={v:.1e}" if abs(v) < 0.05 else f"{k}={v:.1f}") if isinstance(v, float) else f"{k}={v}"
          for k, v in extra.items()))
  common.write_json(FLAGS.json, report, indent=1)


if __name__ == "__main__":
  define_flags(FLAGS)
  common.run(main)
