"""Guidance with state (APG's momentum through every sampler's scan), self-recurrence as a sampler
option, frequency-decoupled guidance, and the guarded defects: t_eps, CFG++ through wrappers and
samplers, APG's options, CFG rescale, float32 times. Against the exact ε of a Gaussian mixture
and closed forms."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxguide import guidance, samplers
from jaxguide.diffusion.score import eps_to_x0, x0_to_eps
from jaxguide.errors import ConfigError
from jaxguide.guidance import frequency
from jaxguide.samplers import RENOISING, SAMPLERS, sample
from tests.guidance_family_test import (B, KEY, MIX, NULL, SDE, cfg, class_of, exact_eps, labels,
                                        noisy_batch)

STEPS = 8


# ------------------------------------------------------------------ the state protocol


def test_a_stateful_function_threads_its_state_through_every_call():
  """A state counting calls: under `carried` each call reads the state the last one left, and
  outside it each call starts from init."""
  counter = guidance.Stateful(lambda x, y: jnp.zeros(()),
                              lambda n, x, t, y: (x * 0 + n, n + 1))
  wrapped = guidance.clip_x0(counter, SDE, 1.0)
  assert guidance.stateful_of(wrapped) == (counter,)
  x, t, y = noisy_batch()
  states = guidance.init_states(wrapped, x, y)
  with guidance.carried(wrapped, states) as box:
    for _ in range(3):
      counter(x, t, y)
  assert float(box.states()[0]) == 3.0
  assert float(counter(x, t, y)[0, 0]) == 0.0   # outside: from init


def momentum_ddim_by_hand(scale, beta, steps=STEPS, n=B):
  """DDIM (η = 0) with APG's momentum written out: m ← Δ + β m, D̂ = D_c + (s − 1)(Δ⊥ + 0·Δ∥)."""
  key_prior, _ = jax.random.split(KEY)
  x = SDE.prior_sample(key_prior, (n, 2))
  y = labels(n)
  times = SDE.time_grid(steps, 1e-3, "linear")
  m = jnp.zeros_like(x)
  for i in range(steps):
    t, s = times[i], times[i + 1]
    tb = jnp.full((n,), t)
    cond, uncond = exact_eps(x, tb, y), exact_eps(x, tb, jnp.full_like(y, NULL))
    d_c, d_u = eps_to_x0(SDE, x, cond, tb), eps_to_x0(SDE, x, uncond, tb)
    m = (d_c - d_u) + beta * m
    unit = d_c / jnp.linalg.norm(d_c, axis=1, keepdims=True)
    par = jnp.sum(m * unit, axis=1, keepdims=True) * unit
    d_hat = d_c + (scale - 1.0) * (m - par)
    eps = x0_to_eps(SDE, x, d_hat, tb)
    abar_s = jnp.exp(2 * SDE.log_alpha(s))
    x = jnp.sqrt(abar_s) * d_hat + jnp.sqrt(1 - abar_s) * eps
  return x


def test_apg_momentum_in_ddim_is_the_papers_recursion():
  got = sample(KEY, guidance.apg(exact_eps, SDE, 3.0, NULL, momentum=-0.5), SDE, (B, 2),
               labels(B), "ddim", STEPS)
  np.testing.assert_allclose(got, momentum_ddim_by_hand(3.0, -0.5), atol=2e-5)
  plain = sample(KEY, guidance.apg(exact_eps, SDE, 3.0, NULL), SDE, (B, 2), labels(B), "ddim", STEPS)
  assert float(jnp.max(jnp.abs(got - plain))) > 1e-2   # the momentum acts


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_state_and_recurrence_in_every_sampler(sampler):
  """β = 0 as a traced array takes the stateful path: the same samples as the stateless one,
  with recurrence 1, which threads the state through the repeats and changes the draw."""
  y = labels(B)
  run = jax.jit(lambda beta: sample(KEY, guidance.apg(exact_eps, SDE, 2.0, NULL, momentum=beta),
                                    SDE, (B, 2), y, sampler, 4, recurrence=1))
  plain = lambda r: sample(KEY, guidance.apg(exact_eps, SDE, 2.0, NULL), SDE, (B, 2), y, sampler, 4,
                           recurrence=r)
  once = plain(1)
  np.testing.assert_allclose(run(jnp.float32(0.0)), once, atol=1e-5)
  assert bool(jnp.all(jnp.isfinite(run(jnp.float32(-0.5)))))
  assert float(jnp.max(jnp.abs(once - plain(0)))) > 1e-3


def test_stateful_guidance_refused_where_its_state_cannot_leave():
  stateful = guidance.apg(exact_eps, SDE, 2.0, NULL, momentum=-0.5)
  with pytest.raises(ConfigError, match="classifier_free cannot wrap apg with momentum"):
    guidance.classifier_free(stateful, 2.0, NULL)


# ------------------------------------------------------------------ self-recurrence


def component_weights(x):
  """The share of the samples at each component (nearest mean)."""
  d = np.sum((np.asarray(x)[:, None] - np.asarray(MIX.means)[None]) ** 2, axis=-1)
  comp = np.argmin(d, axis=1)
  return np.bincount(comp, minlength=len(MIX.means)) / len(comp)


def test_recurrence_keeps_the_law_and_changes_the_draw():
  """With the exact ε, ddpm with recurrence 2 samples the mixture as recurrence 0 does: every
  sample in its class, the components equally weighted, each component's spread its std."""
  n = 4000
  y = labels(n)
  draws = {r: np.asarray(sample(KEY, exact_eps, SDE, (n, 2), y, "ddpm", 100, spacing="logsnr",
                                recurrence=r)) for r in (0, 2)}
  assert np.max(np.abs(draws[0] - draws[2])) > 0.1    # not a no-op
  spread = {}
  for r, x in draws.items():
    assert np.mean(class_of(x) == np.asarray(y)) > 0.99, r
    np.testing.assert_allclose(component_weights(x), 1 / len(MIX.means), atol=0.02, err_msg=r)
    d = np.sqrt(np.min(np.sum((x[:, None] - np.asarray(MIX.means)[None]) ** 2, -1), axis=1))
    spread[r] = float(np.mean(d))
    # E|z| for z ~ N(0, σ² I₂) is σ √(π/2); 100 steps fall short of it by their discretisation.
    assert abs(spread[r] - float(MIX.stds[0]) * np.sqrt(np.pi / 2)) < 0.015, spread
  assert abs(spread[2] - spread[0]) < 0.008, spread


def test_recurrence_refused_unless_a_count():
  for bad in (-1, 1.5):
    with pytest.raises(ConfigError, match="recurrence="):
      sample(KEY, exact_eps, SDE, (B, 2), labels(B), "ddim", 4, recurrence=bad)


# ------------------------------------------------------------------ frequency-decoupled guidance


def images(seed=0, shape=(4, 8, 8, 1)):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def image_eps(x, t, y):
  """A class-dependent ε on images: a smooth field plus a per-class pattern (closed form)."""
  pattern = jnp.sin(jnp.arange(x.shape[1] * x.shape[2]).reshape(1, x.shape[1], x.shape[2], 1)
                    * (1 + y[:, None, None, None].astype(jnp.float32)))
  return 0.3 * x + 0.5 * pattern * (y < 3)[:, None, None, None]


@pytest.mark.parametrize("levels", [2, 3, 4])
def test_the_pyramid_collapses_back_exactly(levels):
  x = images()
  bands = frequency.laplacian_pyramid(x, levels)
  assert len(bands) == levels and bands[-1].shape[1] == 8 // 2 ** (levels - 1)
  np.testing.assert_allclose(frequency.collapse(bands), x, atol=1e-6)


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5])
def test_fdg_at_equal_scales_is_cfg(scale):
  x, y = images(), jnp.array([0, 1, 2, 0])
  t = jnp.full((4,), 0.5)
  got = guidance.fdg(image_eps, SDE, scale, scale, 3, levels=3)(x, t, y)
  want = guidance.classifier_free(image_eps, scale, 3)(x, t, y)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_fdg_scales_each_band_alone():
  """The coarse scale moves only the coarse band of the x̂₀ difference, the fine only the fine."""
  x, y, t = images(), jnp.array([0, 1, 2, 0]), jnp.full((4,), 0.5)
  x0 = lambda eps: eps_to_x0(SDE, x, eps, t)
  base = x0(guidance.fdg(image_eps, SDE, 1.0, 1.0, 3)(x, t, y))
  low = x0(guidance.fdg(image_eps, SDE, 3.0, 1.0, 3)(x, t, y)) - base
  high = x0(guidance.fdg(image_eps, SDE, 1.0, 3.0, 3)(x, t, y)) - base
  fine_of = lambda d: frequency.laplacian_pyramid(d, 2)[0]
  np.testing.assert_allclose(fine_of(low), 0.0, atol=1e-5)          # no fine detail moved
  np.testing.assert_allclose(frequency._down(high), 0.0, atol=1e-5)  # no coarse structure moved
  assert float(jnp.max(jnp.abs(low))) > 1e-2 and float(jnp.max(jnp.abs(high))) > 1e-2


def test_fdg_refusals():
  with pytest.raises(ConfigError, match="levels=1"):
    guidance.fdg(image_eps, SDE, 1.0, 2.0, 3, levels=1)
  x, t = images(shape=(4, 6, 6, 1)), jnp.full((4,), 0.5)
  with pytest.raises(ConfigError, match="halve only 1 time"):
    guidance.fdg(image_eps, SDE, 1.0, 2.0, 3, levels=3)(x, t, jnp.zeros(4, jnp.int32))
  with pytest.raises(ConfigError, match="splits images"):
    xs, ts, ys = noisy_batch()
    guidance.fdg(exact_eps, SDE, 1.0, 2.0, NULL)(xs, ts, ys)


# ------------------------------------------------------------------ the defects, guarded


@pytest.mark.parametrize("t_eps", [0.0, -1e-3, 1.0, 1.5])
def test_t_eps_outside_zero_to_t_is_refused(t_eps):
  with pytest.raises(ConfigError, match=r"t_eps=.*\(0, T = 1\)"):
    sample(KEY, exact_eps, SDE, (B, 2), labels(B), "ode_heun", 4, t_eps=t_eps)


def test_cfgpp_is_kept_or_refused():
  pp = guidance.cfgpp(exact_eps, 0.5, NULL)
  kept = guidance.dynamic_threshold(guidance.clip_x0(pp, SDE, 1.0), SDE)
  assert kept.pair is not None
  for wrap in (lambda f: guidance.classifier(f, lambda x, t: MIX.log_prob_y(SDE, x, t), SDE, 1.0),
               lambda f: guidance.unconditional(f, NULL), lambda f: guidance.classifier_free(f, 2.0, NULL)):
    with pytest.raises(ConfigError, match="cannot wrap cfgpp"):
      wrap(pp)
  for sampler in set(SAMPLERS) - set(RENOISING):
    with pytest.raises(ConfigError, match=f"sampler='{sampler}' cannot run CFG\\+\\+"):
      sample(KEY, kept, SDE, (B, 2), labels(B), sampler, 4)


def test_cfgpp_one_step_closed_forms():
  """One step T → t_eps: ddim is √ᾱ_s x̂₀(ε̂) + σ_s ε(∅); dpmpp_2m (first order) re-noises x_T with
  ε(∅) and takes DPM-Solver++'s step, which is the same."""
  lam, y = 0.6, labels(B)
  x = SDE.prior_sample(jax.random.split(KEY)[0], (B, 2))
  times = SDE.time_grid(1, 1e-3, "linear")
  t, s = jnp.full((B,), times[0]), times[1]
  cond, uncond = exact_eps(x, t, y), exact_eps(x, t, jnp.full_like(y, NULL))
  guided = uncond + lam * (cond - uncond)
  x0 = eps_to_x0(SDE, x, guided, t)
  alpha_s, sigma_s = SDE.marginal_coeffs(s)
  want = alpha_s * x0 + sigma_s * uncond
  for sampler in ("ddim", "dpmpp_2m"):
    got = sample(KEY, guidance.cfgpp(exact_eps, lam, NULL), SDE, (B, 2), y, sampler, 1)
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=sampler)


@pytest.mark.parametrize("phi", [0.0, 0.5, 1.0])
def test_rescale_closed_form(phi):
  """ε̃ = φ · ε_cfg · std(ε_c)/std(ε_cfg) + (1 − φ) · ε_cfg, per sample."""
  x, t, y = noisy_batch()
  scale = 3.0
  plain = cfg(scale)(x, t, y)
  cond = exact_eps(x, t, y)
  ratio = jnp.std(cond, axis=1, keepdims=True) / jnp.std(plain, axis=1, keepdims=True)
  want = phi * plain * ratio + (1 - phi) * plain
  got = guidance.classifier_free(exact_eps, scale, NULL, rescale=phi)(x, t, y)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_times_stay_float32_for_a_bfloat16_state():
  seen = []

  def eps_fn(x, t, y):
    seen.append(t.dtype)
    return exact_eps(x.astype(jnp.float32), t, y).astype(x.dtype)
  x = SDE.prior_sample(KEY, (B, 2), jnp.bfloat16)
  times = SDE.time_grid(3, 1e-3, "linear")
  x0, _ = samplers.ddim(KEY, eps_fn, SDE, x, labels(B), times)
  assert set(seen) == {jnp.dtype(jnp.float32)} and x0.dtype == jnp.bfloat16
