"""Tests for jaxguide.guidance against the exact ε and class posterior of a Gaussian mixture."""
from __future__ import annotations

import collections
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import conftest
from jaxguide.diffusion import gmm
from jaxguide import guidance
from jaxguide import samplers
from jaxguide.errors import ConfigError
from jaxguide.diffusion.score import eps_to_x0
from jaxguide.diffusion.sde import VPSDE

MIX = gmm.ring_mixture()
SDE = VPSDE()
NULL = MIX.num_classes
B = 16


def exact_eps(x, t, y):
  return MIX.eps(SDE, x, t, y)


def exact_log_prob(x, t):
  return MIX.log_prob_y(SDE, x, t)


@functools.partial(jax.jit, static_argnums=(0, 1))
def noisy_batch(seed: int = 0, t_range=(0.1, 0.9)):
  """(x_t, t, y): mixture draws noised to random times, with their (real) labels."""
  k_data, k_t, k_noise = jax.random.split(jax.random.PRNGKey(seed), 3)
  x0, y = MIX.sample(k_data, B)
  t = jax.random.uniform(k_t, (B,), minval=t_range[0], maxval=t_range[1])
  x, _ = SDE.perturb(k_noise, x0, t)
  return x, t, y


class ClassifierFreeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_scale_one_is_conditional_and_zero_unconditional(self):
    x, t, y = noisy_batch()
    for scale, labels in ((1.0, y), (0.0, jnp.full_like(y, NULL))):
      g = self.variant(guidance.classifier_free(exact_eps, scale, NULL))
      # The lerp is written so that s = 0 and s = 1 are exact up to vmap's own rounding.
      chex.assert_trees_all_close(g(x, t, y), exact_eps(x, t, labels), atol=1e-6, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_vmapped_call_equals_two_calls(self):
    x, t, y = noisy_batch()
    scale = 3.5
    cond, uncond = exact_eps(x, t, y), exact_eps(x, t, jnp.full_like(y, NULL))
    g = self.variant(guidance.classifier_free(exact_eps, scale, NULL))
    chex.assert_trees_all_close(g(x, t, y), uncond + scale * (cond - uncond), atol=1e-5, rtol=1e-5)

  def test_one_vmapped_network_call(self):
    calls = collections.Counter()

    def counting_eps(x, t, y):
      calls["eps"] += 1
      return exact_eps(x, t, y)
    x, t, y = noisy_batch()
    jax.make_jaxpr(guidance.classifier_free(counting_eps, 2.0, NULL))(x, t, y)
    self.assertEqual(calls["eps"], 1)

  @chex.variants(with_jit=True, without_jit=True)
  def test_per_sample_scale(self):
    x, t, y = noisy_batch()
    scales = jnp.linspace(0.0, 4.0, B)
    g = self.variant(guidance.classifier_free(exact_eps, scales, NULL))(x, t, y)
    for i in (0, 5, B - 1):
      row = guidance.classifier_free(exact_eps, scales[i], NULL)(x, t, y)[i]
      chex.assert_trees_all_close(g[i], row, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_rescale(self):
    x, t, y = noisy_batch()
    plain = guidance.classifier_free(exact_eps, 4.0, NULL)(x, t, y)
    zero = self.variant(guidance.classifier_free(exact_eps, 4.0, NULL, rescale=jnp.float32(0.0)))
    chex.assert_trees_all_close(zero(x, t, y), plain, atol=1e-6, rtol=1e-6)
    # φ = 1: the guided prediction has the conditional prediction's per-sample std.
    full = self.variant(guidance.classifier_free(exact_eps, 4.0, NULL, rescale=1.0))(x, t, y)
    chex.assert_trees_all_close(jnp.std(full, axis=-1), jnp.std(exact_eps(x, t, y), axis=-1),
                                rtol=1e-4)


class ClassifierTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_scale_is_unguided(self):
    x, t, y = noisy_batch()
    g = self.variant(guidance.classifier(exact_eps, exact_log_prob, SDE, 0.0))
    chex.assert_trees_all_close(g(x, t, y), exact_eps(x, t, y), atol=1e-6, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_scale_one_on_unconditional_is_bayes(self):
    # ε(∅) − σ ∇log p_t(y|x) = −σ ∇log p_t(x|y): the exact conditional ε.
    x, t, y = noisy_batch()
    g = self.variant(guidance.classifier(guidance.unconditional(exact_eps, NULL), exact_log_prob,
                                         SDE, 1.0))
    chex.assert_trees_all_close(g(x, t, y), exact_eps(x, t, y), atol=2e-4, rtol=1e-4)

  def test_gradient_is_exact_score_difference(self):
    x, t, y = noisy_batch()
    grad = guidance.classifier_grad(exact_log_prob, x, t, y)
    expected = MIX.score(SDE, x, t, y) - MIX.score(SDE, x, t, jnp.full_like(y, NULL))
    chex.assert_trees_all_close(grad, expected, atol=2e-3, rtol=1e-4)

  def test_null_label_is_unguided(self):
    x, t, y = noisy_batch()
    y = y.at[::2].set(NULL)
    grad = guidance.classifier_grad(exact_log_prob, x, t, y)
    chex.assert_trees_all_equal(grad[::2], jnp.zeros_like(grad[::2]))
    expected = MIX.score(SDE, x, t, y) - MIX.score(SDE, x, t, jnp.full_like(y, NULL))
    chex.assert_trees_all_close(grad[1::2], expected[1::2], atol=2e-3, rtol=1e-4)

  def test_gradient_matches_finite_differences(self):
    x, t, y = noisy_batch()
    # jax.enable_x64 is jax >= 0.8; the floor (0.6.1) has jax.experimental.enable_x64.
    x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else jax.experimental.enable_x64
    with x64(True):
      x = jnp.asarray(np.asarray(x), jnp.float64)
      grad = jax.jit(guidance.classifier_grad, static_argnums=0)(exact_log_prob, x, t, y)
      chex.assert_type(grad, jnp.float64)
      selected = jax.jit(
          lambda x: jnp.take_along_axis(exact_log_prob(x, t), y[:, None], -1)[:, 0])
      h = 1e-6
      # Samples are independent, so shifting one coordinate of every sample at once is B
      # one-sample finite differences.
      fd = jnp.stack([(selected(x + h * e) - selected(x - h * e)) / (2 * h)
                      for e in jnp.eye(x.shape[-1], dtype=x.dtype)], axis=-1)
      chex.assert_trees_all_close(grad, fd, atol=1e-6, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_combine_is_cfg_then_classifier(self):
    x, t, y = noisy_batch()
    cfg = guidance.classifier_free(exact_eps, 2.0, NULL)
    expected = guidance.classifier(cfg, exact_log_prob, SDE, 0.5)(x, t, y)
    g = self.variant(guidance.combine(exact_eps, exact_log_prob, SDE, 2.0, 0.5, NULL))
    chex.assert_trees_all_close(g(x, t, y), expected, atol=1e-6, rtol=1e-6)


class IntervalTest(chex.TestCase):

  def _transforms(self, interval):
    return {
        "cfg": guidance.classifier_free(exact_eps, 3.0, NULL, interval=interval),
        "classifier": guidance.classifier(exact_eps, exact_log_prob, SDE, 2.0, interval=interval),
        "combine": guidance.combine(exact_eps, exact_log_prob, SDE, 3.0, 2.0, NULL,
                                    interval=interval),
    }

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("cfg", "classifier", "combine")
  def test_interval(self, name):
    x, _, y = noisy_batch()
    unguided = jax.jit(exact_eps)
    always = jax.jit(self._transforms(None)[name])
    g = self.variant(self._transforms((0.3, 0.6))[name])
    outside = jnp.full((B,), 0.8)
    chex.assert_trees_all_close(g(x, outside, y), unguided(x, outside, y), atol=1e-6, rtol=1e-6)
    # Per-sample times: each row follows its own t.
    even = jnp.arange(B) % 2 == 0
    mixed = jnp.where(even, 0.45, 0.8)
    expected = jnp.where(even[:, None], always(x, mixed, y), unguided(x, mixed, y))
    chex.assert_trees_all_close(g(x, mixed, y), expected, atol=1e-6, rtol=1e-6)

  def test_interval_skips_with_cond(self):
    x, t, y = noisy_batch()
    for g in self._transforms((0.3, 0.6)).values():
      self.assertIn("cond", str(jax.make_jaxpr(g)(x, t, y)))

  def test_bad_interval(self):
    with self.assertRaisesRegex(ConfigError, "interval"):
      guidance.classifier_free(exact_eps, 1.0, NULL, interval=(0.8, 0.2))

  # Every sampler, clipped and not; the guidance kinds in turn (the split is the sampler's, and
  # test_interval checks each kind's per-step test): each sampler meets two of the three kinds
  # and each kind four (sampler, clipped) pairs, 12 cases instead of the full 36-case product.
  @parameterized.parameters(
      *[dict(name=("cfg", "classifier", "combine")[(2 * i + int(clipped)) % 3], sampler=sampler,
             clipped=clipped)
        for i, sampler in enumerate(samplers.SAMPLERS) for clipped in (False, True)])
  def test_samplers_decide_the_interval_from_their_grid(self, name, sampler, clipped):
    """sample() splits its loop where the interval begins and ends: the traced loop holds no
    conditional (a GPU would read its predicate every step), and it draws what the per-step test
    draws (the sampler run on a traced grid, which cannot be split)."""
    y = jnp.arange(B) % NULL
    g = self._transforms((0.3, 0.6))[name]
    steps = 10
    opts = {"clip_x0": 4.0} if clipped else {}
    draw = lambda key: samplers.sample(key, g, SDE, (B, 2), y, sampler, steps, **opts)
    jaxpr = jax.make_jaxpr(draw)(jax.random.PRNGKey(0)).jaxpr
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    self.assertGreaterEqual(len(scans), 2)
    with_cond = [e.params["length"] for e in scans if "cond[" in str(e.params["jaxpr"])]
    # Only a Heun step (ode_heun, edm) whose t and t_next lie on either side of an end tests t per step.
    self.assertEqual(with_cond, [1, 1] if sampler in ("ode_heun", "edm") else [])

    def per_step(key, t_eps):     # t_eps traced: the grid is unknown when the loop is traced
      return samplers.sample(key, g, SDE, (B, 2), y, sampler, steps, t_eps=t_eps, **opts)
    self.assertIn("cond[", str(jax.make_jaxpr(per_step)(jax.random.PRNGKey(0), 1e-3)))
    chex.assert_trees_all_close(jax.jit(draw)(jax.random.PRNGKey(1)),
                                jax.jit(per_step)(jax.random.PRNGKey(1), 1e-3), atol=2e-5, rtol=1e-5)

  def test_stretches(self):
    times = jnp.linspace(1.0, 0.0, 11)      # steps [1, .9], [.9, .8], ..., [.1, 0]
    self.assertEqual(samplers._stretches(times, ()), [(0, 10, {})])
    box = (0.25, 0.6)
    # ε at t only: t = 1 ... .7 outside, .6 .5 .4 .3 inside, .2 .1 outside
    self.assertEqual(samplers._stretches(times, (box,)),
                     [(0, 4, {box: False}), (4, 8, {box: True}), (8, 10, {box: False})])
    # ε at t and t_next (Heun): [.7, .6] and [.3, .2] straddle an end and test t themselves
    self.assertEqual(samplers._stretches(times, (box,), evaluates_t_next=True),
                     [(0, 3, {box: False}), (3, 4, {}), (4, 7, {box: True}), (7, 8, {}),
                      (8, 10, {box: False})])
    self.assertEqual(guidance.intervals_of(self._transforms((0.25, 0.6))["cfg"]), ((0.25, 0.6),))


class RetraceTest(chex.TestCase):

  def test_changed_scale_does_not_retrace(self):
    traces = collections.Counter()

    @jax.jit
    def guided(x, t, y, cfg_scale, clf_scale):
      traces["guided"] += 1
      return guidance.combine(exact_eps, exact_log_prob, SDE, cfg_scale, clf_scale, NULL)(x, t, y)
    x, t, y = noisy_batch()
    for s in (0.0, 1.0, 7.5):
      guided(x, t, y, s, 2.0 * s)
    self.assertEqual(traces["guided"], 1)
    for s in (1.0, 3.0):   # per-sample scales: one new shape, one trace
      guided(x, t, y, jnp.full((B,), s), jnp.linspace(0.0, s, B))
    self.assertEqual(traces["guided"], 2)


class ThresholdTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_clip_x0(self):
    x, t, y = noisy_batch(t_range=(0.5, 0.9))
    g = self.variant(guidance.clip_x0(exact_eps, SDE, 1.0))
    x0 = eps_to_x0(SDE, x, g(x, t, y), t)
    raw = eps_to_x0(SDE, x, exact_eps(x, t, y), t)
    self.assertGreater(float(jnp.max(jnp.abs(raw))), 1.0)   # the clip is exercised
    chex.assert_trees_all_close(x0, jnp.clip(raw, -1, 1), atol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_dynamic_threshold(self):
    x, t, y = noisy_batch(t_range=(0.5, 0.9))
    g = self.variant(guidance.dynamic_threshold(exact_eps, SDE, 1.0))
    x0 = eps_to_x0(SDE, x, g(x, t, y), t)
    raw = eps_to_x0(SDE, x, exact_eps(x, t, y), t)
    # quantile 1: s = max(max|x̂₀|, 1), so every sample is divided by its own s.
    s = jnp.maximum(jnp.max(jnp.abs(raw), axis=-1, keepdims=True), 1.0)
    chex.assert_trees_all_close(x0, raw / s, atol=1e-4)
    self.assertLessEqual(float(jnp.max(jnp.abs(x0))), 1.0 + 1e-4)

  def test_bad_quantile(self):
    with self.assertRaisesRegex(ConfigError, "dynamic_threshold"):
      guidance.dynamic_threshold(exact_eps, SDE, 99.5)


MULTI_DEVICE_CFG = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxguide import guidance, models as nets, parallel
k, n = 3, 32
unet = nets.UNet(num_classes=k, ch=8, ch_mult=(1, 2), num_res_blocks=1)
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((n, 8, 8, 1)), jnp.float32)
t = jnp.asarray(rng.uniform(0.1, 0.9, n), jnp.float32)
y = jnp.asarray(rng.integers(0, k, n), jnp.int32)
s = jnp.asarray(rng.uniform(0, 4, n), jnp.float32)
shapes = jax.eval_shape(unet.init, jax.random.PRNGKey(0), x, t, y)
params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype), shapes)
eps = lambda x, t, y: unet.apply(params, x, t, y)   # convolutions: vmap merges labels into batch
shard = NamedSharding(parallel.data_mesh(), P(parallel.DATA_AXIS))
x, t, y, s = jax.device_put((x, t, y, s), shard)
fn = jax.jit(lambda x, t, y, s: guidance.classifier_free(eps, s, k)(x, t, y))
got = fn(x, t, y, s)
cond, uncond = jax.jit(eps)(x, t, y), jax.jit(eps)(x, t, jnp.full_like(y, k))   # eager: minutes
want = (1 - s[:, None, None, None]) * uncond + s[:, None, None, None] * cond
text = fn.lower(x, t, y, s).compile().as_text()
print(json.dumps({"devices": jax.device_count(), "max_err": float(jnp.max(jnp.abs(got - want))),
                  "scale": float(jnp.max(jnp.abs(want))), "all_gather": "all-gather" in text,
                  "out_sharded": got.sharding.is_equivalent_to(shard, 4)}))
"""


@pytest.mark.integration
class MultiDeviceCfgTest(chex.TestCase):
  """On 8 (fake CPU) devices with the batch split over them, CFG equals its two-call definition
  with per-sample scales, keeps the split (no gather of the batch) and leaves it split."""

  def test_eight_devices(self):
    import json, os, subprocess, sys
    env = {**os.environ, "XLA_FLAGS": conftest.xla_flags(8),
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", MULTI_DEVICE_CFG], env=env, capture_output=True,
                         text=True, timeout=300)
    self.assertEqual(out.returncode, 0, out.stderr[-2000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    self.assertEqual(result["devices"], 8)
    self.assertLess(result["max_err"], 1e-5 * max(1.0, result["scale"]))
    self.assertFalse(result["all_gather"], "the CFG pass gathered the batch across devices")
    self.assertTrue(result["out_sharded"])
