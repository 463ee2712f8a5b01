"""VPSDE against its closed form and against a simulated forward SDE."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import jaxguide as jg
from jaxguide.diffusion.sde import broadcast_to_data
from jaxguide.errors import ConfigError


def closed_form(t, beta_min, beta_max):
  t = np.asarray(t, np.float64)
  log_alpha = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
  alpha = np.exp(log_alpha)
  return alpha, np.sqrt(1.0 - alpha**2)


@jax.jit
def simulate_forward(key, x0, sde, t_end):
  """Euler–Maruyama of dx = −½βx dt + √β dW from x0 to t_end in 2000 steps."""
  n = 2000
  dt = t_end / n

  def step(x, inputs):
    i, k = inputs
    t = i * dt
    noise = jax.random.normal(k, x.shape)
    return x - 0.5 * sde.beta(t) * x * dt + jnp.sqrt(sde.beta(t) * dt) * noise, None

  x, _ = jax.lax.scan(step, x0, (jnp.arange(n, dtype=jnp.float32), jax.random.split(key, n)))
  return x


class VPSDETest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((0.01, 10.0), (0.1, 20.0))
  def test_marginal_coeffs_closed_form(self, beta_min, beta_max):
    sde = jg.VPSDE(beta_min, beta_max)
    t = jnp.linspace(0.0, 1.0, 101)
    alpha, sigma = self.variant(sde.marginal_coeffs)(t)
    ref_alpha, ref_sigma = closed_form(t, beta_min, beta_max)
    np.testing.assert_allclose(alpha, ref_alpha, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-4, atol=1e-6)
    chex.assert_shape((alpha, sigma), (101,))
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-5)

  def test_sigma_accurate_near_zero(self):
    # 1 − α² loses every digit in float32 near t = 0; expm1 keeps them.
    sde = jg.VPSDE()
    t = jnp.array([1e-5, 1e-4, 1e-3])
    _, sigma = sde.marginal_coeffs(t)
    _, ref = closed_form(np.asarray(t), 0.01, 10.0)
    np.testing.assert_allclose(sigma, ref, rtol=1e-3)

  @parameterized.parameters(0.1, 0.4, 1.0)
  def test_moments_match_simulated_sde(self, t_end):
    sde = jg.VPSDE()
    x0 = jnp.full((20000,), 1.5)
    x = simulate_forward(jax.random.PRNGKey(0), x0, sde, t_end)
    alpha, sigma = sde.marginal_coeffs(jnp.float32(t_end))
    n = x.shape[0]
    # Tolerances: 4 standard errors of the Monte Carlo estimates plus the O(dt) scheme bias.
    self.assertAlmostEqual(float(x.mean()), float(alpha * 1.5), delta=4 * float(sigma) / n**0.5 + 5e-3)
    self.assertAlmostEqual(float(x.std()), float(sigma), delta=4 * float(sigma) / (2 * n) ** 0.5 + 5e-3)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(((256, 28, 28, 1),), ((4096, 2),))
  def test_perturb_shapes_and_statistics(self, shape):
    sde = jg.VPSDE()
    x0 = jnp.full(shape, 0.7)
    t = jnp.linspace(0.05, 1.0, shape[0])
    x_t, eps = self.variant(sde.perturb)(jax.random.PRNGKey(1), x0, t)
    chex.assert_shape((x_t, eps), shape)
    chex.assert_tree_all_finite((x_t, eps))
    alpha, sigma = sde.marginal_coeffs(t)
    b = broadcast_to_data
    np.testing.assert_allclose(x_t, b(alpha, x0) * x0 + b(sigma, x0) * eps, atol=1e-5)
    self.assertAlmostEqual(float(eps.mean()), 0.0, delta=0.02)
    self.assertAlmostEqual(float(eps.std()), 1.0, delta=0.02)

  def test_drift_diffusion_prior(self):
    sde = jg.VPSDE()
    x = jnp.ones((3, 4, 4, 1))
    t = jnp.array([0.0, 0.5, 1.0])
    chex.assert_shape(sde.drift(x, t), x.shape)
    np.testing.assert_allclose(sde.drift(x, t)[:, 0, 0, 0], -0.5 * np.array([0.01, 5.005, 10.0]), rtol=1e-5)
    np.testing.assert_allclose(sde.diffusion(t) ** 2, sde.beta(t), rtol=1e-6)
    chex.assert_shape(sde.prior_sample(jax.random.PRNGKey(0), (5, 2)), (5, 2))

  def test_time_grid_and_discrete_schedule(self):
    sde = jg.VPSDE()
    times, abar = sde.discrete_alphas_cumprod(10)
    chex.assert_shape((times, abar), (11,))
    self.assertAlmostEqual(float(times[0]), 1.0)
    self.assertAlmostEqual(float(times[-1]), 1e-3, places=6)
    self.assertTrue(bool(jnp.all(jnp.diff(abar) > 0)))          # less noise as t decreases
    np.testing.assert_allclose(abar, sde.marginal_coeffs(times)[0] ** 2, rtol=1e-6)
    self.assertTrue(bool(jnp.all(jnp.diff(sde.log_snr(jnp.linspace(0.01, 1, 50))) < 0)))
    with self.assertRaises(ConfigError):
      sde.time_grid(0)

  @parameterized.parameters((0.01, 10.0), (0.1, 20.0), (0.0, 5.0))
  def test_log_snr_inverse(self, beta_min, beta_max):
    # The closed-form root of the quadratic in t inverts λ(t) = log(α²/σ²), small t included
    # (β_min = 0 takes the quadratic's other limit).
    sde = jg.VPSDE(beta_min, beta_max)
    t = jnp.geomspace(1e-4, 1.0, 200)
    np.testing.assert_allclose(sde.log_snr_inverse(sde.log_snr(t)), t, rtol=1e-5)
    lam = jnp.linspace(-10.0, 15.0, 101)
    np.testing.assert_allclose(sde.log_snr(sde.log_snr_inverse(lam)), lam, atol=1e-4)

  @parameterized.parameters((0.01, 10.0, 1e-3, 10), (0.1, 20.0, 1e-5, 37))
  def test_logsnr_time_grid(self, beta_min, beta_max, t_eps, steps):
    sde = jg.VPSDE(beta_min, beta_max)
    times = sde.time_grid(steps, t_eps, spacing="logsnr")
    chex.assert_shape(times, (steps + 1,))
    self.assertEqual(float(times[0]), sde.T)
    self.assertEqual(float(times[-1]), np.float32(t_eps))
    self.assertTrue(bool(jnp.all(jnp.diff(times) < 0)))
    gaps = np.diff(np.asarray(sde.log_snr(times), np.float64))
    expected = (float(sde.log_snr(t_eps)) - float(sde.log_snr(sde.T))) / steps
    np.testing.assert_allclose(gaps, expected, rtol=1e-4)   # λ is uniform on the grid
    t2, _ = sde.discrete_alphas_cumprod(steps, t_eps, spacing="logsnr")
    chex.assert_trees_all_equal(t2, times)
    with self.assertRaisesRegex(ConfigError, "spacing='cosine' is not known"):
      sde.time_grid(steps, t_eps, spacing="cosine")

  def test_is_a_pytree_through_jit(self):
    f = jax.jit(lambda s, t: s.marginal_coeffs(t)[0])
    a1 = f(jg.VPSDE(0.01, 10.0), jnp.float32(0.5))
    a2 = f(jg.VPSDE(0.1, 20.0), jnp.float32(0.5))
    self.assertNotAlmostEqual(float(a1), float(a2))

  @parameterized.parameters((10.0, 0.01), (1.0, 1.0), (-0.1, 5.0))
  def test_bad_schedule_raises(self, beta_min, beta_max):
    with self.assertRaisesRegex(ConfigError, "beta_min"):
      jg.VPSDE(beta_min, beta_max)
