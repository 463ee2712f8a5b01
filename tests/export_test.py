"""Export for GPU and TPU from this CPU host: each model kind's training step and the guided
samplers lower with `jax.export` for ("cuda", "tpu"), and the modules hold no host callback and
no CPU-only custom call (a LAPACK or DUCC kernel, a target named for the CPU): what a GPU or TPU
would run never waits on the host. Traced on the code path a GPU or TPU host takes
(`cpu.force(False)`: this host's own CPU workarounds are chosen by the backend it traces on).
Each way a guidance kind reaches the network with ddim, classifier guidance and CFG with a stochastic sampler too
(the samplers share one scan). Lowering only, nothing compiled: tiny networks, 8x8x1 images.
"""
from __future__ import annotations

import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mnist, mnist_text, toy2d
from jaxguide import conditioning, cpu, parallel, pipeline, samplers
from jaxguide import config as config_lib
from jaxguide.diffusion.sde import sde_from
from jaxguide.models.build import MODEL_INDEX
from jaxguide.training import specs
from jaxguide.training.state import create_train_state, make_optimizer, make_train_step

PLATFORMS = ("cuda", "tpu")
CALLBACKS = ("xla_python_cpu_callback", "xla_python_gpu_callback", "xla_ffi_python_cpu_callback",
             "xla_ffi_python_gpu_callback")
# Both spellings of a custom call: `stablehlo.custom_call @name(...)` and the generic form's
# `call_target_name = "name"`.
_TARGET = re.compile(r'custom_call\s*@"?([\w.$\-]+)|call_target_name\s*=\s*"([^"]+)"')

K = 3                 # classes
IMAGE = (8, 8, 1)
BATCH = 4
STEPS = 3             # sampler steps


def custom_call_targets(text: str) -> list[str]:
  return sorted({a or b for a, b in _TARGET.findall(text)})


def host_bound(target: str) -> bool:
  """The deny rule: a Python host callback, or a kernel that only XLA:CPU has (LAPACK, DUCC, any
  target whose name says cpu)."""
  name = target.lower()
  return (target in CALLBACKS or "callback" in name or name.startswith(("lapack_", "ducc_"))
          or "cpu" in name)


def check_exported(exported: jax.export.Exported) -> None:
  assert exported.platforms == PLATFORMS, exported.platforms
  text = exported.mlir_module()
  for name in CALLBACKS:
    assert name not in text, f"{exported.fun_name}: host callback {name} in the module"
  targets = custom_call_targets(text)
  denied = [t for t in targets if host_bound(t)]
  assert not denied, (f"{exported.fun_name}: CPU-only or host custom calls {denied} (every "
                      f"custom call: {targets})")


def shapes(shape: tuple[int, ...], num_classes: int = K):
  """What model_spec reads of a training set: one example's shape and the class count."""
  return types.SimpleNamespace(shape=shape, num_classes=num_classes)


def image_config():
  """mnist:quick (v-prediction UNet, noisy classifier, LeNet, UNet guide) at tiny widths."""
  c = mnist.get_config("quick")
  for role in ("score", "guide", "classifier"):
    c[role].model.update({"ch": 8, "ch_mult": (1, 2), "groups": 4})
  return c


def toy_config():
  """toy2d: the MLP score network and guide, the MLP classifier."""
  c = toy2d.get_config()
  for role in ("score", "guide", "classifier"):
    c[role].model.update({"hidden": 16, "depth": 2})
  return c


def text_captions() -> conditioning.Captions:
  """One caption per class whose encoding is its one-hot vector; ∅ the last basis vector."""
  eye = np.eye(K + 1, dtype=np.float32)
  return conditioning.Captions(np.array([f"class {k}" for k in range(K)]), np.arange(K),
                               np.array(["train"] * K), eye[:K], eye[K], "one-hot")


def text_config():
  """mnist_text: the UNet score network on condition vectors (size K + 1 here)."""
  c = mnist_text.get_config()
  c.score.model.update({"ch": 8, "ch_mult": (1, 2), "groups": 4, "cond_dim": K + 1})
  return c


TRAIN_CASES = {
    "toy score mlp": (toy_config, "score", (2,)),
    "toy classifier mlp": (toy_config, "classifier", (2,)),
    "toy guide mlp": (toy_config, "guide", (2,)),
    "image score unet": (image_config, "score", IMAGE),
    "image classifier": (image_config, "classifier", IMAGE),
    "image evaluator lenet": (image_config, "evaluator", IMAGE),
    "image guide unet": (image_config, "guide", IMAGE),
    "text score unet": (text_config, "score", IMAGE),
}


def test_train_cases_cover_every_role_and_arch():
  roles = {(role, make()[role].model.arch) for make, role, _ in TRAIN_CASES.values()}
  assert {r for r, _ in roles} == set(MODEL_INDEX)
  assert {a for _, a in roles} == {"unet", "mlp", "classifier", "mlp_classifier", "lenet"}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_step_exports(case):
  make, role, shape = TRAIN_CASES[case]
  config = make()
  conditions = text_captions().conditions() if make is text_config else None
  spec = specs.model_spec(role, config, shapes(shape), conditions)
  tc = config_lib.model_train_config(config, role)
  tx = make_optimizer(tc)
  state = jax.eval_shape(
      lambda key: create_train_state(key, spec.model, spec.init_args, tx, tc.ema_decay),
      jax.random.PRNGKey(0))
  image = jnp.uint8 if len(shape) == 3 else jnp.float32   # host batches: uint8 pixels, float points
  batch = {"image": jax.ShapeDtypeStruct((BATCH,) + shape, image),
           "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32)}
  step = make_train_step(spec.loss_fn, parallel.data_mesh())
  with cpu.force(False):
    exported = jax.export.export(step, platforms=PLATFORMS)(state, batch)
  check_exported(exported)


@functools.cache
def run_of(text: bool) -> pipeline.Run:
  """A Run as load_run builds it, its parameters abstract (only their shapes are read)."""
  config = text_config() if text else image_config()
  roles = ("score",) if text else tuple(MODEL_INDEX)
  captions = text_captions() if text else None
  apply_fns, params = {}, {}
  for role in roles:
    spec = specs.model_spec(role, config, shapes(IMAGE),
                            captions.conditions() if text and role == "score" else None)
    apply_fns[role] = spec.model.apply
    params[role] = jax.eval_shape(spec.model.init, jax.random.PRNGKey(0), *spec.init_args)["params"]
  return pipeline.Run("", config, sde_from(config), IMAGE, K, apply_fns, params, captions)


OPTIONS = {"compose": {"compose": ((0, 1.0), (1, 0.5))}}
# Each way a kind reaches the network: one pass, CFG's vmapped passes, a classifier's gradient,
# a gradient through the denoiser, x̂₀ bands, CFG++'s pair; then the samplers' other loops.
SAMPLE_KINDS = ("none", "cfg", "classifier", "x0_classifier", "fdg", "apg", "cfgpp", "autoguidance")
SAMPLE_CASES = ([(kind, "ddim", False) for kind in SAMPLE_KINDS]
                + [(kind, "ddpm", False) for kind in ("classifier", "cfg")]
                + [("cfg", "ddim", True)])


@pytest.mark.parametrize("kind, sampler, text", SAMPLE_CASES,
                         ids=[f"{k}-{s}{'-text' * t}" for k, s, t in SAMPLE_CASES])
def test_guided_sampler_exports(kind, sampler, text):
  run = run_of(text)

  def fn(params, key, y, scale, clf_scale):   # pipeline._compiled's function
    g = pipeline.guided_eps_fn(run, params, kind, scale, clf_scale, **OPTIONS.get(kind, {}))
    return samplers.sample(key, g, run.sde, (BATCH,) + run.shape, y, sampler=sampler, steps=STEPS,
                           t_eps=run.t_eps, clip_x0=1.0)
  y = (jax.ShapeDtypeStruct((BATCH, run.cond_dim), jnp.float32) if text
       else jax.ShapeDtypeStruct((BATCH,), jnp.int32))
  args = (run.params, jax.ShapeDtypeStruct((2,), jnp.uint32), y,
          jax.ShapeDtypeStruct((BATCH,), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32))
  with cpu.force(False):
    exported = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(*args)
  check_exported(exported)


def test_the_check_finds_cpu_only_calls():
  """The regex and the deny rule on a real CPU export (LAPACK) and on each callback's line;
  jax.export refuses to serialise host callbacks, so those exist only as text here."""
  solve = jax.export.export(jax.jit(jnp.linalg.solve), platforms=("cpu",))(
      jax.ShapeDtypeStruct((3, 3), jnp.float32), jax.ShapeDtypeStruct((3,), jnp.float32))
  targets = custom_call_targets(solve.mlir_module())
  assert targets and all(t.startswith("lapack_") and host_bound(t) for t in targets), targets
  for name in CALLBACKS:
    line = f"%0 = stablehlo.custom_call @{name}(%arg0) : (tensor<3xf32>) -> tensor<3xf32>"
    assert custom_call_targets(line) == [name] and host_bound(name)
  generic = '"stablehlo.custom_call"(%arg0) <{call_target_name = "ducc_fft"}> : (tensor<8xc64>)'
  assert custom_call_targets(generic) == ["ducc_fft"] and host_bound("ducc_fft")
  assert not any(host_bound(t) for t in ("Sharding", "SPMDFullToShardShape", "cu_threefry2x32",
                                         "tpu_custom_call"))
