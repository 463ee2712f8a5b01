"""The newer guidance family (jaxguide.guidance.family) and scale schedules, against the exact ε and
posteriors of a Gaussian mixture: each reduces to a known case at its neutral settings, and the
guided samples move the way the method promises."""
from __future__ import annotations

import collections
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxguide.diffusion import gmm
from jaxguide import guidance
from jaxguide.errors import ConfigError
from jaxguide.samplers import RENOISING, SAMPLERS, sample
from jaxguide.diffusion.score import eps_to_x0
from jaxguide.diffusion.sde import VPSDE

MIX = gmm.ring_mixture()
# The weak guide of autoguidance: the same mixture with inflated component variances.
WEAK = MIX.replace(stds=MIX.stds * 2.0)
SDE = VPSDE()
NULL = MIX.num_classes
B = 16
N = 1000
KEY = jax.random.PRNGKey(0)


def exact_eps(x, t, y):
  return MIX.eps(SDE, x, t, y)


def weak_eps(x, t, y):
  return WEAK.eps(SDE, x, t, y)


def clean_log_prob(x):
  """The mixture's exact posterior of clean data, log p(y | x₀): no t."""
  return MIX.log_prob_y(SDE, x, jnp.zeros(x.shape[:1]))


def noisy_batch(seed: int = 0):
  k_data, k_t, k_noise = jax.random.split(jax.random.PRNGKey(seed), 3)
  x0, y = MIX.sample(k_data, B)
  t = jax.random.uniform(k_t, (B,), minval=0.1, maxval=0.9)
  x, _ = SDE.perturb(k_noise, x0, t)
  return x, t, y


def cfg(scale):
  return guidance.classifier_free(exact_eps, scale, NULL)


def labels(n):
  return jnp.arange(n) % MIX.num_classes


def class_of(x):
  d = np.sum((np.asarray(x)[:, None] - np.asarray(MIX.means)[None]) ** 2, axis=-1)
  return np.asarray(MIX.labels)[np.argmin(d, axis=1)]


def in_class(x, y):
  return float(np.mean(class_of(x) == np.asarray(y)))


def spread(x):
  """Mean distance of each sample to its nearest component mean."""
  d = np.sum((np.asarray(x)[:, None] - np.asarray(MIX.means)[None]) ** 2, axis=-1)
  return float(np.mean(np.sqrt(d.min(axis=1))))


@functools.cache
def guided_sampler(kind: str, sampler: str = "ddim", steps: int = 20, n: int = N):
  """A jitted sampler of one family member with a traced scale; traces counted."""
  def run(key, y, scale):
    TRACES[(kind, sampler, steps, n)] += 1
    return sample(key, build(kind, scale), SDE, (n, 2), y, sampler, steps)
  return jax.jit(run)


TRACES = collections.Counter()


def build(kind, scale):
  return {
      "cfg": lambda: cfg(scale),
      "unconditional": lambda: guidance.unconditional(exact_eps, NULL),
      "negative": lambda: guidance.negative(exact_eps, scale, (jnp.arange(1) + 1) % NULL),
      "compose": lambda: guidance.compose(exact_eps, jnp.array([0, 2]),
                                          jnp.stack([scale, -0.5 * scale]), NULL),
      "autoguidance": lambda: guidance.autoguidance(exact_eps, weak_eps, scale),
      "apg": lambda: guidance.apg(exact_eps, SDE, scale, NULL, norm_threshold=2.0),
      "apg_momentum": lambda: guidance.apg(exact_eps, SDE, scale, NULL, norm_threshold=2.0,
                                           momentum=-0.5),
      "x0_classifier": lambda: guidance.x0_classifier(
          guidance.unconditional(exact_eps, NULL), clean_log_prob, SDE, scale),
      "cfgpp": lambda: guidance.cfgpp(exact_eps, scale, NULL),
      "cfg_linear": lambda: cfg(guidance.schedule("linear", scale)),
  }[kind]()


class ReductionTest(chex.TestCase):
  """Each method at its neutral settings is a known ε, to float rounding."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_negative_with_null_is_cfg(self):
    x, t, y = noisy_batch()
    g = self.variant(guidance.negative(exact_eps, 2.5, NULL))
    chex.assert_trees_all_close(g(x, t, y), cfg(2.5)(x, t, y), atol=1e-6, rtol=1e-6)

  def test_negative_formula(self):
    x, t, y = noisy_batch()
    neg = (y + 1) % NULL
    want = exact_eps(x, t, neg) + 3.0 * (exact_eps(x, t, y) - exact_eps(x, t, neg))
    chex.assert_trees_all_close(guidance.negative(exact_eps, 3.0, neg)(x, t, y), want,
                                atol=1e-5, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_compose_one_label_is_cfg(self):
    x, t, y = noisy_batch()
    g = self.variant(guidance.compose(exact_eps, y[:, None], jnp.full((B, 1), 2.0), NULL))
    chex.assert_trees_all_close(g(x, t, y), cfg(2.0)(x, t, y), atol=1e-5, rtol=1e-5)

  def test_compose_two_labels_formula_in_one_call(self):
    calls = collections.Counter()

    def counting(x, t, y):
      calls["eps"] += 1
      return exact_eps(x, t, y)
    x, t, _ = noisy_batch()
    lab, w = jnp.array([1, 3]), jnp.array([1.5, -0.5])
    u = exact_eps(x, t, jnp.full((B,), NULL))
    want = u + sum(w[i] * (exact_eps(x, t, jnp.full((B,), lab[i])) - u) for i in range(2))
    got = guidance.compose(counting, lab, w, NULL)(x, t, jnp.zeros(B, jnp.int32))
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    self.assertEqual(calls["eps"], 1)

  def test_compose_mismatched_weights(self):
    with self.assertRaisesRegex(ConfigError, "one weight per label"):
      guidance.compose(exact_eps, jnp.array([1, 3]), jnp.array([1.0]), NULL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_autoguidance_one_is_the_good_network(self):
    x, t, y = noisy_batch()
    # (1 − s) ε_weak + s ε: exact at s = 0, 1 without jit; jit may fuse it into one FMA.
    g = self.variant(guidance.autoguidance(exact_eps, weak_eps, 1.0))
    chex.assert_trees_all_close(g(x, t, y), exact_eps(x, t, y), atol=1e-6, rtol=1e-6)
    g0 = self.variant(guidance.autoguidance(exact_eps, weak_eps, 0.0))
    chex.assert_trees_all_close(g0(x, t, y), weak_eps(x, t, y), atol=1e-6, rtol=1e-6)

  @parameterized.parameters(1.0, 3.0)
  def test_apg_eta_one_is_cfg(self, scale):
    x, t, y = noisy_batch()
    g = guidance.apg(exact_eps, SDE, scale, NULL, eta=1.0)
    chex.assert_trees_all_close(g(x, t, y), cfg(scale)(x, t, y), atol=2e-5, rtol=2e-5)

  def test_apg_bounds_and_projects_the_update(self):
    x, t, y = noisy_batch()
    s, r = 4.0, 0.1
    d_c = eps_to_x0(SDE, x, exact_eps(x, t, y), t)
    apg = jax.jit(guidance.apg(exact_eps, SDE, s, NULL, norm_threshold=r))
    d_hat = eps_to_x0(SDE, x, apg(x, t, y), t)
    step = d_hat - d_c                       # (s − 1) Δ⊥: bounded and orthogonal to D_c
    np.testing.assert_array_less(np.linalg.norm(step, axis=-1), (s - 1) * r * (1 + 1e-4))
    np.testing.assert_allclose(np.sum(step * d_c, axis=-1), 0.0, atol=1e-4)

  def test_apg_bad_options(self):
    """Checked whatever their type: Python and numpy numbers, arrays."""
    for bad in (1.0, np.float32(-1.5), jnp.asarray([0.0, 1.2])):
      with self.assertRaisesRegex(ConfigError, r"momentum=.*\(-1, 1\)"):
        guidance.apg(exact_eps, SDE, 2.0, NULL, momentum=bad)
    for bad in (-1.0, np.float32(-0.5), np.array([1.0, -2.0])):
      with self.assertRaisesRegex(ConfigError, "norm_threshold=.*>= 0"):
        guidance.apg(exact_eps, SDE, 2.0, NULL, norm_threshold=bad)
    with self.assertRaisesRegex(ConfigError, "eta=.*finite"):
      guidance.apg(exact_eps, SDE, 2.0, NULL, eta=np.float32(np.nan))

  def test_apg_zero_threshold_is_no_bound(self):
    """The paper's r = 0 (a number or an array) bounds nothing."""
    x, t, y = noisy_batch()
    free = guidance.apg(exact_eps, SDE, 3.0, NULL)(x, t, y)
    for r in (0.0, jnp.zeros(B)):
      chex.assert_trees_all_close(guidance.apg(exact_eps, SDE, 3.0, NULL, norm_threshold=r)(x, t, y),
                                  free, atol=1e-6)

  def test_cfgpp_is_cfg_at_lambda_for_plain_samplers(self):
    x, t, y = noisy_batch()
    g = guidance.cfgpp(exact_eps, 0.7, NULL)
    chex.assert_trees_all_close(g(x, t, y), cfg(0.7)(x, t, y), atol=1e-6, rtol=1e-6)
    guided, renoise = g.pair(x, t, y)
    chex.assert_trees_all_close(renoise, exact_eps(x, t, jnp.full_like(y, NULL)), atol=1e-6)
    with self.assertRaisesRegex(ConfigError, r"\[0, 1\]"):
      guidance.cfgpp(exact_eps, 1.5, NULL)

  def test_x0_classifier_gradient_goes_through_the_denoiser(self):
    x, t, y = noisy_batch()
    s = 2.0
    g = jax.jit(guidance.x0_classifier(exact_eps, clean_log_prob, SDE, s))(x, t, y)

    def picked(xi, ti, yi):
      x0 = eps_to_x0(SDE, xi[None], exact_eps(xi[None], ti[None], yi[None]), ti[None])
      return clean_log_prob(x0)[0, yi]
    grad = jax.jit(jax.vmap(jax.grad(picked)))(x, t, y)
    _, sigma = SDE.marginal_coeffs(t)
    chex.assert_trees_all_close(g, exact_eps(x, t, y) - s * sigma[:, None] * grad,
                                atol=1e-4, rtol=1e-4)
    chex.assert_trees_all_close(guidance.x0_classifier(exact_eps, clean_log_prob, SDE, 0.0)(x, t, y),
                                exact_eps(x, t, y), atol=1e-6)


class ScheduleTest(chex.TestCase):

  def test_shapes_ends_and_mean(self):
    t = jnp.linspace(0.0, 1.0, 10001)
    for kind in guidance.SCHEDULES:
      s = guidance.schedule(kind, 3.0)(t)
      np.testing.assert_allclose(float(jnp.mean(s)), 3.0, atol=1e-3)   # same guidance on average
    np.testing.assert_allclose(guidance.schedule("linear", 3.0)(jnp.array([1.0, 0.0])), [1.0, 5.0],
                               atol=1e-6)
    np.testing.assert_allclose(guidance.schedule("cosine", 8.0, neutral=0.0)(jnp.array([1.0, 0.0])),
                               [0.0, 16.0], atol=1e-5)

  def test_constant_schedule_is_the_scale_and_per_sample(self):
    x, t, y = noisy_batch()
    scales = jnp.linspace(0.0, 4.0, B)
    chex.assert_trees_all_close(cfg(guidance.schedule("constant", scales))(x, t, y),
                                cfg(scales)(x, t, y), atol=1e-6)
    lin = guidance.schedule("linear", 3.0)
    want = guidance.classifier_free(exact_eps, lin(t), NULL)(x, t, y)
    chex.assert_trees_all_close(cfg(lin)(x, t, y), want, atol=1e-6)

  def test_unknown_schedule(self):
    with self.assertRaisesRegex(ConfigError, "schedule='square'"):
      guidance.schedule("square", 2.0)


class SamplingTest(chex.TestCase):
  """The guided samples move as each method promises (the exact mixture, 1,000 samples)."""

  def test_autoguidance_shrinks_toward_the_good_modes(self):
    y = labels(N)
    spreads = [spread(guided_sampler("autoguidance")(KEY, y, jnp.float32(s))) for s in (1.0, 2.0, 3.0)]
    self.assertLess(spreads[1], spreads[0] * 0.95)
    self.assertLess(spreads[2], spreads[1])
    # s = 1 samples the good mixture: its spread matches the unguided sampler's on the same key.
    plain = sample(KEY, exact_eps, SDE, (N, 2), y, "ddim", 20)
    np.testing.assert_allclose(spreads[0], spread(plain), rtol=1e-4)

  @parameterized.parameters("ddim", "dpmpp_2m", "ddpm")
  def test_cfgpp_zero_is_unconditional_and_rises_with_lambda(self, sampler):
    y = labels(N)
    run = guided_sampler("cfgpp", sampler)
    uncond = sample(KEY, guidance.unconditional(exact_eps, NULL), SDE, (N, 2), y, sampler, 20)
    np.testing.assert_allclose(run(KEY, y, jnp.float32(0.0)), uncond, atol=1e-4)
    # Measured: ddim 0.23, 0.40, 0.60, 1.0; ddpm 0.27, 0.36, 0.46, 1.0 (in-class at λ = 0 is 1/4).
    fractions = [in_class(run(KEY, y, jnp.float32(lam)), y) for lam in (0.0, 0.05, 0.1, 0.5)]
    self.assertAlmostEqual(fractions[0], 0.25, delta=0.05)
    self.assertGreater(fractions[1], fractions[0] + 0.05)
    self.assertGreater(fractions[2], fractions[1] + 0.05)
    self.assertGreater(fractions[3], 0.95)

  def test_x0_classifier_in_class_fraction_rises(self):
    y = labels(N)
    run = guided_sampler("x0_classifier")
    # Measured: 0.23, 0.86, 1.0 (the exact clean posterior is sharp: small scales suffice).
    fractions = [in_class(run(KEY, y, jnp.float32(s)), y) for s in (0.0, 0.02, 0.1)]
    self.assertAlmostEqual(fractions[0], 0.25, delta=0.05)
    self.assertGreater(fractions[1], fractions[0] + 0.3)
    self.assertGreater(fractions[2], fractions[1])


# APG's momentum in every sampler: guidance_state_test.test_state_and_recurrence_in_every_sampler.
KINDS = ("negative", "compose", "autoguidance", "apg", "x0_classifier", "cfgpp", "cfg_linear")


class EverySamplerTest(chex.TestCase):
  """Every new kind × every sampler it runs on (CFG++: those that re-noise): finite samples, and
  a new scale does not recompile."""

  @parameterized.parameters(*[(k, s) for k in KINDS for s in SAMPLERS
                              if k != "cfgpp" or s in RENOISING])
  def test_runs_finite_without_recompiling(self, kind, sampler):
    run = guided_sampler(kind, sampler, steps=3, n=8)
    y = labels(8)
    for scale in (0.3, 0.9):
      chex.assert_tree_all_finite(run(KEY, y, jnp.float32(scale)))
    self.assertEqual(TRACES[(kind, sampler, 3, 8)], 1)
