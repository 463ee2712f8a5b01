"""The processes: the Gaussian paths x_t = α(t) x₀ + σ(t) ε, t ∈ [0, T], that every sampler,
loss and guidance kind reads through one interface (`Process`).

  VPSDE          variance preserving (Song et al. 2021), linear β, α² + σ² = 1:
                 β(t) = β_min + t (β_max − β_min),  dx = −½ β(t) x dt + √β(t) dW,
                 log α(t) = −¼ t² (β_max − β_min) − ½ t β_min,  σ(t) = √(1 − α(t)²)
  RectifiedFlow  rectified flow / flow matching (Liu et al. 2023; Lipman et al. 2023; SD3):
                 α = 1 − t, σ = t, T just below 1 (0.999) so that α(T) > 0

A process gives α and σ (`marginal_coeffs`) and their time derivatives (`marginal_rates`), the
log-SNR λ = log(α²/σ²) and its inverse, σ̃ = σ/α and its inverse, the prior, the time grids, and
the forward SDE with these marginals, dx = f(x, t) dt + g(t) dW with
    f = (α'/α) x,   g² = 2σσ' − 2(α'/α)σ² = −σ² dλ/dt
(the VP-SDE's own f = −½βx, g² = β). Everything else is written once on the base class in these
terms; no sampler asks which process it has.

Every function here accepts data of any shape (B, ...): images (B, H, W, C) and 2-D points (B, 2)
alike; per-sample times have shape (B,) and are broadcast over the trailing axes.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from jaxguide.errors import ConfigError

SPACINGS = ("linear", "logsnr", "karras")   # time_grid's spacings


def broadcast_to_data(v: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes a per-sample (B,) or scalar array so that it broadcasts against x of shape (B, ...)."""
  v = jnp.asarray(v)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


class Process:
  """The interface of a Gaussian path (module docstring). A subclass defines `T`, `log_alpha`,
  `marginal_coeffs`, `marginal_rates`, `log_snr` and `log_snr_inverse` in closed form; the rest
  follows here from them."""

  name = "process"
  T: float

  def alpha_bar(self, t: jax.Array) -> jax.Array:
    """ᾱ(t) = α(t)², the DDPM cumulative product written in continuous time."""
    return jnp.exp(2.0 * self.log_alpha(jnp.asarray(t, jnp.float32)))

  def perturb(self, key: jax.Array, x0: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Samples x_t ~ p(x_t | x₀) at per-sample times t (B,); returns (x_t, ε)."""
    eps = jax.random.normal(key, x0.shape, x0.dtype)
    alpha, sigma = self.marginal_coeffs(t)
    return broadcast_to_data(alpha, x0) * x0 + broadcast_to_data(sigma, x0) * eps, eps

  def prior_sample(self, key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """x_T ~ N(0, σ(T)² I), the prior the reverse processes start from (α(T) x₀ is dropped)."""
    _, sigma = self.marginal_coeffs(self.T)
    return (sigma * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

  def drift(self, x: jax.Array, t: jax.Array) -> jax.Array:
    """f(x, t) = (α'/α) x = (d log α/dt) x."""
    alpha, _ = self.marginal_coeffs(t)
    d_alpha, _ = self.marginal_rates(t)
    return broadcast_to_data(d_alpha / alpha, x) * x

  def diffusion(self, t: jax.Array) -> jax.Array:
    """g(t) = √(2σσ' − 2(α'/α)σ²), with the shape of t."""
    alpha, sigma = self.marginal_coeffs(t)
    d_alpha, d_sigma = self.marginal_rates(t)
    return jnp.sqrt(2.0 * sigma * (d_sigma - d_alpha / alpha * sigma))

  def sigma_tilde(self, t: jax.Array) -> jax.Array:
    """σ̃(t) = σ/α = exp(−λ/2): the VE noise level of x/α (k-diffusion's σ; EDM's sampler and the
    Karras grid work in it)."""
    return jnp.exp(-0.5 * self.log_snr(t))

  def time_of_sigma_tilde(self, sigma_tilde: jax.Array) -> jax.Array:
    """The time t with σ̃(t) = sigma_tilde: the inverse of `sigma_tilde`."""
    return self.log_snr_inverse(-2.0 * jnp.log(sigma_tilde))

  def time_grid(self, steps: int, t_eps: float = 1e-3, spacing: str = "linear",
                rho: float = 7.0) -> jax.Array:
    """steps + 1 decreasing times from T to t_eps: the discretisation every sampler walks.

    spacing="linear" spaces the times uniformly in t; "logsnr" spaces λ(t) = log(α²/σ²) uniformly
    between λ(T) and λ(t_eps) (DPM-Solver's "logSNR" grid), which puts more steps near t_eps;
    "karras" spaces σ̃^{1/ρ} uniformly from σ̃(T) to σ̃(t_eps) (Karras et al. 2022, eq. 5; ρ = 7),
    more steps still at low noise.
    """
    if steps < 1:
      raise ConfigError(f"steps={steps}: the number of sampling steps must be >= 1 (e.g. --steps 100)")
    if spacing == "linear":
      return jnp.linspace(self.T, t_eps, steps + 1)
    if spacing == "logsnr":
      lam = jnp.linspace(self.log_snr(self.T), self.log_snr(t_eps), steps + 1)
      grid = self.log_snr_inverse(lam)
    elif spacing == "karras":
      if not rho > 0:
        raise ConfigError(f"rho={rho!r}: the Karras grid's exponent must be > 0 (EDM's 7)")
      hi, lo = self.sigma_tilde(self.T) ** (1.0 / rho), self.sigma_tilde(t_eps) ** (1.0 / rho)
      grid = self.time_of_sigma_tilde(jnp.linspace(hi, lo, steps + 1) ** rho)
    else:
      raise ConfigError(f"spacing={spacing!r} is not known: use one of {', '.join(SPACINGS)}")
    # The endpoints are set exactly: the round trip t -> λ -> t is only float32-accurate.
    return grid.at[0].set(self.T).at[-1].set(t_eps)

  def discrete_alphas_cumprod(self, steps: int, t_eps: float = 1e-3,
                              spacing: str = "linear") -> tuple[jax.Array, jax.Array]:
    """(times, ᾱ at those times) on `time_grid`: the discrete schedule for ddpm and ddim."""
    times = self.time_grid(steps, t_eps, spacing)
    return times, self.alpha_bar(times)


@flax.struct.dataclass
class VPSDE(Process):
  """Variance-preserving SDE (Song et al. 2021) with a linear β schedule; a pytree.

  The defaults β_min = 0.01, β_max = 10 are the reference tutorial's; score_sde uses 0.1 / 20.
  Its prior is N(0, I) (σ(T)² = 1 − α(T)² ≈ 0.993 for the defaults).
  """

  beta_min: float = 0.01
  beta_max: float = 10.0
  T: float = flax.struct.field(pytree_node=False, default=1.0)
  name = "vp"

  def __post_init__(self):
    # Only concrete Python numbers are checked: inside jit the fields are tracers.
    lo, hi = self.beta_min, self.beta_max
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
      if not 0.0 <= lo < hi:
        raise ConfigError(
            f"sde.beta_min={lo} and sde.beta_max={hi}: need 0 <= beta_min < beta_max "
            "(e.g. --config.sde.beta_min=0.01 --config.sde.beta_max=10)")

  def beta(self, t: jax.Array) -> jax.Array:
    return self.beta_min + t * (self.beta_max - self.beta_min)

  def log_alpha(self, t: jax.Array) -> jax.Array:
    return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

  def marginal_coeffs(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(α(t), σ(t)) with the shape of t. σ uses expm1 to stay accurate near t = 0."""
    log_alpha = self.log_alpha(jnp.asarray(t, jnp.float32))
    return jnp.exp(log_alpha), jnp.sqrt(-jnp.expm1(2.0 * log_alpha))

  def marginal_rates(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(dα/dt, dσ/dt) = (−½βα, ½βα²/σ)."""
    alpha, sigma = self.marginal_coeffs(t)
    beta = self.beta(jnp.asarray(t, jnp.float32))
    return -0.5 * beta * alpha, 0.5 * beta * alpha**2 / sigma

  def log_snr(self, t: jax.Array) -> jax.Array:
    """λ(t) = log(α²/σ²), decreasing in t; DPM-Solver steps in half of it."""
    log_alpha = self.log_alpha(jnp.asarray(t, jnp.float32))
    return 2.0 * log_alpha - jnp.log(-jnp.expm1(2.0 * log_alpha))

  def prior_sample(self, key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """x_T ~ N(0, I), the prior the reverse processes start from."""
    return jax.random.normal(key, shape, dtype)

  def drift(self, x: jax.Array, t: jax.Array) -> jax.Array:
    """f(x, t) = −½ β(t) x."""
    return -0.5 * broadcast_to_data(self.beta(t), x) * x

  def diffusion(self, t: jax.Array) -> jax.Array:
    """g(t) = √β(t), with the shape of t."""
    return jnp.sqrt(self.beta(t))

  def log_snr_inverse(self, log_snr: jax.Array) -> jax.Array:
    """The time t with λ(t) = log_snr, in closed form: the inverse of `log_snr`.

    α² = sigmoid(λ) gives L = log α = −½ softplus(−λ); log α(t) = L is the quadratic
    ¼Δ t² + ½β_min t + L = 0 (Δ = β_max − β_min), whose positive root is written as
    t = −4L / (β_min + √(β_min² − 4ΔL)) so that it keeps its digits for small t (and Δ → 0).
    """
    log_alpha = -0.5 * jax.nn.softplus(-jnp.asarray(log_snr, jnp.float32))
    delta = self.beta_max - self.beta_min
    return -4.0 * log_alpha / (self.beta_min + jnp.sqrt(self.beta_min**2 - 4.0 * delta * log_alpha))


@flax.struct.dataclass
class RectifiedFlow(Process):
  """Rectified flow (α = 1 − t, σ = t): the straight path of flow matching; a pytree.

  Its ODE velocity is u = dx/dt = ε − x₀ (`score.eps_to_velocity`), which a velocity network
  (`score.Velocity`, model.param = "velocity") predicts; ε = x + (1 − t) u stays exact up to
  t = 1, where x̂₀ = (x − tε)/(1 − t) does not. The samplers start at T = 0.999 by default:
  α(T) = 0.001, so the prior N(0, T² I) misses the data's share α(T) x₀ of x_T only (the VP-SDE's
  defaults start at α(1) ≈ 0.08), and σ̃(T) = 999.
  """

  T: float = flax.struct.field(pytree_node=False, default=0.999)
  name = "flow"

  def __post_init__(self):
    if isinstance(self.T, (int, float)) and not 0.0 < self.T < 1.0:
      raise ConfigError(f"sde.T={self.T}: the flow's last time must lie in (0, 1), where "
                        "α = 1 − T > 0 (e.g. --config.sde.T=0.999)")

  def log_alpha(self, t: jax.Array) -> jax.Array:
    return jnp.log1p(-jnp.asarray(t, jnp.float32))

  def marginal_coeffs(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    t = jnp.asarray(t, jnp.float32)
    return 1.0 - t, t

  def marginal_rates(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    one = jnp.ones_like(jnp.asarray(t, jnp.float32))
    return -one, one

  def log_snr(self, t: jax.Array) -> jax.Array:
    """λ(t) = 2 log((1 − t)/t)."""
    t = jnp.asarray(t, jnp.float32)
    return 2.0 * (jnp.log1p(-t) - jnp.log(t))

  def log_snr_inverse(self, log_snr: jax.Array) -> jax.Array:
    """t = sigmoid(−λ/2)."""
    return jax.nn.sigmoid(-0.5 * jnp.asarray(log_snr, jnp.float32))

  def sigma_tilde(self, t: jax.Array) -> jax.Array:
    t = jnp.asarray(t, jnp.float32)
    return t / (1.0 - t)

  def time_of_sigma_tilde(self, sigma_tilde: jax.Array) -> jax.Array:
    return sigma_tilde / (1.0 + sigma_tilde)


PROCESSES = {"vp": VPSDE, "flow": RectifiedFlow}      # config.sde.process -> its class
PROCESS_FIELDS = {"vp": ("beta_min", "beta_max"), "flow": ("T",)}


def sde_from(config) -> Process:
  """The process a run's config (its `sde` section) describes: `sde.process` (vp | flow) and that
  process's own fields. A config written before the field existed is a VP-SDE one."""
  section = dict(config.sde)
  name = section.pop("process", "vp")
  if name not in PROCESSES:
    raise ConfigError(f"sde.process={name!r} is not known: use one of {', '.join(PROCESSES)} "
                      "(configs/mnist.py:flow trains a rectified flow)")
  for field in section:
    if field not in PROCESS_FIELDS[name]:
      owner = [p for p, fields in PROCESS_FIELDS.items() if field in fields]
      what = f"an option of the {owner[0]} process" if owner else "not an option of any process"
      raise ConfigError(f"sde.{field} is {what}, and this run's sde.process is {name}: drop it "
                        f"(the {name} process reads {', '.join(f'sde.{f}' for f in PROCESS_FIELDS[name])})")
  return PROCESSES[name](**section)
