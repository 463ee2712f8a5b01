"""Tests for jaxguide.samplers: every sampler reproduces an exact Gaussian mixture.

Each sampler is compiled once (module-level cached jitted functions with the labels and scales
as traced arguments) and shared by the tests; steps per sampler are the fewest that pass the
tolerances below with a wide margin on the ring mixture (4 classes × 2 components, std 0.2).
"""
from __future__ import annotations

import collections
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxguide import gmm, guidance
from jaxguide.errors import ConfigError
from jaxguide.samplers import SAMPLERS, ddim, sample
from jaxguide.sde import VPSDE

MIX = gmm.ring_mixture()
SDE = VPSDE()
NULL = MIX.num_classes
N = 2000
KEY = jax.random.PRNGKey(0)
# Fewest steps with a wide margin on the tolerances below (measured: class fractions within
# 0.02 of 0.25, component means within 0.05, stds within 0.17–0.23).
STEPS = {"euler_maruyama": 200, "pc": 50, "ode_heun": 20, "ddpm": 100, "ddim": 20, "dpmpp_2m": 20}
TRACES = collections.Counter()


def exact_eps(x, t, y):
  return MIX.eps(SDE, x, t, y)


def exact_log_prob(x, t):
  return MIX.log_prob_y(SDE, x, t)


@functools.cache
def plain(name: str):
  """Jitted sampler on the exact mixture ε; y = NULL draws from the whole mixture."""
  return jax.jit(functools.partial(sample, eps_fn=exact_eps, sde=SDE, shape=(N, 2),
                                   sampler=name, steps=STEPS[name]))


@functools.cache
def cfg(name: str):
  """Jitted sampler on CFG of the exact ε with a traced scale; counts its traces."""
  def run(key, y, scale):
    TRACES["cfg"] += 1
    g = guidance.classifier_free(exact_eps, scale, NULL)
    return sample(key, g, SDE, (N, 2), y, name, STEPS[name])
  return jax.jit(run)


@functools.cache
def classifier_guided(name: str):
  """Jitted sampler on the unconditional ε guided by the exact classifier with a traced scale."""
  def run(key, y, scale):
    g = guidance.classifier(guidance.unconditional(exact_eps, NULL), exact_log_prob, SDE, scale)
    return sample(key, g, SDE, (N, 2), y, name, STEPS[name])
  return jax.jit(run)


def nearest_component(x) -> np.ndarray:
  d = np.sum((np.asarray(x)[:, None] - np.asarray(MIX.means)[None]) ** 2, axis=-1)
  return np.argmin(d, axis=1)


def class_of(x) -> np.ndarray:
  return np.asarray(MIX.labels)[nearest_component(x)]


def labels(n: int) -> jax.Array:
  return jnp.arange(n) % MIX.num_classes


class MixtureTest(chex.TestCase):

  @parameterized.parameters(*STEPS)
  def test_reproduces_mixture(self, name):
    x = np.asarray(plain(name)(KEY, y=jnp.full((N,), NULL)))
    chex.assert_shape(x, (N, 2))
    chex.assert_tree_all_finite(x)
    comp = nearest_component(x)
    np.testing.assert_allclose(np.bincount(class_of(x), minlength=4) / N, 0.25, atol=0.05)
    means, stds = np.asarray(MIX.means), np.asarray(MIX.stds)
    for k in range(len(means)):
      members = x[comp == k]
      np.testing.assert_allclose(members.mean(0), means[k], atol=0.1, err_msg=f"component {k}")
      np.testing.assert_allclose(members.std(0), stds[k], rtol=0.3, err_msg=f"component {k}")
    # A 2-D Gaussian puts 1 − e^{−4.5} ≈ 0.989 of its mass within 3 std of its mean.
    dist = np.linalg.norm(x - means[comp], axis=-1)
    self.assertGreaterEqual(np.mean(dist < 3 * stds[comp]), 0.9 * 0.989)
    # The same compiled sampler, conditioned: almost every sample lands in its own class.
    y = labels(N)
    x = plain(name)(KEY, y=y)
    self.assertGreaterEqual(np.mean(class_of(x) == np.asarray(y)), 0.97)


class GuidedSamplingTest(chex.TestCase):

  @parameterized.parameters("ddim", "euler_maruyama")
  def test_cfg_scale_one_and_zero(self, name):
    y = labels(N)
    # s = 1 is the conditional sampler and s = 0 the unconditional one, up to float rounding.
    chex.assert_trees_all_close(cfg(name)(KEY, y, 1.0), plain(name)(KEY, y=y), atol=1e-4)
    chex.assert_trees_all_close(cfg(name)(KEY, y, 0.0), plain(name)(KEY, y=jnp.full((N,), NULL)),
                                atol=1e-4)

  def test_changed_scale_does_not_recompile(self):
    y, run = labels(N), cfg("ddim")
    run(KEY, y, 1.0)
    before = TRACES["cfg"]
    run(KEY, y, 3.0)   # Python floats are weakly typed f32 scalars: the same signature
    run(KEY, y, 0.5)
    self.assertEqual(TRACES["cfg"], before)
    run(KEY, y, jnp.linspace(0.0, 2.0, N))   # per-sample scale: a new shape, one trace
    run(KEY, y, jnp.linspace(1.0, 5.0, N))
    self.assertEqual(TRACES["cfg"], before + 1)

  def test_classifier_guidance(self):
    y, run = labels(N), classifier_guided("dpmpp_2m")
    chex.assert_trees_all_close(run(KEY, y, 0.0), plain("dpmpp_2m")(KEY, y=jnp.full((N,), NULL)),
                                atol=1e-4)
    fractions = [np.mean(class_of(run(KEY, y, w)) == np.asarray(y)) for w in (0.0, 0.5, 1.0, 2.0)]
    # w = 1 with the exact classifier is Bayes' rule: sampling p(x | y).
    self.assertGreaterEqual(fractions[2], 0.97)
    self.assertLess(fractions[0], 0.35)
    self.assertLess(fractions[0], fractions[1])
    self.assertLess(fractions[1], fractions[2])
    self.assertGreaterEqual(fractions[3], fractions[2] - 0.01)


class SamplerTest(chex.TestCase):

  def test_ddim_eta_one_is_ddpm(self):
    y = jnp.full((64,), NULL)
    run = lambda name, **kw: sample(KEY, exact_eps, SDE, (64, 2), y, name, 10, **kw)
    chex.assert_trees_all_close(run("ddim", eta=1.0), run("ddpm"), atol=1e-4)

  def test_ddim_eta_zero_is_deterministic(self):
    x = SDE.prior_sample(KEY, (64, 2))
    times = SDE.time_grid(10)
    y = jnp.full((64,), NULL)
    run = jax.jit(lambda key: ddim(key, exact_eps, SDE, x, y, times)[0])
    chex.assert_trees_all_equal(run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(2)))

  def test_trajectory(self):
    y = labels(8)
    x0, traj = sample(KEY, exact_eps, SDE, (8, 2), y, "ddim", 20, return_trajectory=True,
                      save_every=5)
    chex.assert_shape(traj, (5, 8, 2))
    chex.assert_trees_all_close(traj[0], SDE.prior_sample(jax.random.split(KEY)[0], (8, 2)))
    chex.assert_trees_all_close(traj[-1], x0)
    _, traj = sample(KEY, exact_eps, SDE, (8, 2), y, "ddim", 20, return_trajectory=True,
                     save_every=6)
    chex.assert_shape(traj, (4, 8, 2))

  def test_images_of_any_rank(self):
    # x₀ ~ N(0.5, 0.1² I) per pixel, whose ε is exact: a rank-4 smoke test for every sampler
    # (20 steps: only the mean is checked, the 20-step SDE samplers under-disperse).
    def gaussian_eps(x, t, y):
      alpha, sigma = SDE.marginal_coeffs(t)
      a, s = alpha[:, None, None, None], sigma[:, None, None, None]
      return s * (x - 0.5 * a) / (0.01 * a**2 + s**2)
    shape = (4, 3, 3, 1)
    for name in SAMPLERS:
      thresholds = {"clip_x0": 1.0, "dynamic_threshold": 0.995} if name == "ddpm" else {}
      x = sample(KEY, gaussian_eps, SDE, shape, jnp.zeros(4, jnp.int32), name, 20, **thresholds)
      chex.assert_shape(x, shape)
      np.testing.assert_allclose(np.mean(x), 0.5, atol=0.1, err_msg=name)

  def test_bad_arguments(self):
    y = labels(8)
    bad = [({"sampler": "foo"}, "sampler='foo' is not known: use one of euler_maruyama, pc"),
           ({"steps": 0}, "steps=0"),
           ({"sampler": "ddim", "snr": 0.1}, "snr= is not an option of sampler='ddim': use eta"),
           ({"return_trajectory": True, "save_every": 0}, "save_every=0")]
    for kwargs, message in bad:
      with self.assertRaisesRegex(ConfigError, message):
        sample(KEY, exact_eps, SDE, (8, 2), y, **kwargs)
    with self.assertRaisesRegex(ConfigError, "one label per sample"):
      sample(KEY, exact_eps, SDE, (8, 2), labels(4))
