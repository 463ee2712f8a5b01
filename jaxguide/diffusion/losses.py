"""Training objectives. Each factory returns a pure `loss_fn(params, batch, key) -> (loss, metrics)`.

- ε-matching (Ho et al. 2020, in continuous time) with label dropout for classifier-free guidance:
  a fraction `p_uncond` of the labels is replaced by the null label `num_classes`, so one network
  learns both ε(x, t, y) and ε(x, t, ∅); with vector conditions (`conditioning`), condition
  dropout to the null vector. Each sample's squared error is weighted by w(t) (`WEIGHTINGS`):
  1 is plain ε-matching; 1/α² = 1 + 1/SNR is the v-prediction loss ‖v̂ − v‖² (EDM's weighting for
  σ_data = 1); min(SNR, γ)/SNR is min-SNR-γ (Hang et al. 2023) in ε-space, whatever the network
  predicts; `velocity` is ((ασ' − α'σ)/α)², for which the loss is the flow-matching objective
  ‖û − u‖² on the path's velocity u = α'x₀ + σ'ε (ε − x₀ on the rectified flow, weight 1/(1 − t)²).
  Times: uniform on (t_eps, T), a truncated normal log-SNR (EDM), or logit-normal
  (SD3, Esser et al. 2024: t = sigmoid(m + s n), n ~ N(0, 1), clipped to [t_eps, T]).
- the noisy classifier's cross-entropy on x_t at t ~ U(t_eps, T), on the score network's path: it must be right at every noise
  level because guidance asks it for ∇ₓ log p_t(y | x_t) all along the reverse process.
- the evaluator's cross-entropy on clean images, with small random translations.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from jaxguide.diffusion import score
from jaxguide.diffusion.sde import Process

Batch = dict[str, jax.Array]
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def sample_times(key: jax.Array, n: int, t_eps: float, T: float = 1.0) -> jax.Array:
  """t ~ U(t_eps, T): t = 0 is excluded because σ(0) = 0 makes ε undefined there."""
  return jax.random.uniform(key, (n,), minval=t_eps, maxval=T)


def sample_times_logit_normal(key: jax.Array, n: int, t_eps: float, T: float, mean: float,
                              std: float) -> jax.Array:
  """t = sigmoid(mean + std n), n ~ N(0, 1), clipped to [t_eps, T]: SD3's logit-normal times
  (mean 0, std 1), denser in the middle of the path than at its ends."""
  return jnp.clip(jax.nn.sigmoid(mean + std * jax.random.normal(key, (n,))), t_eps, T)


def sample_times_logsnr_normal(key: jax.Array, sde: Process, n: int, t_eps: float,
                               mean: float, std: float) -> jax.Array:
  """t whose log-SNR λ(t) is normal N(mean, std²) truncated to [λ(1), λ(t_eps)] (EDM's log-normal
  σ: ln σ_EDM = −λ/2, so EDM's P_mean = −1.2, P_std = 1.2 is mean = 2.4, std = 2.4). Drawn by
  the inverse CDF, so the truncation puts no mass at the ends; in the mirrored tail when the
  interval lies above the mean, where float32's Φ would round to 1."""
  a, b = ((sde.log_snr(v) - mean) / std for v in (sde.T, t_eps))
  sign = jnp.where(a + b > 0, -1.0, 1.0)
  ends = jax.scipy.special.ndtr(sign * jnp.stack([a, b]))
  u = jax.random.uniform(key, (n,), minval=jnp.min(ends), maxval=jnp.max(ends))
  z = sign * jax.scipy.special.ndtri(u)
  return jnp.clip(sde.log_snr_inverse(mean + std * z), t_eps, sde.T)


T_SAMPLINGS = ("uniform", "logsnr_normal", "logit_normal")


def drop_labels(key: jax.Array, y: jax.Array, p_uncond: float, null_label) -> jax.Array:
  """Replaces each sample's condition by ∅ with probability p_uncond: labels (B,) by the null
  label, condition vectors (B, D) by the null vector (D,) (condition dropout)."""
  drop = jax.random.bernoulli(key, p_uncond, y.shape[:1])
  drop = drop.reshape(drop.shape + (1,) * (y.ndim - 1))
  return jnp.where(drop, jnp.broadcast_to(jnp.asarray(null_label, y.dtype), y.shape), y)


def loss_weight(sde: Process, t: jax.Array, weighting: str, gamma: float = 5.0) -> jax.Array:
  """w(t) (B,) that multiplies each sample's ε squared error (module docstring)."""
  snr = jnp.exp(sde.log_snr(t))
  if weighting == "eps":
    return jnp.ones_like(t)
  if weighting == "v":
    return 1.0 + 1.0 / snr
  if weighting == "min_snr":
    return jnp.minimum(snr, gamma) / snr
  if weighting == "velocity":
    return score.velocity_weight(sde, t)
  raise ValueError(f"weighting={weighting!r}: use one of {WEIGHTINGS}")


WEIGHTINGS = ("eps", "v", "min_snr", "velocity")


def make_eps_loss(apply_fn: Callable[..., jax.Array], sde: Process, *, num_classes: int,
                  p_uncond: float = 0.1, t_eps: float = 1e-3, weighting: str = "eps",
                  min_snr_gamma: float = 5.0, t_sampling: str = "uniform",
                  logsnr_mean: float = 0.0, logsnr_std: float = 3.0,
                  logit_mean: float = 0.0, logit_std: float = 1.0,
                  conditions: Optional[Any] = None) -> LossFn:
  """Weighted mean squared error between the predicted and the true noise, labels dropped at
  p_uncond, at times t ~ U(t_eps, 1) or with a truncated-normal log-SNR (`t_sampling`). The
  metric `eps_mse` is the unweighted error, comparable across weightings.

  `conditions` (a `conditioning.Conditions`): the network is conditioned on vectors instead of
  labels; each sample's label picks one of its class's condition vectors at random (e.g. the
  encodings of its class's training captions), and dropout replaces it by the null vector."""
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting={weighting!r}: use one of {WEIGHTINGS}")
  if t_sampling not in T_SAMPLINGS:
    raise ValueError(f"t_sampling={t_sampling!r}: use one of {T_SAMPLINGS}")

  def draw_times(key, n):
    if t_sampling == "uniform":
      return sample_times(key, n, t_eps, sde.T)
    if t_sampling == "logit_normal":
      return sample_times_logit_normal(key, n, t_eps, sde.T, logit_mean, logit_std)
    return sample_times_logsnr_normal(key, sde, n, t_eps, logsnr_mean, logsnr_std)

  def loss_fn(params, batch, key):
    x0, y = batch["image"], batch["label"]
    k_t, k_noise, k_drop, k_dropout = jax.random.split(key, 4)
    t = draw_times(k_t, x0.shape[0])
    x_t, eps = sde.perturb(k_noise, x0, t)
    if conditions is None:
      y_in = drop_labels(k_drop, y, p_uncond, num_classes)
    else:   # a key folded from k_drop, so that label runs keep the same four-way split
      c = conditions.draw(jax.random.fold_in(k_drop, 1), y)
      y_in = drop_labels(k_drop, c, p_uncond, conditions.null)
    pred = apply_fn({"params": params}, x_t, t, y_in, train=True, rngs={"dropout": k_dropout})
    err = jnp.mean(((pred.astype(jnp.float32) - eps) ** 2).reshape(x0.shape[0], -1), axis=-1)
    loss = jnp.mean(loss_weight(sde, t, weighting, min_snr_gamma) * err)
    return loss, {"eps_mse": jnp.mean(err)}
  return loss_fn


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  logits = logits.astype(jnp.float32)
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return loss, {"accuracy": accuracy}


def make_noisy_classifier_loss(apply_fn: Callable[..., jax.Array], sde: Process, *,
                               t_eps: float = 1e-3) -> LossFn:
  """Cross-entropy of the time-conditioned classifier on x_t of the process, t ~ U(t_eps, T)."""
  def loss_fn(params, batch, key):
    x0, y = batch["image"], batch["label"]
    k_t, k_noise, k_dropout = jax.random.split(key, 3)
    t = sample_times(k_t, x0.shape[0], t_eps, sde.T)
    x_t, _ = sde.perturb(k_noise, x0, t)
    logits = apply_fn({"params": params}, x_t, t, train=True, rngs={"dropout": k_dropout})
    return _cross_entropy(logits, y)
  return loss_fn


def random_translate(key: jax.Array, images: jax.Array, max_shift: int) -> jax.Array:
  """Shifts each image (B, H, W, C) by up to max_shift pixels, filling with the background −1."""
  if max_shift <= 0 or images.ndim != 4:
    return images
  _, h, w, _ = images.shape
  pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
  padded = jnp.pad(images, pad, constant_values=-1.0)
  offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * max_shift + 1)

  def crop(img, off):
    return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def make_evaluator_loss(apply_fn: Callable[..., jax.Array], *, max_shift: int = 2) -> LossFn:
  """Cross-entropy of the clean-image evaluator; random shifts stand in for a larger train set."""
  def loss_fn(params, batch, key):
    k_aug, k_dropout = jax.random.split(key)
    x = random_translate(k_aug, batch["image"], max_shift)
    logits = apply_fn({"params": params}, x, train=True, rngs={"dropout": k_dropout})
    return _cross_entropy(logits, batch["label"])
  return loss_fn
