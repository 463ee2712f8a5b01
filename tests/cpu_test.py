"""jaxguide.cpu: the CPU-only set-up applies on CPU hosts only, re-executes only launches that can
be re-executed, leaves child processes alone, and both network code paths agree."""
import functools
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import pytest

from jaxguide import cpu
from jaxguide import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r"""
import ctypes, os, resource, subprocess, sys, threading
sys.path.insert(0, ROOT)
from jaxguide import cpu
print("start", os.getpid(), flush=True)     # printed twice when the process re-executes
cpu.tune_host_malloc(children=CHILDREN)
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 100 << 20         # like XLA:CPU's per-execution temporaries, allocated on a worker thread

def use_block():
  block = libc.malloc(SIZE)
  ctypes.memset(block, 1, SIZE)
  libc.free(block)

def on_worker(n):
  def work():
    for _ in range(n):
      use_block()
  t = threading.Thread(target=work)
  t.start()
  t.join()

faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
on_worker(2)
start = faults()
on_worker(4)
child = subprocess.run([sys.executable, "-c", "import os; print(repr(os.environ.get('GLIBC_TUNABLES')))"],
                       capture_output=True, text=True).stdout.strip()
print("result", repr(os.environ.get("GLIBC_TUNABLES")), (faults() - start) / 4, child)
"""


def run_probe(tmp_path, env_changes, *, children=False, as_script=True):
  code = PROBE.replace("ROOT", repr(ROOT)).replace("CHILDREN", str(children))
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAX_PLATFORMS")}
  env.update(env_changes)
  if as_script:
    script = tmp_path / "probe.py"
    script.write_text(code)
    cmd = [sys.executable, str(script)]
  else:
    cmd = [sys.executable, "-c", code]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.split("\n")
  starts = [l for l in lines if l.startswith("start")]
  _, tunables, faults, child = next(l for l in lines if l.startswith("result")).split()
  return len(starts), tunables, float(faults), child


huge_pages = pytest.mark.skipif(not cpu.huge_pages_on_request(),
                                reason="needs glibc >= 2.35 and transparent huge pages in madvise mode")


@huge_pages
def test_script_reexecutes_once_with_huge_pages_and_children_do_not_inherit(tmp_path):
  """A 100 MB block that glibc maps afresh each time (as it does XLA:CPU's per-step temporaries)
  faults in 2 MiB at a time after the one re-execution; a child process does not get the variable."""
  starts, tunables, faults, child = run_probe(tmp_path, {"JAX_PLATFORMS": "cpu"})
  assert starts == 2 and faults < 2_000, (starts, faults)
  assert tunables == "None" and child == "None"     # dropped again after glibc read it


@huge_pages
def test_children_inherit_when_asked(tmp_path):
  starts, _, faults, child = run_probe(tmp_path, {"JAX_PLATFORMS": "cpu"}, children=True)
  assert starts == 2 and faults < 2_000 and child == repr(cpu.GLIBC_MALLOC_TUNABLES)


@huge_pages
@pytest.mark.parametrize("case,env,as_script", [
    ("opted out", {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": ""}, True),
    ("python -c", {"JAX_PLATFORMS": "cpu"}, False),
    ("gpu backend", {"JAX_PLATFORMS": "cuda"}, True),
    ("tpu backend", {"JAX_PLATFORMS": "tpu,cpu"}, True),
])
def test_left_alone(tmp_path, case, env, as_script):
  """An existing GLIBC_TUNABLES (even empty), a launch that cannot run twice (`python -c`) and an
  accelerator backend: no re-execution, 4 KiB faults as before."""
  starts, tunables, faults, _ = run_probe(tmp_path, env, as_script=as_script)
  assert starts == 1 and faults > 20_000, (case, starts, faults)
  assert tunables == repr(env.get("GLIBC_TUNABLES")), case


@pytest.mark.parametrize("env,expected", [
    ({"JAX_PLATFORMS": "cpu"}, True), ({"JAX_PLATFORMS": "cuda,cpu"}, False),
    ({"JAX_PLATFORMS": "tpu"}, False), ({"JAX_PLATFORM_NAME": "gpu"}, False),
    ({"JAX_PLATFORMS": " CPU "}, True)])
def test_backend_will_be_cpu_reads_jax_platforms(env, expected):
  assert cpu.backend_will_be_cpu(env) is expected


def test_backend_guess_without_platforms_follows_installed_plugins():
  assert cpu.backend_will_be_cpu({}) is (not cpu.accelerator_plugins())


@pytest.mark.parametrize("platforms,expected", [("cpu", "=2"), ("cuda", None)])
def test_split_host_only_on_cpu(platforms, expected):
  code = textwrap.dedent(f"""
      import os, sys
      sys.path.insert(0, {ROOT!r})
      os.environ.pop("XLA_FLAGS", None)
      os.sched_setaffinity(0, {{0, 1}}) if hasattr(os, "sched_setaffinity") and os.cpu_count() >= 2 else None
      from jaxguide import cpu
      cpu.split_host()
      print(os.environ.get("XLA_FLAGS"))""")
  env = {**os.environ, "JAX_PLATFORMS": platforms}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 0, out.stderr[-2000:]
  if expected is None:
    assert out.stdout.strip() == "None"
  else:
    assert out.stdout.strip().endswith(cpu.CPU_DEVICES_FLAG + expected), out.stdout


def test_force_selects_the_path_at_trace_time():
  assert cpu.enabled() == (jax.default_backend() == "cpu")
  with cpu.force(False):
    assert not cpu.enabled() and cpu.group_norm_impl() == "reduce"
    with cpu.force(True):
      assert cpu.enabled() and cpu.group_norm_impl() == "dots"
    assert not cpu.enabled()
  assert cpu.enabled() == (jax.default_backend() == "cpu")


@functools.cache   # one init for every test here (jitted: an eager UNet init is slow on the CPU)
@functools.cache
def small_unet():
  """One tiny UNet for the module, initialised once ('rbg' keys: XLA:CPU compiles threefry bit
  generation slowly, leaf by leaf)."""
  model = models.UNet(num_classes=3, ch=8, ch_mult=(1, 2), num_res_blocks=1, groups=4,
                    attn_resolutions=(4,))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
  t, y = jnp.array([0.3, 0.8]), jnp.array([0, 3])
  params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x, t, y)["params"]
  return model, params, x, t, y


@pytest.mark.parametrize("on_cpu_path", [True, False], ids=["cpu path", "plain path"])
def test_forward_mode_through_networks(on_cpu_path):
  """jax.jvp and jax.jacfwd through the UNet and the noisy classifier on both code paths agree
  with reverse mode (a probability-flow likelihood's divergence needs forward mode)."""
  model, params, x, t, y = small_unet()
  clf = models.NoisyClassifier(num_classes=3, ch=8, ch_mult=(1, 2), num_res_blocks=1, groups=4)
  cparams = jax.jit(clf.init)(jax.random.key(2, impl="rbg"), x, t)["params"]
  v = jax.random.normal(jax.random.PRNGKey(3), x.shape)
  # Each transform jitted (traced inside the `force` context, which picks the path at trace time):
  # eager op-by-op UNets took two minutes on a slow host.
  with cpu.force(on_cpu_path):
    eps = lambda x: model.apply({"params": params}, x, t, y)
    f = lambda x: jnp.sum(eps(x) * v)
    # f's derivative along v, vᵀ(∂ε/∂x)v, is also the Hutchinson divergence estimate, the
    # likelihood's inner step: forward mode over the network.
    _, div = jax.jit(lambda x: jax.jvp(f, (x,), (v,)))(x)
    grad = jax.jit(jax.grad(f))(x)
    chex.assert_trees_all_close(div, jnp.sum(grad * v), rtol=1e-4, atol=1e-5)
    assert jnp.isfinite(div)
    logp = lambda x: jnp.sum(jax.nn.log_softmax(clf.apply({"params": cparams}, x, t))[:, 1])
    fwd = jax.jit(jax.jacfwd(logp))(x)
    chex.assert_trees_all_close(fwd, jax.jit(jax.grad(logp))(x), rtol=1e-4, atol=1e-5)


@pytest.mark.cpu_exact
def test_both_paths_give_the_same_network():
  model, params, x, t, y = small_unet()
  outs, grads = [], []
  for on in (True, False):
    with cpu.force(on):
      f = jax.jit(lambda p, x: model.apply({"params": p}, x, t, y))
      outs.append(f(params, x))
      grads.append(jax.jit(jax.grad(lambda p, x: jnp.sum(f(p, x) ** 2), argnums=(0, 1)))(params, x))
  chex.assert_trees_all_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_custom_rule_only_on_the_cpu_path():
  model, params, x, t, y = small_unet()
  text = {}
  for on in (True, False):
    with cpu.force(on):
      text[on] = str(jax.make_jaxpr(lambda x: model.apply({"params": params}, x, t, y))(x))
  assert "custom_jvp_call" in text[True] and "custom_jvp_call" not in text[False]


def test_cpu_exact_tests_rerun_pinned_to_the_cpu():
  """The mechanism a GPU/TPU host takes for @pytest.mark.cpu_exact tests, forced here on the CPU:
  the test runs in a child pytest with JAX_PLATFORMS=cpu and its verdict is the parent's."""
  node = "tests/nets_test.py::GroupNormTest::test_bfloat16_output_float32_statistics"
  env = {**os.environ, "JAXGUIDE_PIN_TEST_SELF": "1"}
  out = subprocess.run([sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider", node],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-3000:]
  assert "[cpu_exact]" in out.stdout and "passed on the CPU backend" in out.stdout, out.stdout[-3000:]
