"""Losses are finite with finite gradients; label dropout and augmentation do what they say."""
import chex
import jax
import jax.numpy as jnp
import numpy as np

import jaxguide as jg
from jaxguide import losses, nets


def _grads(loss_fn, params, batch):
  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params, batch, jax.random.PRNGKey(3))
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

  def test_eps_loss_finite(self):
    model = nets.UNet(num_classes=10, ch=8, ch_mult=(1, 2), groups=4)
    params = model.init(jax.random.PRNGKey(0), self.x, self.t, self.y)["params"]
    loss, grads = _grads(losses.make_eps_loss(model.apply, self.sde, num_classes=10), params, self.images)
    self.assertGreater(float(loss), 0.0)
    self.assertGreater(float(jax.tree.reduce(lambda a, b: a + jnp.sum(jnp.abs(b)), grads, 0.0)), 0.0)

  def test_noisy_classifier_loss_finite(self):
    model = nets.NoisyClassifier(num_classes=10, ch=8, ch_mult=(1, 2), groups=4)
    params = model.init(jax.random.PRNGKey(0), self.x, self.t)["params"]
    loss, _ = _grads(losses.make_noisy_classifier_loss(model.apply, self.sde), params, self.images)
    # An untrained classifier is near chance: cross-entropy near log 10.
    self.assertAlmostEqual(float(loss), np.log(10), delta=1.0)

  def test_evaluator_loss_finite(self):
    model = nets.LeNet(num_classes=10)
    params = model.init(jax.random.PRNGKey(0), self.x)["params"]
    _grads(losses.make_evaluator_loss(model.apply), params, self.images)

  def test_mlp_losses_on_points(self):
    pts = {"image": jax.random.normal(jax.random.PRNGKey(1), (16, 2)), "label": jnp.arange(16) % 4}
    t = jnp.full((16,), 0.3)
    model = nets.MLP(num_classes=4, hidden=16, depth=2)
    params = model.init(jax.random.PRNGKey(0), pts["image"], t, pts["label"])["params"]
    _grads(losses.make_eps_loss(model.apply, self.sde, num_classes=4), params, pts)
    clf = nets.MLPClassifier(num_classes=4, hidden=16, depth=2)
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
