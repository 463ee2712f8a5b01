"""ε ↔ score ↔ x̂₀ conversions, v-prediction, and the exact Gaussian-mixture reference."""
import types

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxguide as jg
from jaxguide.diffusion import score
from jaxguide import config as config_lib
from jaxguide import models
from jaxguide.training import specs
from jaxguide.errors import ConfigError


class ConversionTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.sde = jg.VPSDE()
    self.x = jax.random.normal(jax.random.PRNGKey(0), (6, 5, 5, 1))
    self.eps = jax.random.normal(jax.random.PRNGKey(1), (6, 5, 5, 1))
    self.t = jnp.linspace(0.1, 1.0, 6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_round_trips(self):
    s = self.variant(score.eps_to_score, static_argnums=0)(self.sde, self.eps, self.t)
    np.testing.assert_allclose(score.score_to_eps(self.sde, s, self.t), self.eps, rtol=1e-5, atol=1e-6)
    x0 = self.variant(score.eps_to_x0, static_argnums=0)(self.sde, self.x, self.eps, self.t)
    np.testing.assert_allclose(score.x0_to_eps(self.sde, self.x, x0, self.t), self.eps, rtol=1e-4, atol=1e-4)

  def test_perturbed_x0_is_recovered_from_true_eps(self):
    x0 = jnp.tanh(self.x)
    x_t, eps = self.sde.perturb(jax.random.PRNGKey(2), x0, self.t)
    np.testing.assert_allclose(score.eps_to_x0(self.sde, x_t, eps, self.t), x0, atol=1e-4)

  def test_bound_functions(self):
    apply = lambda v, x, t, y: v["params"]["w"] * x + t[:, None] + y[:, None]
    f = jg.eps_fn(apply, {"w": 2.0})
    np.testing.assert_allclose(f(jnp.ones((2, 3)), jnp.ones(2), jnp.array([0, 1]))[:, 0], [3.0, 4.0])
    logits = lambda v, x, t: v["params"]["w"] * x
    lp = jg.log_prob_fn(logits, {"w": 1.0})(jnp.array([[0.0, 1.0, 2.0]]), jnp.ones(1))
    np.testing.assert_allclose(jnp.exp(lp).sum(-1), 1.0, rtol=1e-6)


class MixtureTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.sde = jg.VPSDE()
    self.gmm = jg.ring_mixture()
    self.x, self.y = self.gmm.sample(jax.random.PRNGKey(0), 64)
    self.t = jnp.linspace(0.01, 1.0, 64)

  def test_unconditional_score_is_gradient_of_log_density(self):
    grad = jax.grad(lambda x: self.gmm.log_density(self.sde, x, self.t).sum())(self.x)
    null = jnp.full((64,), self.gmm.num_classes)
    np.testing.assert_allclose(self.gmm.score(self.sde, self.x, self.t, null), grad, rtol=1e-4, atol=1e-4)

  def test_bayes_rule(self):
    # ∇ log p(x|y) = ∇ log p(x) + ∇ log p(y|x): the identity classifier guidance rests on.
    null = jnp.full((64,), self.gmm.num_classes)
    grad_y = jax.grad(lambda x: jnp.take_along_axis(
        self.gmm.log_prob_y(self.sde, x, self.t), self.y[:, None], 1).sum())(self.x)
    np.testing.assert_allclose(self.gmm.score(self.sde, self.x, self.t, self.y),
                               self.gmm.score(self.sde, self.x, self.t, null) + grad_y, rtol=1e-3, atol=1e-3)

  def test_posteriors_normalised_and_eps_consistent(self):
    lp = self.gmm.log_prob_y(self.sde, self.x, self.t)
    chex.assert_shape(lp, (64, self.gmm.num_classes))
    np.testing.assert_allclose(jnp.exp(lp).sum(-1), 1.0, rtol=1e-5)
    eps = self.gmm.eps(self.sde, self.x, self.t, self.y)
    np.testing.assert_allclose(score.eps_to_score(self.sde, eps, self.t),
                               self.gmm.score(self.sde, self.x, self.t, self.y), rtol=1e-4, atol=1e-4)
    # Clean samples at small t are classified by the component they came from.
    self.assertGreater(float(jnp.mean(jnp.argmax(lp[:8], -1) == self.y[:8])), 0.99)


def _noisy_pair(sde, shape, seed=0):
  """Known x₀ and ε, times t ∈ [0.05, 1] (B,), and x_t = α x₀ + σ ε."""
  k0, k1 = jax.random.split(jax.random.PRNGKey(seed))
  x0, eps = jax.random.normal(k0, shape), jax.random.normal(k1, shape)
  t = jnp.linspace(0.05, 1.0, shape[0])
  alpha, sigma = sde.marginal_coeffs(t)
  a, s = (v.reshape((-1,) + (1,) * (len(shape) - 1)) for v in (alpha, sigma))
  return x0, eps, t, a * x0 + s * eps, a * eps - s * x0      # ..., x_t, v


class TrueV(nn.Module):
  """A dummy (x, t, y) network that returns a fixed v, times one parameter s (initialised to 1)."""

  v: jax.Array

  @nn.compact
  def __call__(self, x, t, y, train=False):
    del x, t, y, train
    return self.param("s", nn.initializers.ones, ()) * self.v


class VPredictionTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.sde = jg.VPSDE()

  def test_v_to_eps_inverts_v(self):
    _, eps, t, x_t, v = _noisy_pair(self.sde, (6, 5, 5, 1))
    np.testing.assert_allclose(score.v_to_eps(self.sde, x_t, v, t), eps, atol=1e-5)

  def test_true_v_gives_true_eps(self):
    _, eps, t, x_t, v = _noisy_pair(self.sde, (6, 4, 4, 2))
    y = jnp.arange(6) % 3
    model = score.VPrediction(TrueV(v), self.sde)
    variables = model.init(jax.random.PRNGKey(0), x_t, t, y)
    self.assertEqual(set(variables["params"]), {"net"})               # the wrapped net's params
    self.assertEqual(set(variables["params"]["net"]), {"s"})
    out = model.apply(variables, x_t, t, y)
    chex.assert_type(out, jnp.float32)
    np.testing.assert_allclose(out, eps, atol=1e-5)
    # The wrapper is linear in the net's output: ε(2v) − ε(v) = α v.
    doubled = model.apply({"params": {"net": {"s": jnp.array(2.0)}}}, x_t, t, y)
    alpha, _ = self.sde.marginal_coeffs(t)
    np.testing.assert_allclose(doubled - out, alpha[:, None, None, None] * v, atol=1e-5)

  def test_wraps_a_real_network(self):
    net = models.MLP(num_classes=3, hidden=8, depth=1)
    model = score.VPrediction(net, self.sde)
    x, t, y = jnp.ones((4, 2)), jnp.linspace(0.1, 1.0, 4), jnp.array([0, 1, 2, 3])
    variables = model.init(jax.random.PRNGKey(0), x, t, y)
    bare = net.init(jax.random.PRNGKey(0), x, t, y)["params"]
    self.assertEqual(jax.tree.structure(variables["params"]["net"]), jax.tree.structure(bare))
    v = net.apply({"params": variables["params"]["net"]}, x, t, y)
    np.testing.assert_allclose(model.apply(variables, x, t, y),
                               score.v_to_eps(self.sde, x, v, t), rtol=1e-5, atol=1e-6)


class BuildModelTest(chex.TestCase):

  def _config(self, preset="quick"):
    from configs import mnist
    return mnist.get_config(preset)

  def test_param_selects_the_wrapper(self):
    sde = jg.VPSDE()
    c = self._config()
    c.score.model.param = "eps"
    bare = models.build_model(c.score.model, 10, jnp.float32, sde)
    self.assertIsInstance(bare, models.UNet)
    self.assertNotIsInstance(bare, score.VPrediction)
    self.assertEqual(bare.ch, c.score.model.ch)
    c.score.model.param = "v"
    wrapped = models.build_model(c.score.model, 10, jnp.float32, sde)
    self.assertIsInstance(wrapped, score.VPrediction)
    self.assertIsInstance(wrapped.net, models.UNet)
    self.assertEqual(wrapped.net, bare)                               # same architecture inside
    self.assertIs(wrapped.sde, sde)
    with self.assertRaises(ValueError):
      models.build_model(c.score.model, 10, jnp.float32)          # v needs the sde
    c.score.model.param = "x0"
    with self.assertRaisesRegex(ConfigError, r"score\.model\.param='x0'"):
      models.build_model(c.score.model, 10, jnp.float32, sde)
    # Models that have no `param` field are built as before.
    self.assertIsInstance(models.build_model(c.evaluator.model, 10, jnp.float32), models.LeNet)

  def test_v_model_spec_trains_through_the_wrapper(self):
    from configs import toy2d
    c = toy2d.get_config()
    c.score.model.update({"hidden": 8, "depth": 1, "param": "v"})
    c.score.weighting = "v"
    ds = types.SimpleNamespace(num_classes=4, shape=(2,))
    spec = specs.model_spec("score", c, ds)
    self.assertIsInstance(spec.model, score.VPrediction)
    params = spec.model.init(jax.random.PRNGKey(0), *spec.init_args)["params"]
    self.assertEqual(set(params), {"net"})
    batch = {"image": jax.random.normal(jax.random.PRNGKey(1), (16, 2)), "label": jnp.arange(16) % 4}
    (loss, metrics), grads = jax.value_and_grad(spec.loss_fn, has_aux=True)(
        params, batch, jax.random.PRNGKey(2))
    chex.assert_tree_all_finite((loss, metrics, grads))
    self.assertGreater(float(loss), float(metrics["eps_mse"]))       # v weighting: 1/α² > 1

  def test_validate_new_fields(self):
    config_lib.validate(self._config())                              # defaults are valid
    good = [("weighting", "v"), ("weighting", "min_snr"), ("t_sampling", "logsnr_normal"),
            ("min_snr_gamma", 1.0), ("logsnr_std", 0.5)]
    for field, value in good:
      c = self._config()
      c.score[field] = value
      config_lib.validate(c)
    c = self._config()
    c.score.model.param = "v"
    config_lib.validate(c)
    bad = [("weighting", "snr", r"score\.weighting='snr'"),
           ("t_sampling", "lognormal", r"score\.t_sampling='lognormal'"),
           ("min_snr_gamma", 0.0, r"score\.min_snr_gamma=0\.0"),
           ("min_snr_gamma", -5.0, r"score\.min_snr_gamma=-5\.0"),
           ("logsnr_std", 0.0, r"score\.logsnr_std=0\.0"),
           ("logsnr_std", -1.0, r"score\.logsnr_std=-1\.0")]
    for field, value, pattern in bad:
      c = self._config()
      c.score[field] = value
      with self.assertRaisesRegex(ConfigError, pattern) as ctx:
        config_lib.validate(c)
      self.assertNotIn("\n", str(ctx.exception))
    c = self._config()
    c.score.model.param = "x0"
    with self.assertRaisesRegex(ConfigError, r"score\.model\.param='x0'") as ctx:
      config_lib.validate(c)
    self.assertNotIn("\n", str(ctx.exception))

  def test_validate_skips_score_fields_without_score(self):
    c = self._config()
    c.models = "classifier,evaluator"
    c.score.weighting = "snr"                                        # not used: not checked
    config_lib.validate(c)
