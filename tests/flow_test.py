"""The rectified flow (α = 1 − t, σ = t) as a process: its interface against finite differences
and closed forms, every sampler and the guidance kinds on the exact Gaussian mixture under the
flow's path, EDM's second order on it, CFG-Zero*, and the one-line refusals."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import jaxguide as jg
from jaxguide import guidance
from jaxguide.diffusion import gmm, losses, score
from jaxguide.diffusion.sde import sde_from
from jaxguide.errors import ConfigError
from jaxguide.samplers import sample

FLOW = jg.RectifiedFlow()
MIX = gmm.ring_mixture()
NULL = MIX.num_classes
KEY = jax.random.PRNGKey(0)
N = 2000
# (steps, spacing) per sampler.
GRIDS = {"euler_maruyama": (100, "linear"), "pc": (60, "logsnr"), "ode_heun": (20, "linear"),
         "ddpm": (100, "linear"), "ddim": (20, "linear"), "dpmpp_2m": (20, "logsnr"),
         "edm": (20, "karras")}


def exact_eps(x, t, y):
  return MIX.eps(FLOW, x, t, y)


def class_of(x):
  d = np.sum((np.asarray(x)[:, None] - np.asarray(MIX.means)[None]) ** 2, axis=-1)
  return np.asarray(MIX.labels)[np.argmin(d, axis=1)], np.argmin(d, axis=1), d


def labels(n):
  return jnp.arange(n) % MIX.num_classes


def test_interface_matches_its_closed_forms():
  t = jnp.linspace(0.02, 0.98, 9)
  alpha, sigma = FLOW.marginal_coeffs(t)
  np.testing.assert_allclose(alpha, 1 - t, atol=1e-7)
  np.testing.assert_allclose(sigma, t, atol=1e-7)
  h = 1e-3
  for rate, coeff in zip(FLOW.marginal_rates(t), (0, 1)):
    fd = (FLOW.marginal_coeffs(t + h)[coeff] - FLOW.marginal_coeffs(t - h)[coeff]) / (2 * h)
    np.testing.assert_allclose(rate, fd, atol=1e-3)
  # g² = dσ²/dt − 2 (α'/α) σ² = 2t/(1 − t); f = −x/(1 − t)
  np.testing.assert_allclose(FLOW.diffusion(t) ** 2, 2 * t / (1 - t), rtol=1e-5)
  x = jnp.ones((9, 2))
  np.testing.assert_allclose(FLOW.drift(x, t), -x / (1 - t)[:, None], rtol=1e-5)
  np.testing.assert_allclose(FLOW.log_snr_inverse(FLOW.log_snr(t)), t, atol=1e-6)
  np.testing.assert_allclose(FLOW.time_of_sigma_tilde(FLOW.sigma_tilde(t)), t, atol=1e-6)
  np.testing.assert_allclose(FLOW.sigma_tilde(t), t / (1 - t), rtol=1e-5)
  for spacing in ("linear", "logsnr", "karras"):
    grid = FLOW.time_grid(10, 1e-3, spacing)
    assert float(grid[0]) == pytest.approx(0.999) and float(grid[-1]) == pytest.approx(1e-3)
    assert bool(jnp.all(jnp.diff(grid) < 0))
  with pytest.raises(ConfigError, match="sde.T=1"):
    jg.RectifiedFlow(T=1.0)


def test_velocity_is_eps_minus_x0_and_converts_back():
  k1, k2 = jax.random.split(KEY)
  x0, eps = jax.random.normal(k1, (6, 3)), jax.random.normal(k2, (6, 3))
  t = jnp.linspace(0.05, 0.995, 6)
  x = (1 - t)[:, None] * x0 + t[:, None] * eps
  u = score.eps_to_velocity(FLOW, x, eps, t)
  np.testing.assert_allclose(u, eps - x0, atol=2e-4)
  np.testing.assert_allclose(score.velocity_to_eps(FLOW, x, eps - x0, t), eps, atol=1e-5)
  # ε from u needs no division by α: exact at t = 1, where x = ε.
  np.testing.assert_allclose(score.velocity_to_eps(FLOW, eps, eps - x0, jnp.ones(6)), eps, atol=1e-6)
  # the velocity weighting makes the ε error the velocity error
  u_hat = u + 0.1
  err_eps = jnp.sum((score.velocity_to_eps(FLOW, x, u_hat, t) - eps) ** 2, axis=-1)
  np.testing.assert_allclose(losses.loss_weight(FLOW, t, "velocity") * err_eps,
                             jnp.sum((u_hat - u) ** 2, axis=-1), rtol=2e-3)


def test_logit_normal_times_are_sigmoid_of_a_normal():
  t = losses.sample_times_logit_normal(KEY, 20000, 1e-3, 0.999, 0.0, 1.0)
  z = np.log(np.asarray(t) / (1 - np.asarray(t)))
  assert abs(z.mean()) < 0.03 and abs(z.std() - 1.0) < 0.03
  assert float(t.min()) >= 1e-3 and float(t.max()) <= 0.999


@functools.cache
def draw(name, guided=None):
  steps, spacing = GRIDS[name]

  def run(key, y):
    eps_fn = exact_eps if guided is None else guided
    return sample(key, eps_fn, FLOW, (N, 2), y, name, steps, spacing=spacing)
  return jax.jit(run)


@pytest.mark.parametrize("name", list(GRIDS))
def test_every_sampler_draws_the_mixture_on_the_flow(name):
  """From the whole mixture: the class weights and each component's spread of the closed form;
  conditioned: every sample in its class."""
  x = np.asarray(draw(name)(KEY, jnp.full((N,), NULL)))
  assert np.isfinite(x).all()
  cls, comp, d = class_of(x)
  np.testing.assert_allclose(np.bincount(cls, minlength=4) / N, 0.25, atol=0.04)
  spread = float(np.mean(np.sqrt(d.min(axis=1))))      # E‖z‖ of a 2-D N(0, s²I) is s √(π/2)
  assert abs(spread - float(MIX.stds[0]) * np.sqrt(np.pi / 2)) < 0.03, spread
  y = labels(N)
  assert np.mean(class_of(draw(name)(KEY, y))[0] == np.asarray(y)) > 0.97


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_cfg_one_and_classifier_guidance_one_on_the_flow(name):
  y = labels(N)
  cfg = guidance.classifier_free(exact_eps, 1.0, NULL)
  clf = guidance.classifier(guidance.unconditional(exact_eps, NULL),
                            lambda x, t: MIX.log_prob_y(FLOW, x, t), FLOW, 1.0)
  for g in (cfg, clf):
    x = draw(name, g)(KEY, y)
    assert np.mean(class_of(x)[0] == np.asarray(y)) > 0.97


def test_edm_converges_at_second_order_on_the_flow():
  mu, std = jnp.array([1.0, -0.5]), 0.5
  gauss = gmm.GaussianMixture(means=mu[None], stds=jnp.array([std]), weights=jnp.array([1.0]),
                              labels=jnp.array([0]), num_classes=1)
  t_eps = 1e-3
  x_t = FLOW.prior_sample(jax.random.split(KEY)[0], (64, 2))
  s_top, s_end = FLOW.sigma_tilde(FLOW.T), FLOW.sigma_tilde(t_eps)
  x_tilde = x_t / FLOW.marginal_coeffs(FLOW.T)[0]
  want = FLOW.marginal_coeffs(t_eps)[0] * (
      mu + (x_tilde - mu) * jnp.sqrt(std**2 + s_end**2) / jnp.sqrt(std**2 + s_top**2))
  errors = []
  for steps in (8, 16, 32, 64):
    got = sample(KEY, lambda x, t, y: gauss.eps(FLOW, x, t, y), FLOW, (64, 2),
                 jnp.zeros(64, jnp.int32), "edm", steps, t_eps=t_eps, spacing="karras")
    errors.append(float(jnp.max(jnp.abs(got - want))))
  ratios = [a / b for a, b in zip(errors, errors[1:])]
  assert all(r > 3.0 for r in ratios), (errors, ratios)
  assert errors[-1] < 2e-2, errors   # 64 steps from σ̃ = 999 to 0.001


def test_cfg_zero_star():
  k1, k2 = jax.random.split(KEY)
  x, y, t = jax.random.normal(k1, (8, 2)), labels(8), jnp.full((8,), 0.6)
  cond = exact_eps(x, t, y)
  # scale 1, no zeroed steps: the conditional prediction, on either reading
  for sde in (None, FLOW, jg.VPSDE()):
    np.testing.assert_allclose(guidance.cfg_zero_star(exact_eps, 1.0, NULL, sde=sde)(x, t, y),
                               cond, atol=1e-5)
  # the paper's formula on the flow's velocity, written out
  uncond = exact_eps(x, t, jnp.full((8,), NULL))
  v_c, v_u = score.eps_to_velocity(FLOW, x, cond, t), score.eps_to_velocity(FLOW, x, uncond, t)
  star = jnp.sum(v_c * v_u, -1, keepdims=True) / jnp.sum(v_u * v_u, -1, keepdims=True)
  want = star * v_u + 3.0 * (v_c - star * v_u)
  got = score.eps_to_velocity(FLOW, x, guidance.cfg_zero_star(exact_eps, 3.0, NULL, sde=FLOW)(x, t, y), t)
  np.testing.assert_allclose(got, want, atol=1e-4)
  # zeroed first steps: DDIM on the flow (Euler) stays at x_T for them, then moves
  g = guidance.cfg_zero_star(exact_eps, 2.0, NULL, 2, sde=FLOW)
  _, traj = sample(KEY, g, FLOW, (8, 2), y, "ddim", 10, return_trajectory=True, save_every=1)
  np.testing.assert_allclose(traj[1], traj[0], atol=1e-5)
  np.testing.assert_allclose(traj[2], traj[0], atol=1e-5)
  assert float(jnp.max(jnp.abs(traj[3] - traj[2]))) > 1e-2
  with pytest.raises(ConfigError, match="zero_init_steps=-1"):
    guidance.cfg_zero_star(exact_eps, 2.0, NULL, -1)


def test_refusals_and_old_configs():
  # explicit reverse-SDE steps that grow the noise over the run: the flow's log-SNR grid at 5 steps
  with pytest.raises(ConfigError, match="from t=0.999 on multiply the noise by .* use more steps"):
    sample(KEY, exact_eps, FLOW, (4, 2), labels(4), "euler_maruyama", 5, spacing="logsnr")
  with pytest.raises(ConfigError, match="sampler='pc' on this flow process"):
    sample(KEY, exact_eps, FLOW, (4, 2), labels(4), "pc", 3)
  # one overshooting step that later steps contract is fine (the flow's linear grid at T)
  sample(KEY, exact_eps, FLOW, (4, 2), labels(4), "euler_maruyama", 100)
  sample(KEY, exact_eps, jg.VPSDE(), (4, 2), labels(4), "euler_maruyama", 2)
  old = ml_collections.ConfigDict({"sde": {"beta_min": 0.1, "beta_max": 20.0}})
  assert isinstance(sde_from(old), jg.VPSDE) and sde_from(old).beta_max == 20.0
  flow = ml_collections.ConfigDict({"sde": {"process": "flow", "T": 0.99}})
  assert isinstance(sde_from(flow), jg.RectifiedFlow) and sde_from(flow).T == 0.99
  mixed = ml_collections.ConfigDict({"sde": {"process": "flow", "beta_max": 20.0}})
  with pytest.raises(ConfigError, match="sde.beta_max is an option of the vp process"):
    sde_from(mixed)
  with pytest.raises(ConfigError, match="sde.process='ve' is not known"):
    sde_from(ml_collections.ConfigDict({"sde": {"process": "ve"}}))
  from jaxguide.models.build import build_model
  model = ml_collections.ConfigDict({"arch": "mlp", "hidden": 8, "depth": 1, "param": "v"})
  with pytest.raises(ConfigError, match="param='v' needs a variance-preserving process"):
    build_model(model, 4, jnp.float32, FLOW)
