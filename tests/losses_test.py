"""Losses are finite with finite gradients; label dropout and augmentation do what they say."""
import math

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

import jaxguide as jg
from jaxguide.diffusion import losses
from jaxguide.diffusion import score
from jaxguide import models

# Parameter init with an 'rbg' key: XLA:CPU compiles threefry bit generation for every leaf slowly.
def rbg():
  return jax.random.key(0, impl="rbg")


def _grads(loss_fn, params, batch):
  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params, batch, jax.random.key(3, impl="rbg"))
  chex.assert_tree_all_finite((loss, metrics, grads))
  return loss, grads


class LossTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.sde = jg.VPSDE()
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    self.images = {"image": jax.random.uniform(k1, (8, 28, 28, 1), minval=-1, maxval=1),
                   "label": jax.random.randint(k2, (8,), 0, 10)}
    self.x, self.t, self.y = self.images["image"], jnp.full((8,), 0.5), self.images["label"]
    # 8x8 crops for the UNet and the noisy classifier: finiteness does not depend on the size.
    self.small = {"image": self.x[:, :8, :8], "label": self.y}

  def test_eps_loss_finite(self):
    model = models.UNet(num_classes=10, ch=8, ch_mult=(1,), groups=4)
    params = jax.jit(model.init)(rbg(), self.small["image"], self.t, self.y)["params"]
    loss, grads = _grads(losses.make_eps_loss(model.apply, self.sde, num_classes=10), params, self.small)
    self.assertGreater(float(loss), 0.0)
    self.assertGreater(float(jax.tree.reduce(lambda a, b: a + jnp.sum(jnp.abs(b)), grads, 0.0)), 0.0)

  def test_noisy_classifier_loss_finite(self):
    model = models.NoisyClassifier(num_classes=10, ch=8, ch_mult=(1, 2), groups=4)
    params = jax.jit(model.init)(rbg(), self.small["image"], self.t)["params"]
    loss, _ = _grads(losses.make_noisy_classifier_loss(model.apply, self.sde), params, self.small)
    # An untrained classifier is near chance: cross-entropy near log 10.
    self.assertAlmostEqual(float(loss), np.log(10), delta=1.0)

  def test_evaluator_loss_finite(self):
    model = models.LeNet(num_classes=10)
    params = jax.jit(model.init)(rbg(), self.x)["params"]
    _grads(losses.make_evaluator_loss(model.apply), params, self.images)

  def test_mlp_losses_on_points(self):
    pts = {"image": jax.random.normal(jax.random.PRNGKey(1), (16, 2)), "label": jnp.arange(16) % 4}
    t = jnp.full((16,), 0.3)
    model = models.MLP(num_classes=4, hidden=16, depth=2)
    params = model.init(jax.random.PRNGKey(0), pts["image"], t, pts["label"])["params"]
    _grads(losses.make_eps_loss(model.apply, self.sde, num_classes=4), params, pts)
    clf = models.MLPClassifier(num_classes=4, hidden=16, depth=2)
    cparams = clf.init(jax.random.PRNGKey(0), pts["image"], t)["params"]
    _grads(losses.make_noisy_classifier_loss(clf.apply, self.sde), cparams, pts)

  def test_label_dropout_rate(self):
    y = jnp.zeros((20000,), jnp.int32)
    dropped = losses.drop_labels(jax.random.PRNGKey(0), y, 0.2, 10)
    self.assertSetEqual(set(np.unique(dropped).tolist()), {0, 10})
    self.assertAlmostEqual(float(jnp.mean(dropped == 10)), 0.2, delta=0.015)
    np.testing.assert_array_equal(losses.drop_labels(jax.random.PRNGKey(0), y, 0.0, 10), y)

  def test_times_exclude_zero(self):
    t = losses.sample_times(jax.random.PRNGKey(0), 10000, 1e-3)
    self.assertGreaterEqual(float(t.min()), 1e-3)
    self.assertLessEqual(float(t.max()), 1.0)

  def test_random_translate_moves_content(self):
    img = (-jnp.ones((64, 8, 8, 1))).at[:, 4, 4, 0].set(1.0)
    out = losses.random_translate(jax.random.PRNGKey(0), img, 2)
    chex.assert_shape(out, img.shape)
    rows, cols = jnp.nonzero(out[..., 0] > 0, size=64)[1:]
    self.assertTrue(bool(jnp.all(jnp.abs(rows - 4) <= 2) & jnp.all(jnp.abs(cols - 4) <= 2)))
    self.assertGreater(len(set(zip(rows.tolist(), cols.tolist()))), 5)   # not one fixed shift
    np.testing.assert_array_equal(losses.random_translate(jax.random.PRNGKey(0), img, 0), img)


# ---------------------------------------------------------------------------------------------
# Loss weightings and time sampling: analytic truths, no numbers copied from a run.

def _phi(x):
  return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _upper(x):
  """1 − Φ(x) in float64, accurate in the upper tail."""
  return 0.5 * math.erfc(x / math.sqrt(2))


def _truncated_normal_moments(mean, std, lo, hi):
  """Mean and variance of N(mean, std²) truncated to [lo, hi], in float64 (Z = Φ(b) − Φ(a)
  written as upper-tail differences so that it keeps its digits when a is far in a tail)."""
  a, b = (lo - mean) / std, (hi - mean) / std
  z = _upper(a) - _upper(b) if a > 0 else (1 - _upper(b)) - (1 - _upper(a))
  r = (_phi(a) - _phi(b)) / z
  var = std**2 * (1 + (a * _phi(a) - b * _phi(b)) / z - r * r)
  return mean + std * r, var


def _run_eps_loss(pred_fn, sde, batch, key, num_classes=10, **kw):
  """make_eps_loss with a parameter-free "network" pred_fn(x_t, t, y); returns the loss, the
  metrics and what the network was called with (x_t, t, y), all from one jitted call."""
  def run(batch, key):
    seen = {}
    def apply_fn(variables, x, t, y, train=False, rngs=None):
      del variables, train, rngs
      seen.update(x=x, t=t, y=y)
      return pred_fn(x, t, y)
    loss, metrics = losses.make_eps_loss(apply_fn, sde, num_classes=num_classes, **kw)({}, batch, key)
    return loss, metrics, seen
  return jax.jit(run)(batch, key)


def _true_eps(sde, x_t, x0, t):
  """The noise the loss drew, recovered from x_t = α x₀ + σ ε (an identity, not the key)."""
  alpha, sigma = sde.marginal_coeffs(t)
  shape = (-1,) + (1,) * (x0.ndim - 1)
  return (x_t - alpha.reshape(shape) * x0) / sigma.reshape(shape)


def _some_prediction(x, t, y):
  """An arbitrary prediction that depends on x, t and y: not the true noise."""
  shape = (-1,) + (1,) * (x.ndim - 1)
  return 0.5 * x + jnp.sin(3 * t).reshape(shape) + 0.01 * y.reshape(shape)


class WeightingTest(chex.TestCase, parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.sde = jg.VPSDE()
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    self.batch = {"image": jax.random.uniform(k1, (64, 4, 4, 1), minval=-1, maxval=1),
                  "label": jax.random.randint(k2, (64,), 0, 10)}
    self.key = jax.random.PRNGKey(7)

  def _hand_terms(self, seen):
    """Per-sample ε errors and (α, σ) at the times the loss drew."""
    eps = _true_eps(self.sde, seen["x"], self.batch["image"], seen["t"])
    pred = _some_prediction(seen["x"], seen["t"], seen["y"])
    err = jnp.mean((pred - eps).reshape(64, -1) ** 2, axis=-1)
    alpha, sigma = self.sde.marginal_coeffs(seen["t"])
    return pred, eps, err, alpha, sigma

  def test_eps_weighting_is_plain_mse(self):
    loss, metrics, seen = _run_eps_loss(_some_prediction, self.sde, self.batch, self.key)
    pred, eps, _, _, _ = self._hand_terms(seen)
    plain = jnp.mean((pred - eps) ** 2)                    # the unweighted ε-matching loss
    np.testing.assert_allclose(loss, plain, rtol=1e-4)
    np.testing.assert_allclose(metrics["eps_mse"], loss, rtol=1e-6)
    kept = seen["y"] != 10                                 # p_uncond = 0.1 drops some to ∅
    np.testing.assert_array_equal(seen["y"][kept], self.batch["label"][kept])
    self.assertTrue(bool(jnp.all((seen["t"] >= 1e-3) & (seen["t"] <= 1.0))))

  @parameterized.product(weighting=("eps", "v", "min_snr"), t_sampling=("uniform", "logsnr_normal"))
  def test_loss_is_weighted_mean_of_per_sample_errors(self, weighting, t_sampling):
    gamma = 2.0   # inside the SNR range of t ∈ [t_eps, 1], so min-SNR clips some samples only
    loss, metrics, seen = _run_eps_loss(_some_prediction, self.sde, self.batch, self.key,
                                        weighting=weighting, min_snr_gamma=gamma,
                                        t_sampling=t_sampling)
    _, _, err, alpha, sigma = self._hand_terms(seen)
    snr = alpha**2 / sigma**2
    w = {"eps": jnp.ones_like(snr), "v": 1.0 / alpha**2,
         "min_snr": jnp.minimum(snr, gamma) / snr}[weighting]
    np.testing.assert_allclose(loss, jnp.mean(w * err), rtol=1e-4)
    np.testing.assert_allclose(metrics["eps_mse"], jnp.mean(err), rtol=1e-4)   # unweighted
    if weighting == "min_snr":
      self.assertTrue(bool(jnp.any(snr > gamma)) and bool(jnp.any(snr < gamma)))

  def test_loss_weight_closed_forms(self):
    t = jnp.linspace(1e-3, 1.0, 101)
    alpha, sigma = self.sde.marginal_coeffs(t)
    snr = alpha**2 / sigma**2
    np.testing.assert_array_equal(losses.loss_weight(self.sde, t, "eps"), jnp.ones_like(t))
    v = losses.loss_weight(self.sde, t, "v")
    np.testing.assert_allclose(v, 1.0 + 1.0 / snr, rtol=1e-4)
    np.testing.assert_allclose(v, 1.0 / alpha**2, rtol=1e-4)          # 1 + σ²/α² = 1/α²
    ms = losses.loss_weight(self.sde, t, "min_snr", 5.0)
    np.testing.assert_allclose(ms, jnp.where(snr > 5.0, 5.0 / snr, 1.0), rtol=1e-4)
    self.assertTrue(bool(jnp.all(ms <= 1.0)))
    np.testing.assert_allclose(losses.loss_weight(self.sde, t, "min_snr", 1e30), 1.0, rtol=1e-6)
    with self.assertRaisesRegex(ValueError, "weighting='snr'"):
      losses.loss_weight(self.sde, t, "snr")

  def test_min_snr_with_huge_gamma_is_eps(self):
    eps_loss, _, _ = _run_eps_loss(_some_prediction, self.sde, self.batch, self.key)
    ms_loss, _, _ = _run_eps_loss(_some_prediction, self.sde, self.batch, self.key,
                                  weighting="min_snr", min_snr_gamma=1e30)
    np.testing.assert_allclose(ms_loss, eps_loss, rtol=1e-6)

  def test_v_weighting_is_the_v_space_error(self):
    # v = α ε − σ x₀; from the ε-prediction, x̂₀ = (x_t − σ ε̂)/α and v̂ = α ε̂ − σ x̂₀, so
    # v̂ − v = (ε̂ − ε)/α: the v-weighted ε loss is the v-prediction loss of the same network.
    loss, metrics, seen = _run_eps_loss(_some_prediction, self.sde, self.batch, self.key,
                                        weighting="v")
    pred, eps, _, alpha, sigma = self._hand_terms(seen)
    a, s = alpha[:, None, None, None], sigma[:, None, None, None]
    x0 = self.batch["image"]
    x0_hat = score.eps_to_x0(self.sde, seen["x"], pred, seen["t"])
    v_hat, v = a * pred - s * x0_hat, a * eps - s * x0
    np.testing.assert_allclose(loss, jnp.mean((v_hat - v) ** 2), rtol=1e-3)
    self.assertGreater(float(loss), float(metrics["eps_mse"]))        # 1/α² > 1 at every t > 0

  def test_bad_options_raise(self):
    apply = lambda *a, **k: None
    with self.assertRaisesRegex(ValueError, "weighting='snr'"):
      losses.make_eps_loss(apply, self.sde, num_classes=10, weighting="snr")
    with self.assertRaisesRegex(ValueError, "t_sampling='lognormal'"):
      losses.make_eps_loss(apply, self.sde, num_classes=10, t_sampling="lognormal")


class ExactEpsTest(chex.TestCase, parameterized.TestCase):
  """Where the target is known: the exact ε of the data distribution minimises the loss."""

  def setUp(self):
    super().setUp()
    self.sde = jg.VPSDE()

  @parameterized.product(weighting=("eps", "v", "min_snr"), t_sampling=("uniform", "logsnr_normal"))
  def test_point_mass_exact_eps_has_zero_loss(self, weighting, t_sampling):
    # x₀ ≡ c: x_t = α c + σ ε, so ε(x, t) = (x − α c)/σ is the drawn noise itself.
    c = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 3, 1)), jnp.float32)
    batch = {"image": jnp.broadcast_to(c, (256, 3, 3, 1)), "label": jnp.zeros((256,), jnp.int32)}
    exact = lambda x, t, y: score.x0_to_eps(self.sde, x, jnp.broadcast_to(c, x.shape), t)
    loss, metrics, _ = _run_eps_loss(exact, self.sde, batch, jax.random.PRNGKey(1),
                                     weighting=weighting, t_sampling=t_sampling)
    self.assertLess(float(loss), 1e-9)
    self.assertLess(float(metrics["eps_mse"]), 1e-9)
    off, _, _ = _run_eps_loss(lambda x, t, y: exact(x, t, y) + 0.1, self.sde, batch,
                              jax.random.PRNGKey(1), weighting=weighting, t_sampling=t_sampling)
    self.assertGreater(float(off), 1e-4)

  def test_exact_mixture_eps_minimises_expected_loss(self):
    # The loss is against the drawn noise, so even the exact ε = E[ε | x_t, y] has a positive
    # loss; but it is the minimiser: ε* + δ costs E‖δ‖²/D more (here δ ≡ 0.1: exactly 0.01),
    # and the unconditional ε*(x, t, ∅) costs more when no label is dropped (labels inform).
    sde, gmm = self.sde, jg.ring_mixture()
    k = gmm.num_classes
    exact = lambda x, t, y: gmm.eps(sde, x, t, y)
    shifted = lambda x, t, y: gmm.eps(sde, x, t, y) + 0.1
    uncond = lambda x, t, y: gmm.eps(sde, x, t, jnp.full_like(y, k))

    def losses_at(key):
      k_data, k_loss = jax.random.split(key)
      x, y = gmm.sample(k_data, 1024)
      batch = {"image": x, "label": y}
      out = []
      for fn in (exact, shifted, uncond):
        apply_fn = lambda v, x, t, y, train=False, rngs=None, fn=fn: fn(x, t, y)
        out.append(losses.make_eps_loss(apply_fn, sde, num_classes=k, p_uncond=0.0)({}, batch, k_loss)[0])
      return jnp.stack(out)

    n = 32   # independent batches; the three losses of one batch share its t and noise
    per = jax.jit(jax.vmap(losses_at))(jax.random.split(jax.random.PRNGKey(0), n))
    gaps = per[:, 1:] - per[:, :1]
    mean, se = jnp.mean(gaps, 0), jnp.std(gaps, 0, ddof=1) / np.sqrt(n)
    self.assertTrue(bool(jnp.all(per[:, 0] > 0)))                      # not zero-loss
    self.assertTrue(bool(jnp.all(mean > 8 * se)), (mean, se))         # both strictly worse
    self.assertLess(abs(float(mean[0]) - 0.01), 4 * float(se[0]))     # E‖δ‖²/D, δ ≡ 0.1

  def test_exact_eps_with_null_labels_beats_perturbations(self):
    # With label dropout the exact network answers ∅ with the marginal ε; it still minimises.
    sde, gmm = self.sde, jg.ring_mixture()
    x, y = gmm.sample(jax.random.PRNGKey(2), 8192)
    batch = {"image": x, "label": y}
    exact = lambda x, t, y: gmm.eps(sde, x, t, y)
    cond_only = lambda x, t, y: gmm.eps(sde, x, t, jnp.where(y == gmm.num_classes, 0, y))
    args = dict(num_classes=gmm.num_classes, p_uncond=0.5)
    base, _, seen = _run_eps_loss(exact, sde, batch, jax.random.PRNGKey(3), **args)
    self.assertSetEqual(set(np.unique(seen["y"]).tolist()) - set(range(gmm.num_classes)),
                        {gmm.num_classes})                              # ∅ reached the network
    wrong_null, _, _ = _run_eps_loss(cond_only, sde, batch, jax.random.PRNGKey(3), **args)
    self.assertGreater(float(wrong_null), float(base))


class LogSNRTimesTest(chex.TestCase, parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.sde = jg.VPSDE()

  def _check_moments(self, mean, std, t_eps=1e-3, n=50000):
    t = losses.sample_times_logsnr_normal(jax.random.PRNGKey(0), self.sde, n, t_eps, mean, std)
    chex.assert_shape(t, (n,))
    self.assertTrue(bool(jnp.all(jnp.isfinite(t))))
    self.assertGreaterEqual(float(t.min()), t_eps)
    self.assertLessEqual(float(t.max()), self.sde.T)
    lam = np.asarray(self.sde.log_snr(t), np.float64)
    lo, hi = float(self.sde.log_snr(self.sde.T)), float(self.sde.log_snr(t_eps))
    m, var = _truncated_normal_moments(mean, std, lo, hi)
    self.assertLess(abs(lam.mean() - m), 4 * math.sqrt(var / n), (lam.mean(), m))
    self.assertLess(abs(lam.var() / var - 1), 0.05)
    return t

  @parameterized.parameters((0.0, 3.0), (2.4, 2.4), (-4.0, 1.0), (9.0, 1.0), (0.0, 0.3))
  def test_truncated_normal_log_snr(self, mean, std):
    # (−4, 1) and (9, 1) are truncated hard at one end each; (0, 0.3) is barely truncated.
    self._check_moments(mean, std)

  def test_far_upper_tail_truncation(self):
    # The mean five stds below λ(1): Φ(a) would round to 1 in float32 (a handful of distinct u,
    # u == 1 mapping to λ = +inf, i.e. t = t_eps); the draw runs in the mirrored tail instead.
    self._check_moments(float(self.sde.log_snr(self.sde.T)) - 5.0, 1.0)

  def test_eps_loss_draws_logsnr_normal_times(self):
    sde, n, mean, std = self.sde, 8192, 6.0, 1.0
    batch = {"image": jnp.zeros((n, 2)), "label": jnp.zeros((n,), jnp.int32)}
    _, _, uniform = _run_eps_loss(lambda x, t, y: x, sde, batch, jax.random.PRNGKey(0))
    _, _, seen = _run_eps_loss(lambda x, t, y: x, sde, batch, jax.random.PRNGKey(0),
                               t_sampling="logsnr_normal", logsnr_mean=mean, logsnr_std=std)
    lam = np.asarray(sde.log_snr(seen["t"]), np.float64)
    m, var = _truncated_normal_moments(mean, std, float(sde.log_snr(1.0)), float(sde.log_snr(1e-3)))
    self.assertLess(abs(lam.mean() - m), 4 * math.sqrt(var / n))
    lam_u = np.asarray(sde.log_snr(uniform["t"]))
    self.assertGreater(abs(lam_u.mean() - m), 1.0)                      # not the uniform draw
