"""Samplers for every process (`sde.Process`: the VP-SDE, the rectified flow), each one short pure
function whose loop is ONE `lax.scan`. They read the process through its interface only (α, σ,
their rates, λ, σ̃, the SDE's f and g), so each runs on every Gaussian path.

Every sampler has the signature

    sampler(key, eps_fn, sde, x, y, times, *, save_every=0, **options) -> (x0, traj)

where x is the prior draw x_T (B, ...) of any rank, y the labels (B,) (or condition vectors
(B, D)) passed on to eps_fn, and
`times` the decreasing grid `sde.time_grid(steps, t_eps, spacing)` from T to t_eps. Guidance, x̂₀
clipping and dynamic thresholding are ε-transforms (`jaxguide.guidance`), so every sampler gets
them all.

No sampler adds noise on its final step. What each returns, for the grid T = t_0 > … > t_N = t_eps:

  euler_maruyama, pc  Tweedie's x̂₀ = (x − σε)/α at t_{N−1}, of the state the next-to-last step
      reached: it replaces the last reverse-SDE step, costs no extra network pass, and is EDM's
      last step (an Euler step of the ODE to σ = 0 is x̂₀). pc runs no corrector there: its Langevin
      noise would stay in the output. The noise-free Euler step to t_eps that x̂₀ replaces
      overshoots: it scales the residual noise σn by 1 − g²h/σ², about −0.7 at 100 linear steps
      (g²h/σ² ≈ 1.7). The noisy step to t_eps followed by x̂₀ at t_eps (one extra pass) is worse:
      x̂₀ at t_eps removes noise of size σ(t_eps) ≈ 0.004, that step adds g√h ≈ 0.035 (100 steps).
  ddpm                the ancestral step to t_eps without its noise: the mean of
                      q(x_{t_eps} | x_{t_{N−1}}, x̂₀).
  ddim                the DDIM step to t_eps without its noise: √ᾱ x̂₀ + √(1 − ᾱ − σ_η²) ε.
  ode_heun, dpmpp_2m, edm  the probability-flow ODE's numerical solution at t_eps (edm: with its
                      churn noise, when churn > 0).

σ(t_eps) ≈ 0.004 at t_eps = 1e-3 for the default schedule, so a state at t_eps is as clean as
x̂₀ to the eye. `sample()` takes t_eps; sample.py and train.py's grids pass the score network's
training t_eps.

`traj` (when save_every > 0) stacks the state every `save_every` steps: shape
(steps // save_every + 1, B, ...), traj[0] = x_T and traj[k] the state after k·save_every steps,
so traj[-1] is x0 when save_every divides steps. Otherwise traj is None.
"""
from __future__ import annotations

import inspect
import numbers
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxguide import guidance
from jaxguide.diffusion.score import EpsFn, eps_to_score, eps_to_x0
from jaxguide.diffusion.sde import Process, SPACINGS, broadcast_to_data
from jaxguide.errors import ConfigError
from jaxguide.guidance.projected import concrete
from jaxguide.parallel import batch_mesh, batch_sharding

Step = Callable[..., tuple]   # (carry, t, t_next, key, last) -> carry; carry[0] is x


def _scan(step: Step, carry: tuple, times: jax.Array, key: jax.Array, save_every: int,
          eps_fn: Optional[EpsFn] = None, *, y: Optional[jax.Array] = None, sde: Optional[Process] = None,
          recurrence: int = 0, evaluates_t_next: bool = False) -> tuple[jax.Array, Optional[jax.Array]]:
  """Runs `step` over consecutive (t, t_next) pairs of `times` in lax.scan.

  One scan, except where `eps_fn` tests guidance intervals (`guidance.intervals_of`) and `times`
  is known at trace time: then one scan per stretch of steps that lie wholly inside or wholly
  outside each interval, each traced under `guidance.decided_intervals` so that its step holds
  only the branch it takes (same values, no conditional per step). A step evaluates ε at its t
  (and, `evaluates_t_next`, at t_next: ode_heun), so that time (both) decides; a Heun step whose
  two times straddle an end of the interval keeps the per-sample test.

  The carry also holds the state of every stateful guidance function of `eps_fn`
  (`guidance.state`: initialised from x_T and `y`), and each step is traced under
  `guidance.carried`. `recurrence` = n repeats each step but the last n more times (`_recurrent`).

  The trajectory is a buffer in the carry written every `save_every` steps, not a per-step scan
  output: that would hold all `steps` states (hundreds of MB for 1000 image steps).
  """
  n = times.shape[0] - 1
  keys = jax.random.split(key, n)
  advance = _recurrent(step, eps_fn, sde, recurrence)

  def run(state, start, stop, decisions):
    def body(state, inputs):     # a new function per stretch: traced under its own decisions
      inner, states, traj = state
      i, t, t_next, k = inputs
      inner, states = advance(inner, states, t, t_next, k, i == n - 1)
      if traj is not None:
        slot = (i + 1) // save_every
        keep = jnp.where((i + 1) % save_every == 0, inner[0], traj[slot])
        traj = lax.dynamic_update_index_in_dim(traj, keep, slot, 0)
      return (inner, states, traj), None
    xs = (jnp.arange(start, stop), times[start:stop], times[start + 1:stop + 1], keys[start:stop])
    with guidance.decided_intervals(decisions):
      return lax.scan(body, state, xs)[0]

  traj = None
  if save_every:
    x = carry[0]
    traj = jnp.zeros((n // save_every + 1,) + x.shape, x.dtype).at[0].set(x)
  states = guidance.init_states(eps_fn, carry[0], y) if eps_fn is not None else ()
  state = (carry, states, traj)
  for start, stop, decisions in _stretches(times, guidance.intervals_of(eps_fn), evaluates_t_next):
    state = run(state, start, stop, decisions)
  carry, _, traj = state
  return carry[0], traj


def _recurrent(step: Step, eps_fn: Optional[EpsFn], sde: Optional[Process], recurrence: int) -> Callable:
  """(carry, states, t, t_next, key, last) -> (carry, states): `step` with the guidance states
  threaded, and with self-recurrence (Bansal et al. 2023; RePaint's resampling, Lugmayr et al.
  2022): n times, step t → s, then back to t by the forward transition
  q(x_t | x_s) = N(a x_s, v I) (`_transition`) with fresh noise; then the step that is kept. Each
  repetition starts from the step's own carry but for x (a multistep sampler's history is that of
  the steps before). The last step is never repeated. n = 0 is the step itself."""
  def once(carry, states, t, t_next, key, last):
    with guidance.carried(eps_fn, states) as box:
      out = step(carry, t, t_next, key, last)
    # The state keeps its dtype (a bfloat16 x stepped with float32 times and coefficients).
    return jax.tree.map(lambda new, old: new.astype(old.dtype), out, carry), box.states()
  if not recurrence:
    return once

  def repeated(carry, states, t, t_next, key, last):
    a, var, _, _, _ = _transition(sde, t, t_next)
    def again(j, loop):
      x_t, states = loop
      out, states = once((x_t,) + carry[1:], states, t, t_next,
                         jax.random.fold_in(key, 2 * j + 1), last)
      z = jax.random.normal(jax.random.fold_in(key, 2 * j + 2), x_t.shape, x_t.dtype)
      return (a * out[0] + jnp.sqrt(var) * z).astype(x_t.dtype), states
    x_t, states = lax.fori_loop(0, jnp.where(last, 0, recurrence), again, (carry[0], states))
    return once((x_t,) + carry[1:], states, t, t_next, key, last)
  return repeated


def _stretches(times: jax.Array, intervals, evaluates_t_next: bool = False) -> list[tuple[int, int, dict]]:
  """[(start, stop, {interval: inside?})]: consecutive steps with the same verdict for every
  interval (True: the step's times inside it, False: outside it; left out: t and t_next on either
  side of an end, so the step tests t itself). One stretch of all steps when there is nothing
  to decide or the grid is traced."""
  n = times.shape[0] - 1
  if not intervals:
    return [(0, n, {})]
  try:
    grid = np.asarray(times, np.float32)         # concrete: the grid `sample` computes
  except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return [(0, n, {})]
  verdicts = []
  for i in range(n):
    ends = (grid[i], grid[i + 1]) if evaluates_t_next else (grid[i],)
    lo_t, hi_t = min(ends), max(ends)
    verdict = {}
    for lo, hi in intervals:     # compared in float32, as the traced test t >= lo, t <= hi is
      lo32, hi32 = np.float32(lo), np.float32(hi)
      if lo32 <= lo_t and hi_t <= hi32:
        verdict[(lo, hi)] = True
      elif hi_t < lo32 or lo_t > hi32:
        verdict[(lo, hi)] = False
    verdicts.append(verdict)
  out = []
  for i, verdict in enumerate(verdicts):
    if out and out[-1][2] == verdict:
      out[-1] = (out[-1][0], i + 1, verdict)
    else:
      out.append((i, i + 1, verdict))
  return out


def _batch_t(t: jax.Array, x: jax.Array) -> jax.Array:
  """t for every sample, in float32 whatever the state's dtype (a bfloat16 t is rounded by up to
  0.4 %: another noise level than the step's)."""
  return jnp.full((x.shape[0],), t, jnp.float32)


def euler_maruyama(key, eps_fn: EpsFn, sde: Process, x, y, times, *, recurrence: int = 0,
                   save_every: int = 0):
  """Euler–Maruyama on the reverse SDE dx = [f − g² score] dt + g dW̄ (the reference tutorial's).

  The last step is Tweedie's x̂₀ at its start time (see the module docstring).
  """
  def step(carry, t, t_next, key, last):
    (x,) = carry
    tb, h = _batch_t(t, x), t - t_next                    # h > 0: we integrate backwards in time
    eps = eps_fn(x, tb, y)
    x_next = _reverse_sde_step(sde, x, eps, tb, h, key)
    return (jnp.where(last, eps_to_x0(sde, x, eps, tb), x_next),)
  return _scan(step, (x,), times, key, save_every, eps_fn, y=y, sde=sde, recurrence=recurrence)


def _reverse_sde_step(sde: Process, x, eps, tb, h, key):
  """x + [g² score − f] h + g √h z: one Euler–Maruyama step of the reverse SDE, back by h."""
  g = broadcast_to_data(sde.diffusion(tb), x)
  mean = x + (g**2 * eps_to_score(sde, eps, tb) - sde.drift(x, tb)) * h
  return mean + g * jnp.sqrt(h) * jax.random.normal(key, x.shape, x.dtype)


def pc(key, eps_fn: EpsFn, sde: Process, x, y, times, *, snr: float = 0.16,
       corrector_steps: int = 1, recurrence: int = 0, save_every: int = 0):
  """Predictor–corrector (score_sde): Langevin corrector at t, then a reverse-diffusion predictor.

  The Langevin step size 2 α_i (snr ‖z‖ / ‖score‖)² uses norms averaged over the batch, as
  score_sde does: per-sample norms blow the step up wherever a score vanishes (a mode's centre),
  which low-dimensional data hits often. The last step is x̂₀ at its start time, uncorrected.
  """
  def langevin(x, tb, alpha, key):
    score = eps_to_score(sde, eps_fn(x, tb, y), tb)
    z = jax.random.normal(key, x.shape, x.dtype)
    norm = lambda v: jnp.mean(jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=-1)))
    size = 2 * alpha * (snr * norm(z) / norm(score)) ** 2
    return x + size * score + jnp.sqrt(2 * size) * z

  def step(carry, t, t_next, key, last):
    (x,) = carry
    tb, h = _batch_t(t, x), t - t_next
    alpha = jnp.exp(2 * (sde.log_alpha(t) - sde.log_alpha(t_next)))  # 1 − β_i of the discrete chain
    keys = jax.random.split(key, corrector_steps + 1)
    corrected = x
    for k in keys[:-1]:                                   # unrolled: corrector_steps is small
      corrected = langevin(corrected, tb, alpha, k)
    # The last step has no corrector: its Langevin noise would be left in the output. jnp.where,
    # not lax.cond: the scan body is shared, so the corrector costs the same either way.
    x = jnp.where(last, x, corrected)
    eps = eps_fn(x, tb, y)
    x_next = _reverse_sde_step(sde, x, eps, tb, h, keys[-1])
    return (jnp.where(last, eps_to_x0(sde, x, eps, tb), x_next),)
  return _scan(step, (x,), times, key, save_every, eps_fn, y=y, sde=sde, recurrence=recurrence)


def ode_heun(key, eps_fn: EpsFn, sde: Process, x, y, times, *, recurrence: int = 0,
             save_every: int = 0):
  """Heun's 2nd-order method on the probability-flow ODE dx/dt = f − ½ g² score (EDM's sampler).

  Deterministic: `key` is unused. t_eps > 0, so every step, the last included, is corrected.
  """
  def velocity(x, t):
    tb = _batch_t(t, x)
    g2 = broadcast_to_data(sde.diffusion(tb) ** 2, x)
    return sde.drift(x, tb) - 0.5 * g2 * eps_to_score(sde, eps_fn(x, tb, y), tb)

  def step(carry, t, t_next, key, last):
    (x,) = carry
    dt = t_next - t
    d1 = velocity(x, t)
    d2 = velocity(x + dt * d1, t_next)
    return (x + 0.5 * dt * (d1 + d2),)
  return _scan(step, (x,), times, key, save_every, eps_fn, y=y, sde=sde, recurrence=recurrence,
               evaluates_t_next=True)


def _transition(sde: Process, t, t_next):
  """(a, v, σ_t², σ_s², α_s) of one step t → s = t_next. The forward transition of the path is
  q(x_t | x_s) = N(a x_s, v I) with a = α_t/α_s and v = σ_t² − a² σ_s² = −σ_t² expm1(λ_t − λ_s)
  (DDPM's β_ts on the VP-SDE, where a = √(1 − β_ts)); written with expm1 so that small steps near
  t_eps keep their precision. The posterior q(x_s | x_t, x₀) has mean (x_t − (v/σ_t) ε)/a at
  ε = (x_t − α_t x₀)/σ_t and variance v σ_s²/σ_t²."""
  alpha_t, sigma_t = sde.marginal_coeffs(t)
  alpha_s, sigma_s = sde.marginal_coeffs(t_next)
  var = -sigma_t**2 * jnp.expm1(sde.log_snr(t) - sde.log_snr(t_next))
  return jnp.exp(sde.log_alpha(t) - sde.log_alpha(t_next)), var, sigma_t**2, sigma_s**2, alpha_s


def ddpm(key, eps_fn: EpsFn, sde: Process, x, y, times, *, recurrence: int = 0, save_every: int = 0):
  """Ancestral sampling (Ho et al. 2020) at the grid times: x_s = (x_t − (v/σ_t) ε)/a + σ_ts z,
  the posterior q(x_s | x_t, x̂₀) of the path's transition (`_transition`) with variance
  σ_ts² = v σ_s²/σ_t²; on the VP-SDE, x_s = (x_t − β_ts/√(1−ᾱ_t) ε)/√(1 − β_ts) + σ_ts z.

  Under CFG++ (`guidance.cfgpp`) the step is the posterior mean given the guided x̂₀ at the state
  re-noised with the unconditional ε: x_t + σ_t (ε(∅) − ε̂), walked with ε(∅)."""
  def step(carry, t, t_next, key, last):
    (x,) = carry
    a, v, var_t, var_s, _ = _transition(sde, t, t_next)
    guided, eps = guidance.renoising_pair(eps_fn, x, _batch_t(t, x), y)
    if eps is not guided:
      x = x + jnp.sqrt(var_t) * (eps - guided)
    mean = (x - v / jnp.sqrt(var_t) * eps) / a
    std = jnp.where(last, 0.0, jnp.sqrt(v * var_s / var_t))
    return (mean + std * jax.random.normal(key, x.shape, x.dtype),)
  return _scan(step, (x,), times, key, save_every, eps_fn, y=y, sde=sde, recurrence=recurrence)


def ddim(key, eps_fn: EpsFn, sde: Process, x, y, times, *, eta: float = 0.0, recurrence: int = 0,
         save_every: int = 0):
  """DDIM (Song et al. 2021): x_s = α_s x̂₀ + √(σ_s² − σ²) ε + σ z, σ = η σ_ts(ddpm).

  η = 0 is deterministic; η = 1 is ddpm (same noise, same result). On the rectified flow η = 0
  is exactly the Euler step of its ODE, x_s = x_t + (s − t) u with u = ε − x̂₀. Under CFG++
  (`guidance.cfgpp`) x̂₀ comes from the guided ε and the ε term is the unconditional one.
  """
  def step(carry, t, t_next, key, last):
    (x,) = carry
    _, v, var_t, var_s, alpha_s = _transition(sde, t, t_next)
    tb = _batch_t(t, x)
    guided, eps = guidance.renoising_pair(eps_fn, x, tb, y)
    x0 = eps_to_x0(sde, x, guided, tb)
    var = eta**2 * v * var_s / var_t
    mean = alpha_s * x0 + jnp.sqrt(jnp.maximum(var_s - var, 0.0)) * eps
    std = jnp.where(last, 0.0, jnp.sqrt(var))
    return (mean + std * jax.random.normal(key, x.shape, x.dtype),)
  return _scan(step, (x,), times, key, save_every, eps_fn, y=y, sde=sde, recurrence=recurrence)


def dpmpp_2m(key, eps_fn: EpsFn, sde: Process, x, y, times, *, recurrence: int = 0,
             save_every: int = 0):
  """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): multistep, data prediction, in λ = ½ log-SNR.

  x_s = (σ_s/σ_t) x_t − α_s (e^{−h} − 1) D with h = λ_s − λ_t and D the 2nd-order extrapolation
  of x̂₀ from this and the previous step. The first step is 1st order (no history), and so is
  the last ("lower_order_final"): on the uniform t grid its h is the largest by far, and the
  extrapolation there is unstable for few steps. Deterministic: `key` is unused.
  Under CFG++ (`guidance.cfgpp`) D extrapolates the guided x̂₀ and x_t is re-noised with the
  unconditional ε: x_t + σ_t (ε(∅) − ε̂) = α_t x̂₀ + σ_t ε(∅) (each first-order step is CFG++'s DDIM).
  """
  def step(carry, t, t_next, key, last):
    x, x0_prev, h_prev = carry
    tb = _batch_t(t, x)
    guided, renoise = guidance.renoising_pair(eps_fn, x, tb, y)
    x0 = eps_to_x0(sde, x, guided, tb)
    alpha_s, sigma_s = sde.marginal_coeffs(t_next)
    _, sigma_t = sde.marginal_coeffs(t)
    if renoise is not guided:
      x = x + sigma_t * (renoise - guided)
    h = 0.5 * (sde.log_snr(t_next) - sde.log_snr(t))
    first_order = (h_prev == 0) | last                  # h_prev = 0 marks the first step
    c = jnp.where(first_order, 0.0, h / (2 * jnp.where(first_order, 1.0, h_prev)))
    d = (1 + c) * x0 - c * x0_prev
    x = sigma_s / sigma_t * x - alpha_s * jnp.expm1(-h) * d
    return x, x0, h
  carry = (x, jnp.zeros_like(x), jnp.zeros((), jnp.float32))   # log_snr is float32
  return _scan(step, carry, times, key, save_every, eps_fn, y=y, sde=sde, recurrence=recurrence)


def edm(key, eps_fn: EpsFn, sde: Process, x, y, times, *, churn: float = 0.0, s_tmin: float = 0.0,
        s_tmax: float = float("inf"), s_noise: float = 1.0, recurrence: int = 0,
        save_every: int = 0):
  """EDM's sampler (Karras et al. 2022, Alg. 2) on any process: Heun's method on x̃ = x/α in the
  VE noise level σ̃ = σ/α, where the probability-flow ODE is dx̃/dσ̃ = (x̃ − D(x̃; σ̃))/σ̃ = ε, with
  stochastic churn: at each step whose σ̃ is in [s_tmin, s_tmax], noise of level
  √(σ̂² − σ̃²)·s_noise first lifts σ̃ to σ̂ = σ̃(1 + γ), γ = min(churn/N, √2 − 1) (never above
  σ̃(T)). churn = 0 is deterministic (then `key` is unused) and converges at second order. Every
  step, the last included, is corrected: the grid ends at t_eps > 0. `spacing="karras"` gives
  EDM's own grid."""
  _check_edm(churn, s_tmin, s_tmax, s_noise)
  n = times.shape[0] - 1
  gamma_max = jnp.minimum(jnp.asarray(churn, jnp.float32) / n, np.sqrt(2.0) - 1.0)
  top = sde.sigma_tilde(times[0])

  def slope(x_tilde, t):      # (x̃ − D)/σ̃ at the noise level of time t: the ε-prediction
    alpha = broadcast_to_data(sde.marginal_coeffs(t)[0], x_tilde)
    return eps_fn(alpha * x_tilde, _batch_t(t, x_tilde), y)

  def step(carry, t, t_next, key, last):
    (x,) = carry
    s_cur, s_next = sde.sigma_tilde(t), sde.sigma_tilde(t_next)
    gamma = jnp.where((s_cur >= s_tmin) & (s_cur <= s_tmax), gamma_max, 0.0)
    s_hat = jnp.maximum(s_cur, jnp.minimum(s_cur * (1.0 + gamma), top))
    # Decided by γ, not by comparing σ̂ with σ̃: two roundings of the same level must not send
    # ε through the float32 round trip σ̃ → t when there is no churn.
    t_hat = jnp.where(gamma > 0, sde.time_of_sigma_tilde(s_hat), t)
    # √(σ̂² − σ̃²) as √((σ̂ − σ̃)(σ̂ + σ̃)): exactly 0 without churn (σ̂² − σ̃² fused into an FMA
    # leaves σ̃²'s rounding error, whose square root is far above it).
    lift = jnp.sqrt(jnp.maximum((s_hat - s_cur) * (s_hat + s_cur), 0.0)) * s_noise
    x_hat = x / sde.marginal_coeffs(t)[0] + lift * jax.random.normal(key, x.shape, x.dtype)
    d = slope(x_hat, t_hat)
    x_euler = x_hat + (s_next - s_hat) * d
    x_next = x_hat + (s_next - s_hat) * 0.5 * (d + slope(x_euler, t_next))
    return (sde.marginal_coeffs(t_next)[0] * x_next,)
  return _scan(step, (x,), times, key, save_every, eps_fn, y=y, sde=sde, recurrence=recurrence,
               evaluates_t_next=True)


def _known(value) -> Optional[float]:
  """A scalar option as a float when it is known at trace time (`guidance.projected.concrete`)."""
  v = concrete(value)
  return None if v is None or v.size != 1 else float(v)


def _check_edm(churn, s_tmin, s_tmax, s_noise) -> None:
  """EDM's options, where they are known at trace time, with one line each."""
  c, lo, hi, noise = (_known(v) for v in (churn, s_tmin, s_tmax, s_noise))
  if c is not None and not c >= 0:
    raise ConfigError(f"churn={churn!r}: EDM's stochasticity must be >= 0 (0 = deterministic, "
                      "e.g. 40)")
  if noise is not None and not noise >= 0:
    raise ConfigError(f"s_noise={s_noise!r}: must be >= 0 (EDM's 1.003 or 1)")
  if lo is not None and hi is not None and lo > hi:
    raise ConfigError(f"s_tmin={s_tmin!r} > s_tmax={s_tmax!r}: churn applies for σ̃ in "
                      "[s_tmin, s_tmax]; give s_tmin <= s_tmax")


# The samplers that re-noise with a Paired ε-function's second ε (CFG++); the others walk its
# first, guided ε alone.
RENOISING = ("ddpm", "ddim", "dpmpp_2m")

SAMPLERS: dict[str, Callable] = {
    "euler_maruyama": euler_maruyama,
    "pc": pc,
    "ode_heun": ode_heun,
    "ddpm": ddpm,
    "ddim": ddim,
    "dpmpp_2m": dpmpp_2m,
    "edm": edm,
}


def sample(key: jax.Array, eps_fn: EpsFn, sde: Process, shape: tuple[int, ...], y: jax.Array,
           sampler: str = "euler_maruyama", steps: int = 1000, *, t_eps: float = 1e-3,
           spacing: str = "linear", return_trajectory: bool = False, save_every: int = 50,
           clip_x0: Optional[float] = None, dynamic_threshold: Optional[float] = None,
           recurrence: int = 0, rho: Optional[float] = None, **sampler_kwargs):
  """Draws x0 (shape) from x_T ~ N(0, I) with `sampler` over `steps` steps from T to t_eps.

  `spacing` is the time grid's (`Process.time_grid`): "linear" in t, "logsnr" (uniform in λ) or
  "karras" (uniform in σ̃^{1/ρ}, `rho` default 7);
  t_eps is best the score network's training t_eps (it never saw smaller times).
  Returns x0, or (x0, traj) with `return_trajectory` (traj: see the module docstring).
  `clip_x0=c` clips x̂₀ to [−c, c]; `dynamic_threshold=p` is Imagen's with quantile p (0.995);
  `recurrence=n` repeats every step but the last n more times, re-noised back to its start
  time by the forward process (self-recurrence; `_recurrent`), for every sampler and guidance.
  `sampler_kwargs` go to the sampler (pc: snr, corrector_steps; ddim: eta; edm: churn, s_tmin,
  s_tmax, s_noise).
  0 < t_eps < sde.T. CFG++ (`guidance.cfgpp`) runs on the samplers that re-noise (RENOISING).
  Stateful guidance (`guidance.state`, e.g. APG's momentum) carries its state through the loop.
  jit it with the static arguments bound and scales traced inside eps_fn, e.g.
  `jax.jit(functools.partial(sample, eps_fn=g, sde=sde, shape=s, sampler="ddim", steps=50))
  (key, y=y)`. When the devices divide the batch, x_T and y are sharded over them (with several
  processes, over every process's devices: every process must then call it, one SPMD program).
  """
  fn = _check(sampler, steps, spacing, shape, y, return_trajectory, save_every, sampler_kwargs, rho)
  _check_run(eps_fn, sde, sampler, t_eps, recurrence)
  if dynamic_threshold is not None:
    eps_fn = guidance.dynamic_threshold(eps_fn, sde, dynamic_threshold)
  if clip_x0 is not None:
    eps_fn = guidance.clip_x0(eps_fn, sde, clip_x0)
  key_prior, key_loop = jax.random.split(key)
  x = sde.prior_sample(key_prior, shape)
  y = jnp.asarray(y)
  mesh = batch_mesh(shape[0])
  if mesh is not None:
    # A constraint, not device_put: it works under jit too, and jit propagates it to the loop.
    x, y = jax.lax.with_sharding_constraint((x, y), batch_sharding(mesh))
  with jax.ensure_compile_time_eval():   # a concrete grid, also under jit: see _scan
    times = sde.time_grid(steps, t_eps, spacing, **({} if rho is None else {"rho": rho}))
    if sampler in EXPLICIT_SDE:
      _check_explicit_steps(sde, sampler, times, spacing)
  x0, traj = fn(key_loop, eps_fn, sde, x, y, times, recurrence=int(recurrence),
                save_every=save_every if return_trajectory else 0, **sampler_kwargs)
  return (x0, traj) if return_trajectory else x0


def _check(sampler: str, steps: int, spacing: str, shape, y, return_trajectory: bool,
           save_every: int, sampler_kwargs: dict, rho: Optional[float] = None) -> Callable:
  """Validates `sample`'s arguments with one-line ConfigErrors; returns the sampler function."""
  if sampler not in SAMPLERS:
    raise ConfigError(f"sampler={sampler!r} is not known: use one of {', '.join(SAMPLERS)}")
  if not isinstance(steps, numbers.Integral) or steps < 1:
    raise ConfigError(f"steps={steps!r}: the number of sampling steps must be an int >= 1 "
                      "(e.g. steps=100)")
  if spacing not in SPACINGS:
    raise ConfigError(f"spacing={spacing!r} is not known: use one of {', '.join(SPACINGS)}")
  if rho is not None and spacing != "karras":
    raise ConfigError(f"rho={rho!r} is an option of spacing='karras', not {spacing!r}: drop it or "
                      "use spacing='karras'")
  if return_trajectory and (not isinstance(save_every, numbers.Integral) or save_every < 1):
    raise ConfigError(f"save_every={save_every!r} must be an int >= 1 (e.g. save_every=50)")
  if jnp.ndim(y) < 1 or jnp.shape(y)[:1] != tuple(shape[:1]):
    raise ConfigError(f"y has shape {jnp.shape(y)} but shape={tuple(shape)}: pass one condition "
                      f"per sample: labels ({shape[0]},) or condition vectors ({shape[0]}, D)")
  fn = SAMPLERS[sampler]
  known = [p.name for p in inspect.signature(fn).parameters.values()
           if p.kind == p.KEYWORD_ONLY and p.name not in ("save_every", "recurrence")]
  for name in sampler_kwargs:
    if name not in known:
      raise ConfigError(f"{name}= is not an option of sampler={sampler!r}: use "
                        f"{', '.join(known) or 'no options'}")
  return fn


# The samplers that take explicit Euler steps of the reverse SDE (their last step is x̂₀).
EXPLICIT_SDE = ("euler_maruyama", "pc")
DIVERGES = 10.0    # the noise gain over the run past which an explicit chain is refused


def _check_explicit_steps(sde: Process, sampler: str, times: jax.Array, spacing: str) -> None:
  """Refuses a grid on which the explicit reverse-SDE steps amplify noise. On data at one point
  the step t → t − h multiplies the noise left in x by m = 1 − 2(σ'/σ) h + (α'/α) h (from
  g²/σ² = 2σ'/σ − 2α'/α), and the noise present at step k reaches the sample multiplied by
  A_k = ∏_{j ≥ k} |m_j|. One step with |m| > 1 is harmless when later ones contract (the flow's
  linear grid: m ≈ −9 at T = 0.999 with 100 steps, then 0.07). A chain with max_k A_k above
  DIVERGES is refused: on the exact ring mixture every grid above it (the flow at 2–5 steps on
  a log-SNR grid: A ≈ 500–900) drew an RMS of 40–1000 on data of RMS 1.4, every grid below it
  (the VP-SDE's at 2 steps: A ≈ 1.5–3.6) a finite, coarse draw. The last step (x̂₀) is not a
  step of the SDE."""
  try:
    grid = np.asarray(times, np.float64)
  except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  t, h = grid[:-2], grid[:-2] - grid[1:-1]
  if not t.size:
    return
  alpha, sigma = (np.asarray(v, np.float64) for v in sde.marginal_coeffs(jnp.asarray(t, jnp.float32)))
  d_alpha, d_sigma = (np.asarray(v, np.float64) for v in sde.marginal_rates(jnp.asarray(t, jnp.float32)))
  m = 1.0 - 2.0 * d_sigma / sigma * h + d_alpha / alpha * h
  gain = np.cumprod(np.abs(m)[::-1])[::-1]
  worst = int(np.argmax(gain))
  if gain[worst] > DIVERGES:
    raise ConfigError(
        f"sampler={sampler!r} on this {sde.name} process and grid (spacing={spacing!r}, "
        f"{len(grid) - 1} steps): its explicit steps from t={t[worst]:.4g} on multiply the noise "
        f"by {gain[worst]:.3g} and diverge: use more steps, another spacing ('linear', 'logsnr' "
        "or 'karras'), or a sampler that steps exactly (ddpm, ddim, dpmpp_2m, edm, ode_heun)")


def _check_run(eps_fn: EpsFn, sde: Process, sampler: str, t_eps, recurrence) -> None:
  """The checks that need the ε-function or the SDE: t_eps inside (0, T), recurrence a count,
  CFG++ only where the sampler re-noises."""
  t = _known(t_eps)   # traced: checked by nobody
  if t is not None and not 0.0 < t < float(sde.T):
    raise ConfigError(f"t_eps={t_eps!r}: the last time must be in (0, T = {float(sde.T):g}) "
                      "(σ(0) = 0 divides; best the score network's training t_eps, e.g. 1e-3)")
  if not isinstance(recurrence, numbers.Integral) or recurrence < 0:
    raise ConfigError(f"recurrence={recurrence!r}: the repetitions of each step must be an int "
                      ">= 0, e.g. recurrence=1")
  if getattr(eps_fn, "pair", None) is not None and sampler not in RENOISING:
    raise ConfigError(f"sampler={sampler!r} cannot run CFG++ (it does not re-noise with a second "
                      f"ε, and would run plain CFG at λ): use {', '.join(RENOISING)}")
