"""jaxguide against a PyTorch eager implementation of the same networks, side by side in one run.

  python benchmarks/run.py --json FILE [--preset cpu|gpu] [--quick | --smoke] [--jax-devices N]
                           [--torch-threads N] [--repeats N] [--steps N] [--large-batch N]
                           [--large-steps N] [--only REGEX] [--budget-s S] [--keep-going]

Needs the `bench` extra (torch; on a CPU machine install the CPU wheel first, see
pyproject.toml). Downloads nothing: the networks get seeded random weights and the training batch
is synthetic, since speed does not depend on the values. In order, it

 1. measures the device's peak with a large jitted matmul (float32, and bfloat16 on GPU);
 2. checks the weight port (benchmarks/torch_nets.py): the same inputs through Flax and PyTorch
    give max |Δ| <= 1e-4 in float32 for both networks, and their parameter gradients and the
    classifier's ∇ₓ log p agree; and that with identical noise jaxguide's `euler_maruyama` and the
    eager loop here end on the same samples after a few steps. Any failure stops the run (exit 1;
    with --keep-going the timings go on and the exit status is 1 at the end);
 3. times one network pass of each network (FLOPs from XLA's cost analysis);
 4. times Euler–Maruyama sampling, unguided (ε(x,t,∅)), classifier-guided
    (ε(x,t,∅) − w σ ∇ log p_t(y|x)) and CFG, at a small and a large batch, both sides fed the
    same x_T and the same per-step noise (drawn once with JAX);
 5. times one training step of the score network and of the classifier (AdamW after gradient
    clipping, EMA; the batch size of configs/mnist.py's preset).

jaxguide runs its own jitted code (`jaxguide.sample`, `training.make_train_step`); the PyTorch
side is an eager loop written here. JAX and PyTorch runs alternate; each time is the median of
`--repeats` runs after a warm-up, and JAX's compile time is reported apart. Writes `--json FILE`
(rewritten after every record, so a run cut short keeps what it measured): a list of records
{name, batch, jax_s, torch_s, ratio = torch_s / jax_s, max_abs_diff, device, ...}, and prints a
table at the end.

Presets (configs/mnist.py sizes the networks and the training batch; both sides build them as
models.build_model does, so a `score.model.param = "v"` UNet is read as a v-prediction
on both, and the PyTorch training step weights its ε-loss by `score.weighting` as jaxguide's):
  cpu  mnist:quick networks (ch 16); sampling B=8 × 1000 steps and B=64 × 100 steps; training
       batch 64; float32. The JAX side splits the host into one XLA device per core as the scripts
       do (jaxguide.cpu.split_host), PyTorch gets one thread per core.
  gpu  mnist:full networks (UNet ch 64, 2 res blocks, attention at 7x7; classifier ch 32);
       sampling B=8 × 1000 steps, B=80 × 1000 classifier-guided (the reference tutorial's 10 × 8
       grid) and B=4096 × 20 steps in float32 and bfloat16; training batch 256 in both.
       float32 means TF32 products on both sides (jax_default_matmul_precision="tensorfloat32"
       and PyTorch's allow_tf32 flags; `--f32-precision highest` for IEEE float32); bfloat16
       means bf16 compute with float32 parameters and loss (the networks' `dtype`;
       torch.autocast). Every check runs in IEEE float32. No record starts after 480 s
       (--budget-s), so that the whole run fits one 10-minute command and still prints its
       table; the records left out are named at the end.
"""
from __future__ import annotations

import copy
import contextlib
import dataclasses
import math
import os
import platform
import re
import sys
import time
import types
from typing import Any, Callable, Optional

import numpy as np
from absl import flags

# Before the heavy imports below: --budget-s counts from the start of the process.
PROCESS_START = time.perf_counter()

if __package__:   # imported as benchmarks.run (tests/bench_test.py)
  from benchmarks import common
else:   # python benchmarks/run.py, or `import run` with benchmarks/ on sys.path
  import common
from jaxguide import cpu

if __name__ == "__main__":
  cpu.tune_host_malloc()   # before jax starts: huge pages for XLA:CPU's per-step buffers (jaxguide/cpu.py);
  # the PyTorch side runs in this process too, under the same allocator settings

import flax  # noqa: E402
import jax  # noqa: E402
import jax.extend  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import jaxguide as jg  # noqa: E402
from benchmarks import torch_nets  # noqa: E402
from configs import mnist  # noqa: E402
from jaxguide import guidance
from jaxguide.diffusion import losses
from jaxguide import parallel
from jaxguide import config as config_lib
from jaxguide import models
from jaxguide.training import specs
from jaxguide import training

PORT_TOL = 1e-4         # float32 forward outputs, the issue's bound
GRAD_TOL = 1e-3         # gradients, relative to their largest entry
EM_TOL = 1e-3           # final samples after `check_steps` identical-noise EM steps
MODES = ("unguided", "classifier", "cfg")
NUM_CLASSES, SHAPE = 10, (28, 28, 1)

PRESETS = {
    "cpu": dict(config="quick", device="cpu", batch=8, steps=1000, grid_batch=0,
                large_batch=64, large_steps=100, dtypes=("float32",), repeats=5, check_steps=20,
                budget_s=0, peak_n=2048, smoke=False),
    "gpu": dict(config="full", device="cuda", batch=8, steps=1000, grid_batch=80,
                large_batch=4096, large_steps=20, dtypes=("float32", "bfloat16"), repeats=5,
                check_steps=20, budget_s=480, peak_n=8192, smoke=False),
}
QUICK = dict(steps=20, large_steps=4, repeats=2, check_steps=10)
# --smoke: every check and every kind of record once, in seconds: one batch of 2 (so no separate
# large-batch records), 2 steps, one timed run of one call (--min-run-s 0), a 64³ peak matmul, and
# the preset's networks cut to one level of 8 channels (their param kept) trained at the same
# batch of 2. It shows that the script runs and its checks pass, not how fast anything is.
SMOKE = dict(batch=2, steps=2, grid_batch=0, large_batch=2, large_steps=2, repeats=1,
             check_steps=2, peak_n=64, smoke=True)
SMOKE_MODEL = dict(ch=8, ch_mult=(1,), num_res_blocks=1, groups=4)
DTYPES = {"float32": (jnp.float32, None), "bfloat16": (jnp.bfloat16, torch.bfloat16)}


# --------------------------------------------------------------------------- shared helpers


def random_params(model, init_args: tuple, seed: int) -> Any:
  """The model's parameter tree (from `eval_shape`: no init compile) filled with seeded noise.

  Not Flax's init: the UNet's output conv and attention projections start at zero, which would
  make ε ≡ 0 and the port checks vacuous, and random biases and GroupNorm affines make a swapped
  or misplaced parameter show in the outputs. Kernels get LeCun-sized normals, GroupNorm scales
  1 + 0.1·N(0, 1), biases 0.1·N(0, 1), label embeddings N(0, 1).
  """
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *init_args)["params"]
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, noise = path[-1].key, rng.standard_normal(leaf.shape).astype(np.float32)
    if name == "kernel":
      return noise / math.sqrt(math.prod(leaf.shape[:-1]))
    return {"scale": 1.0 + 0.1 * noise, "bias": 0.1 * noise}.get(name, noise)
  return jax.tree_util.tree_map_with_path(lambda p, l: jnp.asarray(fill(p, l)), shapes)


def to_torch(a, device: str = "cpu", nchw: bool = False) -> torch.Tensor:
  """numpy/JAX array -> torch tensor; NHWC -> NCHW (on the last four axes) when `nchw`."""
  a = np.asarray(a)
  if nchw:
    a = np.moveaxis(a, -1, -3)
  return torch.from_numpy(np.array(a, order="C")).to(device)


def from_torch(t: torch.Tensor, nhwc: bool = False) -> np.ndarray:
  a = t.detach().float().cpu().numpy()
  return np.moveaxis(a, -3, -1) if nhwc else a


def max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@contextlib.contextmanager
def exact_float32():
  """IEEE float32 products on both sides for the equality checks: no TF32, and cuDNN's default
  convolution algorithms rather than autotuned ones (Winograd or FFT trade accuracy for speed)."""
  cudnn = torch.backends.cudnn
  saved = (torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark,
           cudnn.deterministic)
  torch.backends.cuda.matmul.allow_tf32 = cudnn.allow_tf32 = cudnn.benchmark = False
  cudnn.deterministic = True
  try:
    with jax.default_matmul_precision("highest"):
      yield
  finally:
    (torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark,
     cudnn.deterministic) = saved


def autocast(device: str, dtype: Optional[torch.dtype]):
  """torch.autocast for bf16 records, a no-op for float32 ones."""
  if dtype is None:
    return contextlib.nullcontext()
  return torch.autocast(device_type=device, dtype=dtype)


def cost_flops(compiled, shards: int = 1) -> float:
  """FLOPs of a compiled program from XLA's cost analysis.

  For an SPMD program the analysis is of one device's partition, hence `shards`; a `while` loop
  (lax.scan) is counted once, so for a sampler this is the FLOPs of one step.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):     # older jax: one dict per device
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan"))) * shards


# --------------------------------------------------------------------------- port checks


def _grad_diff(flax_grads, module: torch.nn.Module) -> float:
  """max |Δ| between Flax gradients (ported to PyTorch's layout) and `.grad`, relative."""
  ported = torch_nets.port_params(flax_grads)
  diff, scale = 0.0, 0.0
  for name, param in module.named_parameters():
    g = param.grad.detach().float().cpu().numpy()
    diff = max(diff, max_diff(ported[name].numpy(), g))
    scale = max(scale, float(np.max(np.abs(g))))
  return diff / max(scale, 1e-12)


def check_port(unet, clf, unet_params, clf_params, t_unet, t_clf, batch: int = 8,
               seed: int = 0, device: str = "cpu", shape: tuple = SHAPE) -> dict[str, float]:
  """Same inputs through Flax and PyTorch, in float32: forward outputs, parameter gradients of
  the training losses (dropout off) and the classifier guidance gradient ∇ₓ Σ log p_t(y|x).

  `t_unet` / `t_clf` must hold the ported weights. Returns the max |Δ| of each (gradients
  relative to their largest entry).
  """
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch,) + tuple(shape)).astype(np.float32)
  t = rng.uniform(1e-3, 1.0, batch).astype(np.float32)
  y = (np.arange(batch) % (NUM_CLASSES + 1)).astype(np.int32)      # includes the null label
  y_clf = np.minimum(y, NUM_CLASSES - 1)
  target = rng.standard_normal(x.shape).astype(np.float32)
  tx, tt = to_torch(x, device, nchw=True), to_torch(t, device)
  ty, ty_clf = to_torch(y, device).long(), to_torch(y_clf, device).long()
  errors = {}

  def eps_loss(p):
    pred = unet.apply({"params": p}, x, t, y)
    return jnp.mean((pred - target) ** 2), pred
  (_, pred), grads = jax.jit(jax.value_and_grad(eps_loss, has_aux=True))(unet_params)
  t_unet.zero_grad(set_to_none=True)
  t_pred = t_unet(tx, tt, ty)
  ((t_pred - to_torch(target, device, nchw=True)) ** 2).mean().backward()
  errors["unet"] = max_diff(pred, from_torch(t_pred, nhwc=True))
  errors["unet_grad"] = _grad_diff(grads, t_unet)

  def ce_loss(p):
    logits = clf.apply({"params": p}, x, t)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y_clf[:, None], 1)), logits
  (_, logits), grads = jax.jit(jax.value_and_grad(ce_loss, has_aux=True))(clf_params)
  t_clf.zero_grad(set_to_none=True)
  t_logits = t_clf(tx, tt)
  F.cross_entropy(t_logits, ty_clf).backward()
  errors["classifier"] = max_diff(logits, from_torch(t_logits))
  errors["classifier_grad"] = _grad_diff(grads, t_clf)

  grad_x = jax.jit(guidance.classifier_grad, static_argnums=0)(
      jg.log_prob_fn(clf.apply, clf_params), x, t, y_clf)
  t_grad_x = torch_classifier_grad(t_clf, tx, tt, ty_clf)
  errors["classifier_grad_x"] = max_diff(grad_x, from_torch(t_grad_x, nhwc=True)) / max(
      float(jnp.max(jnp.abs(grad_x))), 1e-12)
  return errors


# --------------------------------------------------------------------------- Euler–Maruyama


def torch_classifier_grad(clf, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
  """∇ₓ Σ_b log p_t(y_b | x_b) by torch.autograd: one backward pass for the batch."""
  with torch.enable_grad():
    xg = x.detach().requires_grad_(True)
    log_probs = torch.log_softmax(clf(xg, t).float(), dim=-1)
    (grad,) = torch.autograd.grad(log_probs.gather(1, y[:, None]).sum(), xg)
  return grad


def make_torch_eps(mode: str, unet, clf, scale: float, y: torch.Tensor, null: int) -> Callable:
  """The guided ε of `mode` as (x, t (B,), σ(t) as a float) -> ε̃, mirroring jaxguide.guidance."""
  y_null = torch.full_like(y, null)
  if mode == "unguided":
    return lambda x, t, sigma: unet(x, t, y_null)
  if mode == "classifier":
    def classifier(x, t, sigma):
      return unet(x, t, y_null) - (scale * sigma) * torch_classifier_grad(clf, x, t, y)
    return classifier
  y_both = torch.cat([y, y_null])

  def cfg(x, t, sigma):
    # Conditional and null passes in ONE forward on the stacked batch, as jaxguide's vmap.
    cond, uncond = unet(torch.cat([x, x]), torch.cat([t, t]), y_both).chunk(2)
    return (1.0 - scale) * uncond + scale * cond
  return cfg


def em_schedule(times: np.ndarray, sde: jg.VPSDE) -> list[tuple[float, ...]]:
  """Per step (t, g², σ(t), −½β(t), g√h, h, α(t)) in float32, by the formulas of jaxguide/sde.py.

  Precomputed once, as an eager sampler precomputes its schedule; the values are float32 so the
  Python floats the loop multiplies by are exactly what jaxguide computes in the scan.
  """
  times = np.array(times, np.float32)            # a writable copy: torch refuses read-only views
  t = torch.from_numpy(times[:-1])
  h = t - torch.from_numpy(times[1:])
  beta = sde.beta_min + t * (sde.beta_max - sde.beta_min)
  g = torch.sqrt(beta)
  alpha, sigma = torch_nets.marginal_coeffs(t, sde.beta_min, sde.beta_max)
  return list(zip(t.tolist(), (g * g).tolist(), sigma.tolist(), (-0.5 * beta).tolist(),
                  (g * torch.sqrt(h)).tolist(), h.tolist(), alpha.tolist()))


@torch.no_grad()
def torch_em(eps_fn: Callable, x: torch.Tensor, noise: torch.Tensor, schedule) -> torch.Tensor:
  """Eager Euler–Maruyama on the reverse SDE, the update of jaxguide.samplers.euler_maruyama:

    x ← x + (g² · (−ε̃/σ) − f(x, t)) h + g √h z,   f = −½βx,
  and as the last step Tweedie's x̂₀ = (x − σ ε̃) / α at its start time.
  """
  last = len(schedule) - 1
  for i, (t, g2, sigma, drift, noise_scale, h, alpha) in enumerate(schedule):
    eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device), sigma)
    if i == last:
      return (x - sigma * eps) / alpha
    x = x + (g2 * (-eps / sigma) - drift * x) * h + noise_scale * noise[i]
  return x


def jax_guided_eps(mode: str, unet, clf, sde: jg.VPSDE, null: int, score_params, clf_params,
                   scale) -> Callable:
  """jaxguide's guided ε of `mode`: eps_fn, then the guidance transform."""
  eps = jg.eps_fn(unet.apply, score_params)
  if mode == "unguided":
    return guidance.unconditional(eps, null)
  if mode == "classifier":
    return guidance.classifier(guidance.unconditional(eps, null),
                               jg.log_prob_fn(clf.apply, clf_params), sde, scale)
  return guidance.classifier_free(eps, scale, null)


def jax_sampler(mode: str, unet, clf, sde: jg.VPSDE, shape: tuple, steps: int,
                null: int) -> Callable:
  """jaxguide's own path: guided ε → jg.sample(euler_maruyama), jitted."""
  def run(key, y, score_params, clf_params, scale):
    g = jax_guided_eps(mode, unet, clf, sde, null, score_params, clf_params, scale)
    return jg.sample(key, g, sde, shape, y, sampler="euler_maruyama", steps=steps)
  return jax.jit(run)


def useful_step_flops(mode: str, unet, clf, sde: jg.VPSDE, batch: int, params: tuple,
                      scale: float) -> float:
  """FLOPs of one guided-ε evaluation compiled for ONE device: the work a step needs.

  The sampler's own cost analysis (one device's partition, times the devices) also counts work
  that a multi-device program duplicates, which would flatter the peak fraction.
  """
  def step(x, t, y, score_params, clf_params):
    return jax_guided_eps(mode, unet, clf, sde, NUM_CLASSES, score_params, clf_params, scale)(x, t, y)
  args = (np.zeros((batch,) + SHAPE, np.float32), np.full((batch,), 0.5, np.float32),
          np.zeros((batch,), np.int32)) + tuple(jax.device_get(p) for p in params)
  return cost_flops(jax.jit(step).lower(*args).compile())


def em_noise(key: jax.Array, shape: tuple, steps: int) -> tuple[np.ndarray, np.ndarray]:
  """The x_T and the per-step normals that `jg.sample(key, ...)` draws, reproduced outside it:
  key → (prior key, loop key), x_T = N(prior key), step i's z = N(split(loop key, steps)[i])."""
  key_prior, key_loop = jax.random.split(key)
  x_t = jax.random.normal(key_prior, shape, jnp.float32)
  z = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(jax.random.split(key_loop, steps))
  return np.asarray(x_t), np.asarray(z)


# --------------------------------------------------------------------------- timing


LONG_CALL_S = 1.0       # median_times: a call this long is timed without an untimed one before it


def median_times(calls: list[Callable[[], Any]], syncs: list[Callable[[Any], None]],
                 repeats: int, inner: list[int]) -> tuple[list[list[float]], list[Any]]:
  """Alternates the callables (order flipped every repeat), `inner[i]` calls per timed run.

  Each run's first call is untimed when it is short (< LONG_CALL_S): the first call after the
  other side ran pays for memory that side has just used (page faults, cold caches; 340 against
  180 ms for the quick UNet's training step on CPU-2), which would otherwise weigh on whichever
  side makes fewer calls per run. A long call (a sampling loop of seconds) is timed as it comes,
  that cost being small beside it. Returns each one's per-call times and last output. Callers
  have warmed every callable up.
  """
  times, outs = [[] for _ in calls], [None] * len(calls)
  for r in range(repeats):
    order = list(range(len(calls)))[::(-1 if r % 2 else 1)]
    for i in order:
      syncs[i](None)
      start = time.perf_counter()
      outs[i] = calls[i]()
      syncs[i](outs[i])
      done = 1
      if time.perf_counter() - start < LONG_CALL_S:
        start, done = time.perf_counter(), 0
      for _ in range(inner[i] - done):
        outs[i] = calls[i]()
      syncs[i](outs[i])
      times[i].append((time.perf_counter() - start) / inner[i])
  return times, outs


def calibrate(call: Callable, sync: Callable, min_s: float) -> int:
  """How many calls make one timed run last >= min_s (so ms-scale calls are measurable)."""
  start = time.perf_counter()
  sync(call())
  once = time.perf_counter() - start
  return max(1, min(1000, math.ceil(min_s / max(once, 1e-6))))


@dataclasses.dataclass
class Bench:
  """What every benchmark needs: the networks of both sides, devices, output file, settings."""

  args: types.SimpleNamespace       # the flags, as parsed by `flag_args`
  preset: dict
  device: str                        # torch device
  mesh: jax.sharding.Mesh
  config: Any                        # configs/mnist.py preset
  flax_nets: dict                    # (role, dtype name) -> flax module
  params: dict                       # role -> float32 params (replicated on the mesh)
  torch_nets: dict                   # role -> torch module (eval, ported weights)
  device_name: str
  records: list = dataclasses.field(default_factory=list)
  peaks: dict = dataclasses.field(default_factory=dict)          # dtype name -> FLOP/s
  port_errors: dict = dataclasses.field(default_factory=dict)    # check_port's result
  start: float = PROCESS_START
  failures: list = dataclasses.field(default_factory=list)       # failed checks (--keep-going)
  skipped: list = dataclasses.field(default_factory=list)        # records over --budget-s

  def fail(self, message: str) -> None:
    """A failed check stops the run, or with --keep-going is shouted now and fails it at the end
    (for a GPU lease of a few minutes, where stopping would lose every timing)."""
    if not self.args.keep_going:
      sys.exit(message)
    print(f"\n!!! {message}\n!!! (--keep-going: timing anyway; the run will exit with status 1)\n",
          flush=True)
    self.failures.append(message)

  def torch_sync(self, _=None) -> None:
    if self.device == "cuda":
      torch.cuda.synchronize()

  @staticmethod
  def jax_sync(out=None) -> None:
    if out is not None:
      jax.block_until_ready(out)

  def shards(self, batch: int) -> int:
    """How many devices jaxguide splits a batch over (it shards only when they divide it)."""
    n = self.mesh.devices.size
    return n if batch % n == 0 else 1

  def place_batch(self, tree):
    if self.shards(jax.tree.leaves(tree)[0].shape[0]) > 1:
      return parallel.shard_batch(tree, self.mesh)
    return jax.tree.map(jnp.asarray, tree)

  def wanted(self, name: str) -> bool:
    """Whether to run record `name`: --only matches it, and --budget-s is not spent yet."""
    if self.args.only and re.search(self.args.only, name) is None:
      return False
    if self.args.budget_s and time.perf_counter() - self.start > self.args.budget_s:
      print(f"{name}: skipped, the {self.args.budget_s:.0f} s budget is spent", flush=True)
      self.skipped.append(name)
      return False
    return True

  def add(self, record: dict) -> None:
    """Completes, prints and saves one record; the JSON is rewritten every time."""
    jax_s, torch_s = record.get("jax_s"), record.get("torch_s")
    record = {"name": record.pop("name"), "batch": record.pop("batch"), "jax_s": jax_s,
              "torch_s": torch_s,
              "ratio": torch_s / jax_s if jax_s and torch_s else None,
              "max_abs_diff": record.pop("max_abs_diff", None), "device": self.device_name,
              **{k: v for k, v in record.items() if k not in ("jax_s", "torch_s")},
              "jax_version": jax.__version__, "torch_version": torch.__version__}
    peak = self.peaks.get(record.get("dtype", "float32"))
    if record.get("flops") and peak:
      record["peak_fraction"] = record["flops"] / jax_s / peak if jax_s else None
      record["torch_peak_fraction"] = record["flops"] / torch_s / peak if torch_s else None
    self.records.append(record)
    print(f"{format_row(record)}  [{time.perf_counter() - self.start:.0f} s]", flush=True)
    common.write_json(self.args.json, self.records, indent=1)


# --------------------------------------------------------------------------- benchmarks


def measure_peak(b: Bench, dtype_name: str) -> None:
  """Achievable FLOP/s: a large jitted matmul per device, batch-sharded over the mesh, and a
  PyTorch matmul of the same size; the larger is the peak that fractions are taken of."""
  n = b.preset["peak_n"]
  dtype = DTYPES[dtype_name][0]
  devices = b.mesh.devices.size
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(key_a, (devices, n, n), dtype)
  c = jax.random.normal(key_b, (devices, n, n), dtype)
  a, c = parallel.shard_batch({"a": np.asarray(a), "c": np.asarray(c)}, b.mesh).values()
  matmul = jax.jit(lambda a, c: jnp.einsum("bij,bjk->bik", a, c))
  matmul(a, c).block_until_ready()
  runs, min_s = (1, 0.0) if b.preset["smoke"] else (5, 0.3)
  inner = calibrate(lambda: matmul(a, c), b.jax_sync, min_s)
  (times,), _ = median_times([lambda: matmul(a, c)], [b.jax_sync], runs, [inner])
  jax_peak = 2.0 * devices * n**3 / float(np.median(times))
  # PyTorch's matmul too: the device's peak is the better of the two, so that neither side's
  # fraction is flattered by the other library's slower GEMM (XLA:CPU's trails oneDNN's).
  t_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
  ta, tc = (torch.randn(n, n, device=b.device).to(t_dtype) for _ in range(2))
  t_inner = calibrate(lambda: ta @ tc, b.torch_sync, min_s)
  (t_times,), _ = median_times([lambda: ta @ tc], [b.torch_sync], runs, [t_inner])
  torch_peak = 2.0 * n**3 / float(np.median(t_times))
  b.peaks[dtype_name] = max(jax_peak, torch_peak)
  print(f"peak {dtype_name}: {b.peaks[dtype_name] / 1e12:.3f} TFLOP/s (jax {devices} x {n}^3 "
        f"matmul {jax_peak / 1e12:.3f}, torch {n}^3 matmul {torch_peak / 1e12:.3f})", flush=True)


def run_port_check(b: Bench) -> None:
  """Fails the run unless the PyTorch networks are the Flax ones (see check_port)."""
  with exact_float32():
    errors = check_port(b.flax_nets["score", "float32"], b.flax_nets["classifier", "float32"],
                        b.params["score"], b.params["classifier"], b.torch_nets["score"],
                        b.torch_nets["classifier"], batch=b.preset["batch"], device=b.device)
  print("port check (float32, max |Δ|; gradients relative): "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()), flush=True)
  b.port_errors = errors
  bad = [k for k, v in errors.items() if not v <= (PORT_TOL if k in ("unet", "classifier") else GRAD_TOL)]
  if bad:
    b.fail(f"PORT CHECK FAILED: {bad} above tolerance ({errors}); the PyTorch networks do not "
           "match jaxguide's: fix benchmarks/torch_nets.py before trusting any timing")


def bench_forward(b: Bench, role: str, batch: int, dtype_name: str) -> None:
  """One network pass on both sides: time, FLOPs, and the output difference."""
  name = f"fwd_{role}_B{batch}" + ("" if dtype_name == "float32" else f"_{dtype_name}")
  if not b.wanted(name):
    return
  rng = np.random.default_rng(1)
  inputs = (rng.standard_normal((batch,) + SHAPE).astype(np.float32),
            rng.uniform(1e-3, 1, batch).astype(np.float32),
            (np.arange(batch) % (NUM_CLASSES + 1)).astype(np.int32))
  inputs = inputs if role == "score" else inputs[:2]
  module = b.flax_nets[role, dtype_name]
  apply = jax.jit(lambda p, args: module.apply({"params": p}, *args))
  args = b.place_batch(inputs)
  start = time.perf_counter()
  compiled = apply.lower(b.params[role], args).compile()
  compile_s = time.perf_counter() - start
  t_net, t_dtype = b.torch_nets[role], DTYPES[dtype_name][1]
  t_args = [to_torch(inputs[0], b.device, nchw=True), to_torch(inputs[1], b.device)]
  if role == "score":
    t_args.append(to_torch(inputs[2], b.device).long())

  @torch.no_grad()
  def torch_call():
    with autocast(b.device, t_dtype):
      return t_net(*t_args)
  calls = [lambda: compiled(b.params[role], args), torch_call]
  syncs = [b.jax_sync, b.torch_sync]
  inner = [calibrate(c, s, b.args.min_run_s) for c, s in zip(calls, syncs)]
  (jt, tt), (jo, to) = median_times(calls, syncs, b.preset["repeats"], inner)
  jo, to = np.asarray(jo), from_torch(to, nhwc=(role == "score"))
  b.add({"name": name, "batch": batch, "jax_s": float(np.median(jt)), "torch_s": float(np.median(tt)),
         "max_abs_diff": max_diff(jo, to), "dtype": dtype_name, "compile_s": compile_s,
         "flops": cost_flops(compiled, b.shards(batch)), "jax_runs": jt, "torch_runs": tt})


def sampling_setup(b: Bench, mode: str, batch: int, steps: int, dtype_name: str,
                   count_flops: bool = True):
  """Both sides' sampler for one configuration: (jax call, torch call, compile s, FLOPs), FLOPs a
  dict of the run's useful FLOPs and those the compiled (multi-device) program executes."""
  shape, sde = (batch,) + SHAPE, jg.VPSDE(b.config.sde.beta_min, b.config.sde.beta_max)
  scale = b.args.cfg_scale if mode == "cfg" else b.args.clf_scale
  key = jax.random.PRNGKey(batch * 7919 + steps)
  y_np = (np.arange(batch) % NUM_CLASSES).astype(np.int32)
  y = b.place_batch({"y": y_np})["y"]
  unet, clf = b.flax_nets["score", dtype_name], b.flax_nets["classifier", dtype_name]
  args = (key, y, b.params["score"], b.params["classifier"], jnp.float32(scale))
  start = time.perf_counter()
  compiled = jax_sampler(mode, unet, clf, sde, shape, steps, NUM_CLASSES).lower(*args).compile()
  compile_s = time.perf_counter() - start
  flops = {}
  if count_flops:
    flops["executed_flops"] = cost_flops(compiled, b.shards(batch)) * steps
    flops["flops"] = flops["executed_flops"]
    if b.shards(batch) > 1:
      flops["flops"] = steps * useful_step_flops(mode, unet, clf, sde, batch,
                                                 (b.params["score"], b.params["classifier"]), scale)

  x_t, z = em_noise(key, shape, steps)
  t_x, t_z = to_torch(x_t, b.device, nchw=True), to_torch(z, b.device, nchw=True)
  schedule = em_schedule(np.asarray(sde.time_grid(steps)), sde)
  eps = make_torch_eps(mode, b.torch_nets["score"], b.torch_nets["classifier"], scale,
                       to_torch(y_np, b.device).long(), NUM_CLASSES)
  t_dtype = DTYPES[dtype_name][1]

  def torch_call():
    with autocast(b.device, t_dtype):
      return torch_em(eps, t_x, t_z, schedule)
  return (lambda: compiled(*args)), torch_call, compile_s, flops


def check_sampling(b: Bench, mode: str) -> None:
  """Identical noise, a few steps, IEEE float32: both samplers must end on the same samples."""
  batch, steps = b.preset["batch"], b.preset["check_steps"]
  name = f"check_em_{mode}_B{batch}_{steps}steps"
  if not b.wanted(name):
    return
  with exact_float32():
    jax_call, torch_call, compile_s, _ = sampling_setup(b, mode, batch, steps, "float32",
                                                        count_flops=False)
    start = time.perf_counter()
    jo = np.asarray(jax_call())
    jax_s = time.perf_counter() - start
    start = time.perf_counter()
    to = from_torch(torch_call(), nhwc=True)
    b.torch_sync()
    torch_s = time.perf_counter() - start
  diff = max_diff(jo, to)
  b.add({"name": name, "batch": batch, "jax_s": jax_s, "torch_s": torch_s, "max_abs_diff": diff,
         "dtype": "float32", "steps": steps, "compile_s": compile_s,
         "sample_abs_max": float(np.max(np.abs(jo)))})
  if not diff <= EM_TOL * max(1.0, float(np.max(np.abs(jo)))):
    b.fail(f"EM CHECK FAILED: {name}: max |Δ| = {diff:.3e}: the eager loop is not the "
           "update of jaxguide.samplers.euler_maruyama")


def bench_sampling(b: Bench, mode: str, batch: int, steps: int, dtype_name: str) -> None:
  name = f"em_{mode}_B{batch}" + ("" if dtype_name == "float32" else f"_{dtype_name}")
  name += "" if steps == 1000 else f"_{steps}steps"
  if not b.wanted(name):
    return
  jax_call, torch_call, compile_s, flops = sampling_setup(b, mode, batch, steps, dtype_name)
  b.jax_sync(jax_call())                       # warm-up: the first run of each side is not timed
  b.torch_sync(torch_call())
  (jt, tt), (jo, to) = median_times([jax_call, torch_call], [b.jax_sync, b.torch_sync],
                                    b.preset["repeats"], [1, 1])
  jo, to = np.asarray(jo), from_torch(to, nhwc=True)
  jax_s, torch_s = float(np.median(jt)), float(np.median(tt))
  b.add({"name": name, "batch": batch, "jax_s": jax_s, "torch_s": torch_s,
         "max_abs_diff": max_diff(jo, to), "dtype": dtype_name, "steps": steps,
         "compile_s": compile_s, **flops, "images_per_s": batch / jax_s,
         "torch_images_per_s": batch / torch_s, "steps_per_s": steps / jax_s,
         "torch_steps_per_s": steps / torch_s, "finite": bool(np.all(np.isfinite(jo))),
         "sample_abs_max": float(np.max(np.abs(jo))),
         "jax_runs": jt, "torch_runs": tt})
  if b.device == "cuda":
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------- training step


def lr_lambda(tc) -> Callable[[int], float]:
  """training.make_optimizer's schedule as a LambdaLR factor: linear warm-up, then constant or
  cosine decay to 0.1·lr (optax.warmup_cosine_decay_schedule)."""
  warmup, total = max(int(tc.warmup_steps), 1), max(int(tc.steps), int(tc.warmup_steps) + 1)

  def factor(step: int) -> float:
    if step < warmup:
      return step / warmup
    if tc.schedule != "cosine":
      return 1.0
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
  return factor


def torch_loss_weight(sde: jg.VPSDE, t: torch.Tensor, weighting: str, gamma: float) -> torch.Tensor:
  """jaxguide.diffusion.losses.loss_weight: w(t) (B,) on each sample's ε squared error, from λ(t) as
  jaxguide/sde.py computes it."""
  log_alpha = -0.25 * t**2 * (sde.beta_max - sde.beta_min) - 0.5 * t * sde.beta_min
  snr = torch.exp(2.0 * log_alpha - torch.log(-torch.expm1(2.0 * log_alpha)))
  if weighting == "eps":
    return torch.ones_like(t)
  if weighting == "v":
    return 1.0 + 1.0 / snr
  if weighting == "min_snr":
    return torch.clamp(snr, max=gamma) / snr
  if weighting == "velocity":   # ((ασ' − α'σ)/α)² = β²/(4σ²) on the VP-SDE
    beta = sde.beta_min + t * (sde.beta_max - sde.beta_min)
    return beta**2 / (4.0 * -torch.expm1(2.0 * log_alpha))
  raise ValueError(f"weighting={weighting!r}: use one of {losses.WEIGHTINGS}")


class TorchTrainer:
  """The eager training step that matches jaxguide.training's: t ~ U(t_eps, 1), x_t = αx₀ + σε, label
  dropout to ∅ (score), forward, the ε squared error weighted by w(t) (`weighting`, as
  score.weighting) or cross-entropy, backward, global-norm clipping, AdamW with the same
  schedule, EMA with jaxguide.training's warm-up."""

  def __init__(self, module, role: str, tc, sde: jg.VPSDE, p_uncond: float, device: str,
               dtype: Optional[torch.dtype], weighting: str = "eps", min_snr_gamma: float = 5.0):
    self.module, self.role, self.tc, self.sde = module.train(), role, tc, sde
    self.p_uncond, self.device, self.dtype = p_uncond, device, dtype
    self.weighting, self.min_snr_gamma = weighting, min_snr_gamma
    self.params = list(module.parameters())
    self.opt = torch.optim.AdamW(self.params, lr=tc.lr, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=tc.weight_decay)
    self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(tc))
    self.ema = [p.detach().clone() for p in self.params]
    self.step_count = 0

  def __call__(self, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    b, t_eps = x0.shape[0], self.tc.t_eps
    t = torch.rand(b, device=self.device) * (1 - t_eps) + t_eps
    alpha, sigma = torch_nets.marginal_coeffs(t, self.sde.beta_min, self.sde.beta_max)
    eps = torch.randn_like(x0)
    x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    with autocast(self.device, self.dtype):
      if self.role == "score":
        drop = torch.rand(b, device=self.device) < self.p_uncond
        pred = self.module(x_t, t, torch.where(drop, NUM_CLASSES, y))
        err = ((pred.float() - eps) ** 2).mean(dim=(1, 2, 3))
        loss = (torch_loss_weight(self.sde, t, self.weighting, self.min_snr_gamma) * err).mean()
      else:
        loss = F.cross_entropy(self.module(x_t, t).float(), y)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, self.tc.grad_clip)
    self.opt.step()
    self.sched.step()
    decay = min(self.tc.ema_decay, (1.0 + self.step_count) / (10.0 + self.step_count))
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, self.params, 1.0 - decay)
    self.step_count += 1
    return loss


def torch_trainer(config, role: str, module, device: str, dtype: Optional[torch.dtype]) -> TorchTrainer:
  """The TorchTrainer of `config`'s `role` (its training settings, SDE and ε-loss weighting)."""
  if role == "score" and config.score.get("t_sampling", "uniform") != "uniform":
    raise ValueError(f"score.t_sampling={config.score.t_sampling!r}: TorchTrainer draws t ~ U(t_eps, 1) "
                     "only; time the uniform case")
  return TorchTrainer(module, role, config_lib.model_train_config(config, role),
                      jg.VPSDE(config.sde.beta_min, config.sde.beta_max), config.score.p_uncond,
                      device, dtype, config.score.get("weighting", "eps"),
                      config.score.get("min_snr_gamma", 5.0))


def precision_census(loss_fn, params, batch) -> dict[str, Any]:
  """Which dtypes the convolutions and matmuls of a training loss run in, from its jaxpr, and
  the dtypes of parameters and loss: the mixed-precision contract (bf16 compute, float32 rest)."""
  counts: dict[str, int] = {}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
        key = f"{eqn.primitive.name.split('_')[0]}_{eqn.invars[0].aval.dtype}"
        counts[key] = counts.get(key, 0) + 1
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  closed = jax.make_jaxpr(loss_fn)(params, batch, jax.random.PRNGKey(0))
  walk(closed.jaxpr)
  loss_dtype = str(closed.out_avals[0].dtype)
  param_dtypes = sorted({str(p.dtype) for p in jax.tree.leaves(params)})
  return {"ops": counts, "loss_dtype": loss_dtype, "param_dtypes": param_dtypes}


def bench_train(b: Bench, role: str, dtype_name: str) -> None:
  config = copy.deepcopy(b.config)
  config.train.dtype = dtype_name
  tc = config_lib.model_train_config(config, role)
  name = f"train_{role}_B{tc.batch_size}" + ("" if dtype_name == "float32" else f"_{dtype_name}")
  if not b.wanted(name):
    return
  spec = specs.model_spec(role, config, types.SimpleNamespace(num_classes=NUM_CLASSES, shape=SHAPE))
  tx = training.make_optimizer(tc)
  params = jax.device_get(b.params[role])
  # create_train_state's state around the benchmark's parameters: its init (a compile of seconds)
  # would make parameters that are replaced.
  state = training.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               ema_params=jax.tree.map(np.copy, params), opt_state=tx.init(params),
                               rng=jax.random.split(jax.random.PRNGKey(3))[1], tx=tx,
                               ema_decay=tc.ema_decay)
  state = parallel.replicate(state, b.mesh)
  rng = np.random.default_rng(2)
  host = {"image": rng.uniform(-1, 1, (tc.batch_size,) + SHAPE).astype(np.float32),
          "label": (np.arange(tc.batch_size) % NUM_CLASSES).astype(np.int32)}
  batch = parallel.shard_batch(host, b.mesh)
  census = precision_census(spec.loss_fn, jax.device_get(params), host)
  start = time.perf_counter()
  compiled = training.make_train_step(spec.loss_fn, b.mesh).lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  flops = cost_flops(compiled, b.mesh.devices.size)
  holder = [state]

  def jax_call():
    holder[0], metrics = compiled(holder[0], batch)
    return metrics
  module = torch_nets.load_flax_params(build_torch(b.config, role, dropout=True), params).to(b.device)
  trainer = torch_trainer(config, role, module, b.device, DTYPES[dtype_name][1])
  t_x, t_y = to_torch(host["image"], b.device, nchw=True), to_torch(host["label"], b.device).long()
  calls, syncs = [jax_call, lambda: trainer(t_x, t_y)], [b.jax_sync, b.torch_sync]
  inner = [calibrate(c, s, b.args.min_run_s) for c, s in zip(calls, syncs)]
  (jt, tt), (jo, to) = median_times(calls, syncs, b.preset["repeats"], inner)
  jax_s, torch_s = float(np.median(jt)), float(np.median(tt))
  b.add({"name": name, "batch": tc.batch_size, "jax_s": jax_s, "torch_s": torch_s,
         "max_abs_diff": b.port_errors[f"{'unet' if role == 'score' else 'classifier'}_grad"],
         "max_abs_diff_is": "relative parameter-gradient difference of the port check",
         "dtype": dtype_name, "compile_s": compile_s, "flops": flops,
         "images_per_s": tc.batch_size / jax_s, "torch_images_per_s": tc.batch_size / torch_s,
         "jax_loss": float(jo["loss"]), "torch_loss": to.item(), "precision": census,
         "jax_runs": jt, "torch_runs": tt})


# --------------------------------------------------------------------------- set-up and main


def build_torch(config, role: str, dropout: bool = False) -> torch.nn.Module:
  """The PyTorch twin of `config.<role>.model`, as models.build_model builds the Flax one: a
  score network with `param='v'` wrapped in torch_nets.VPrediction (dropout 0 unless `dropout`:
  sampling is eval)."""
  kw = {k: tuple(v) if isinstance(v, (list, tuple)) else v
        for k, v in config[role].model.to_dict().items() if k not in ("arch", "param")}
  if not dropout:
    kw["dropout"] = 0.0
  if role != "score":
    kw.pop("attn_resolutions", None)
    return torch_nets.NoisyClassifier(NUM_CLASSES, in_ch=SHAPE[-1], image_size=SHAPE[0], **kw)
  net = torch_nets.UNet(NUM_CLASSES, in_ch=SHAPE[-1], image_size=SHAPE[0], **kw)
  param = config[role].model.get("param", "eps")
  if param not in models.PARAMS:
    raise ValueError(f"{role}.model.param={param!r}: use one of {models.PARAMS}")
  return torch_nets.VPrediction(net, config.sde.beta_min, config.sde.beta_max) if param == "v" else net


def device_name(device: str) -> str:
  jax_devices = jax.devices()
  if device == "cuda":
    return f"{torch.cuda.get_device_name(0)}; jax {jax_devices[0].device_kind}"
  model = platform.processor() or "cpu"
  with contextlib.suppress(OSError):
    with open("/proc/cpuinfo") as f:
      names = re.findall(r"model name\s*:\s*(.*)", f.read())
      model = names[0].strip() if names else model
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return (f"cpu {model}, {cores} cores; jax {len(jax_devices)} XLA device(s); "
          f"torch {torch.get_num_threads()} thread(s)")


def make_bench(args, preset: dict) -> Bench:
  device = preset["device"]
  if device == "cuda" and not (torch.cuda.is_available() and jax.default_backend() == "gpu"):
    sys.exit(f"--preset gpu needs CUDA in both frameworks: torch sees cuda={torch.cuda.is_available()}, "
             f"jax's backend is {jax.default_backend()!r}")
  config = mnist.get_config(preset["config"])
  if preset["smoke"]:
    for role in ("score", "classifier"):
      config[role].model.update(SMOKE_MODEL)
      config[role].train.batch_size = preset["batch"]
    config.score.model.attn_resolutions = ()     # one level: no feature map of the preset's sizes
  sde = jg.VPSDE(config.sde.beta_min, config.sde.beta_max)
  mesh = parallel.data_mesh(jax.local_devices())
  flax_nets, params, t_nets = {}, {}, {}
  dummy = jnp.zeros((1,) + SHAPE), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
  for i, role in enumerate(("score", "classifier")):
    for dtype_name in ("float32", "bfloat16"):
      flax_nets[role, dtype_name] = models.build_model(config[role].model, NUM_CLASSES,
                                                           DTYPES[dtype_name][0], sde, role)
    init_args = dummy if role == "score" else dummy[:2]
    p = random_params(flax_nets[role, "float32"], init_args, seed=10 * i)
    t_nets[role] = torch_nets.load_flax_params(build_torch(config, role), p).to(device).eval()
    params[role] = parallel.replicate(p, mesh)
  return Bench(args, preset, device, mesh, config, flax_nets, params, t_nets,
               device_name(device))


def run_all(b: Bench) -> None:
  p = b.preset
  for dtype_name in ["float32"] + [d for d in p["dtypes"] if d != "float32"]:
    measure_peak(b, dtype_name)
  run_port_check(b)
  for mode in MODES:
    check_sampling(b, mode)
  for batch in sorted({p["batch"], p["large_batch"]}):
    for dtype_name in p["dtypes"] if batch == p["large_batch"] else ("float32",):
      for role in ("score", "classifier"):
        bench_forward(b, role, batch, dtype_name)
  # Most wanted first: a GPU run cut short by its time limit still has the headline numbers.
  for mode in ("classifier", "unguided", "cfg"):
    bench_sampling(b, mode, p["batch"], p["steps"], "float32")
  if p["grid_batch"]:
    bench_sampling(b, "classifier", p["grid_batch"], p["steps"], "float32")
  large = sorted(p["dtypes"], key=lambda d: d == "float32")      # bf16 first where there is one
  if (p["large_batch"], p["large_steps"], large[0]) != (p["batch"], p["steps"], "float32"):
    for mode in ("classifier", "unguided", "cfg"):     # not the same records again (--smoke)
      bench_sampling(b, mode, p["large_batch"], p["large_steps"], large[0])
  for dtype_name in large:
    for role in ("score", "classifier"):
      bench_train(b, role, dtype_name)
  for dtype_name in large[1:]:
    for mode in ("classifier", "unguided", "cfg"):
      bench_sampling(b, mode, p["large_batch"], p["large_steps"], dtype_name)


def fmt(v, spec: str) -> str:
  """format(v, spec), or a dash right-aligned to the spec's width for a missing value."""
  return format(v, spec) if v is not None else "-".rjust(int(re.match(r"\d*", spec)[0] or 0))


def format_row(r: dict) -> str:
  frac = lambda k: None if r.get(k) is None else 100 * r[k]
  gflop = None if r.get("flops") is None else r["flops"] / 1e9
  return (f"{r['name']:<34}{r['batch']:>6}{fmt(r['jax_s'], '10.4f')}{fmt(r['torch_s'], '10.4f')}"
          f"{fmt(r['ratio'], '8.2f')}{fmt(r['max_abs_diff'], '10.1e')}"
          f"{fmt(r.get('compile_s'), '9.1f')}{fmt(gflop, '11.1f')}"
          f"{fmt(frac('peak_fraction'), '8.1f')}{fmt(frac('torch_peak_fraction'), '8.1f')}")


HEADER = (f"{'name':<34}{'batch':>6}{'jax s':>10}{'torch s':>10}{'t/j':>8}{'max|Δ|':>10}"
          f"{'comp s':>9}{'GFLOP':>11}{'jax%pk':>8}{'trc%pk':>8}")


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("json", None, "Output file: a list of records.", flag_values=fv)
  flags.mark_flag_as_required("json", flag_values=fv)
  flags.DEFINE_enum("preset", "cpu", sorted(PRESETS), "Networks, sizes and device.", flag_values=fv)
  flags.DEFINE_bool("quick", False, f"Short run: {QUICK} (the records' names say the step counts).",
                    flag_values=fv)
  flags.DEFINE_bool("smoke", False, "Every check and record once on tiny networks and sizes, in "
                    "seconds (CI: the script runs; no timing means anything).", flag_values=fv)
  flags.DEFINE_integer("repeats", None, "Timed runs per side (default 5, quick 2).", flag_values=fv)
  flags.DEFINE_integer("steps", None, "Sampling steps at the small batch (1000).", flag_values=fv)
  flags.DEFINE_integer("large-batch", None, "The large sampling batch (the preset's).",
                       flag_values=fv)
  flags.DEFINE_integer("large-steps", None, "Sampling steps at the large batch (the preset's).",
                       flag_values=fv)
  flags.DEFINE_integer("jax-devices", 0, "XLA CPU devices (default: one per core, "
                       "jaxguide.cpu.split_host).", flag_values=fv)
  flags.DEFINE_integer("torch-threads", 0, "PyTorch threads (default: one per core).", flag_values=fv)
  flags.DEFINE_enum("f32-precision", "tf32", ["tf32", "highest"], "float32 products on GPU: TF32 "
                    "on both sides, or IEEE float32.", flag_values=fv)
  flags.DEFINE_float("clf-scale", 8.0, "Classifier guidance w.", flag_values=fv)
  flags.DEFINE_float("cfg-scale", 3.0, "CFG s.", flag_values=fv)
  flags.DEFINE_float("min-run-s", None, "Short calls are repeated within one timed run to last "
                     "this long (default 0.2, --smoke 0).", flag_values=fv)
  flags.DEFINE_string("only", "", "Regex: run only the records it matches.", flag_values=fv)
  flags.DEFINE_float("budget-s", None, "Start no record after this many seconds, so that a run "
                     "under a hard time limit still ends with its table (gpu default 480, cpu "
                     "none).", flag_values=fv)
  flags.DEFINE_bool("keep-going", False, "A failed check does not stop the timings (the exit "
                    "status is still 1).", flag_values=fv)


FLAGS = flags.FLAGS


def flag_args(fv: flags.FlagValues) -> types.SimpleNamespace:
  """The parsed flags as attributes, hyphens as underscores (args.budget_s for --budget-s);
  `configure` fills in the defaults that depend on the preset."""
  return types.SimpleNamespace(**{f.name.replace("-", "_"): f.value
                                  for f in fv.get_flags_for_module(sys.modules[__name__])})


def configure(args) -> dict:
  """Environment for both frameworks; must run before JAX starts its backend."""
  if args.jax_devices:
    os.environ["XLA_FLAGS"] = common.xla_flags(args.jax_devices)
  else:
    cpu.split_host()
  # Both frameworks share the GPU: JAX must not grab 75 % of its memory up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  torch.set_num_threads(args.torch_threads or cores or 1)
  preset = dict(PRESETS[args.preset])
  if args.quick:
    preset.update(QUICK)
  if args.smoke:
    preset.update(SMOKE)
  if args.min_run_s is None:
    args.min_run_s = 0.0 if args.smoke else 0.2
  if args.budget_s is None:
    args.budget_s = preset["budget_s"]
  for key in ("repeats", "steps", "large_batch", "large_steps"):
    if getattr(args, key) is not None:
      preset[key] = getattr(args, key)
  if preset["device"] == "cuda":
    torch.backends.cudnn.benchmark = True      # PyTorch's fastest convolutions, autotuned
    # Named explicitly on both sides, so that "float32" records compare the same arithmetic.
    tf32 = args.f32_precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if tf32 else "float32")
  return preset


def main(argv) -> None:
  del argv
  args = flag_args(FLAGS)
  preset = configure(args)
  b = make_bench(args, preset)
  print(f"device: {b.device_name}\npreset: {args.preset} {preset}\n"
        f"jax {jax.__version__} ({len(jax.devices())} {jax.default_backend()} devices), "
        f"flax {flax.__version__}, torch {torch.__version__}\n{HEADER}", flush=True)
  start = time.perf_counter()
  run_all(b)
  print(f"\n{HEADER}")
  for record in b.records:
    print(format_row(record))
  print(f"{len(b.records)} records in {time.perf_counter() - start:.0f} s -> {args.json}")
  if b.skipped:
    print(f"skipped over the budget (run them with --only '{'|'.join(b.skipped)}'): "
          f"{', '.join(b.skipped)}")
  if b.failures:
    sys.exit("FAILED CHECKS:\n" + "\n".join(b.failures))


if __name__ == "__main__":
  define_flags(FLAGS)
  common.run(main)
