"""ε ↔ score ↔ x̂₀ conversions and the exact Gaussian-mixture reference."""
import chex
import jax
import jax.numpy as jnp
import numpy as np

import jaxguide as jg
from jaxguide import score


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
