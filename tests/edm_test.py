"""EDM's sampler and the Karras grid on the VP-SDE: the grid's closed form, second-order
convergence of the deterministic sampler to the exact flow map of a Gaussian, the law of a
mixture with churn, and the one-line refusals."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxguide import samplers
from jaxguide.diffusion import gmm
from jaxguide.errors import ConfigError
from jaxguide.samplers import sample
from tests.guidance_family_test import KEY, MIX, SDE, class_of, exact_eps, labels

T_EPS = 1e-3


def test_karras_grid_is_uniform_in_sigma_tilde_to_the_one_over_rho():
  for rho in (1.0, 7.0):
    times = SDE.time_grid(10, T_EPS, "karras", rho=rho)
    assert float(times[0]) == SDE.T and float(times[-1]) == pytest.approx(T_EPS)
    assert bool(jnp.all(jnp.diff(times) < 0))
    root = np.asarray(SDE.sigma_tilde(times), np.float64) ** (1 / rho)
    np.testing.assert_allclose(np.diff(root), np.diff(root).mean(), rtol=2e-3)
  with pytest.raises(ConfigError, match="rho=0"):
    SDE.time_grid(10, T_EPS, "karras", rho=0)
  with pytest.raises(ConfigError, match="rho=7 is an option of spacing='karras'"):
    sample(KEY, exact_eps, SDE, (4, 2), labels(4), "ddim", 4, rho=7)


# One Gaussian N(μ, s² I): the probability-flow ODE moves x̃ = x/α as μ + (x̃ − μ)·√(s² + σ̃²) up to
# a constant, so the exact map from x_T to t_eps is known in closed form.
MU, STD = jnp.array([1.0, -0.5]), 0.5
GAUSS = gmm.GaussianMixture(means=MU[None], stds=jnp.array([STD]), weights=jnp.array([1.0]),
                            labels=jnp.array([0]), num_classes=1)


def exact_map(x_t):
  s_top, s_end = SDE.sigma_tilde(SDE.T), SDE.sigma_tilde(T_EPS)
  x_tilde = x_t / SDE.marginal_coeffs(SDE.T)[0]
  out = MU + (x_tilde - MU) * jnp.sqrt(STD**2 + s_end**2) / jnp.sqrt(STD**2 + s_top**2)
  return SDE.marginal_coeffs(T_EPS)[0] * out


def test_deterministic_edm_converges_at_second_order():
  eps_fn = lambda x, t, y: GAUSS.eps(SDE, x, t, y)
  x_t = SDE.prior_sample(jax.random.split(KEY)[0], (64, 2))   # sample()'s own prior draw
  want = exact_map(x_t)
  errors = []
  for steps in (4, 8, 16, 32):
    got = sample(KEY, eps_fn, SDE, (64, 2), jnp.zeros(64, jnp.int32), "edm", steps, t_eps=T_EPS,
                 spacing="karras")
    errors.append(float(jnp.max(jnp.abs(got - want))))
  ratios = [a / b for a, b in zip(errors, errors[1:])]
  assert all(r > 3.0 for r in ratios), (errors, ratios)   # 4 per halving at second order
  assert errors[-1] < 1e-2, errors   # 32 steps from σ̃ = 12.2 to 0.004


def test_edm_with_churn_samples_the_mixture():
  """With the exact class-conditional ε and churn 40, every sample in its class, the components
  equally weighted, each component's spread its std; and the churn changes the draw."""
  n = 4000
  y = labels(n)
  run = lambda churn: np.asarray(sample(KEY, exact_eps, SDE, (n, 2), y, "edm", 40,
                                        spacing="karras", churn=churn))
  churned, plain = run(40.0), run(0.0)
  assert np.max(np.abs(churned - plain)) > 0.1
  for x in (churned, plain):
    assert np.mean(class_of(x) == np.asarray(y)) > 0.99
    d = np.sum((x[:, None] - np.asarray(MIX.means)[None]) ** 2, axis=-1)
    share = np.bincount(np.argmin(d, axis=1), minlength=len(MIX.means)) / n
    np.testing.assert_allclose(share, 1 / len(MIX.means), atol=0.02)
    spread = float(np.mean(np.sqrt(d.min(axis=1))))
    assert abs(spread - float(MIX.stds[0]) * np.sqrt(np.pi / 2)) < 0.015, spread


@pytest.mark.parametrize("options, message", [
    ({"churn": -1.0}, "churn=-1.0"),
    ({"s_noise": -0.5}, "s_noise=-0.5"),
    ({"s_tmin": 2.0, "s_tmax": 1.0}, "s_tmin=2.0 > s_tmax=1.0"),
])
def test_edm_options_refused(options, message):
  with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
    sample(KEY, exact_eps, SDE, (4, 2), labels(4), "edm", 4, **options)


def test_edm_options_are_edms_alone():
  with pytest.raises(ConfigError, match="churn= is not an option of sampler='ddim'"):
    sample(KEY, exact_eps, SDE, (4, 2), labels(4), "ddim", 4, churn=40.0)
  assert "edm" in samplers.SAMPLERS and "edm" not in samplers.RENOISING
