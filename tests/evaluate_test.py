"""evaluate: the Fréchet distance and diversity against closed forms, and the evaluator's sample
metrics against the figures train.py reports for it."""
import chex
import jax
import numpy as np
import optax
import scipy.linalg
from absl.testing import absltest

from configs import default
from jaxguide import data
from jaxguide.training import specs
from jaxguide import evaluation


def with_moments(rng, n, mean, cov):
  """n points whose sample mean and (ddof=1) covariance are exactly `mean` and `cov`."""
  z = rng.standard_normal((n, len(mean)))
  z -= z.mean(0)
  z = z @ np.linalg.inv(np.linalg.cholesky(np.atleast_2d(np.cov(z, rowvar=False)))).T   # covariance I
  return np.asarray(mean) + z @ np.linalg.cholesky(cov).T


def random_cov(rng, d):
  a = rng.standard_normal((d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


class FrechetDistanceTest(chex.TestCase):

  def test_a_set_with_itself_is_zero(self):
    rng = np.random.default_rng(0)
    x = with_moments(rng, 400, rng.standard_normal(16), random_cov(rng, 16))
    scale = np.trace(np.cov(x, rowvar=False))
    self.assertLessEqual(evaluation.frechet_distance(x, x), 1e-6 * scale)

  def test_grows_with_added_noise(self):
    rng = np.random.default_rng(1)
    x = with_moments(rng, 1000, np.zeros(8), random_cov(rng, 8))
    z = rng.standard_normal(x.shape)
    fds = [evaluation.frechet_distance(x, x + c * z) for c in (0.1, 0.3, 1.0, 3.0)]
    self.assertGreater(fds[0], 0.0)
    self.assertTrue(all(a < b for a, b in zip(fds, fds[1:])), fds)

  def test_one_dimension(self):
    rng = np.random.default_rng(2)
    a = with_moments(rng, 50, [1.0], [[4.0]])
    b = with_moments(rng, 70, [-0.5], [[0.25]])
    np.testing.assert_allclose(evaluation.frechet_distance(a, b), 1.5**2 + (2.0 - 0.5)**2, rtol=1e-10)

  def test_diagonal_gaussians_closed_form(self):
    rng = np.random.default_rng(3)
    va, vb = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    ma, mb = rng.standard_normal(6), rng.standard_normal(6)
    a, b = with_moments(rng, 300, ma, np.diag(va)), with_moments(rng, 200, mb, np.diag(vb))
    expected = np.sum((ma - mb)**2) + np.sum((np.sqrt(va) - np.sqrt(vb))**2)
    np.testing.assert_allclose(evaluation.frechet_distance(a, b), expected, rtol=1e-9)

  def test_general_gaussians_against_scipy_sqrtm(self):
    rng = np.random.default_rng(4)
    ca, cb = random_cov(rng, 10), random_cov(rng, 10)
    ma, mb = rng.standard_normal(10), rng.standard_normal(10)
    a, b = with_moments(rng, 500, ma, ca), with_moments(rng, 400, mb, cb)
    expected = (np.sum((ma - mb)**2) + np.trace(ca) + np.trace(cb)
                - 2 * np.trace(scipy.linalg.sqrtm(ca @ cb)).real)
    np.testing.assert_allclose(evaluation.frechet_distance(a, b), expected, rtol=1e-8)
    np.testing.assert_allclose(evaluation.frechet_distance(b, a), expected, rtol=1e-8)

  def test_needs_two_points(self):
    with self.assertRaisesRegex(ValueError, "two or more"):
      evaluation.frechet_distance(np.zeros((1, 3)), np.ones((5, 3)))


class DiversityTest(chex.TestCase):

  def test_mean_pairwise_distance_of_a_unit_square(self):
    square = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(evaluation.mean_pairwise_distance(square + 100.0),
                               (4 + 2 * np.sqrt(2)) / 6, rtol=1e-12)

  def test_ratio_to_real_data(self):
    rng = np.random.default_rng(5)
    real = rng.standard_normal((60, 5))
    labels = np.repeat([0, 1, 2], 20)
    div = lambda f, y: evaluation.within_class_diversity(f, y, real, labels)
    np.testing.assert_allclose(div(real, labels), 1.0, rtol=1e-12)
    np.testing.assert_allclose(div(3.0 * real - 7.0, labels), 3.0, rtol=1e-12)   # distances scale
    collapsed = np.repeat(real[[0, 20, 40]], 20, axis=0)                          # one point per class
    self.assertAlmostEqual(div(collapsed, labels), 0.0, places=12)
    self.assertIsNone(div(real[[0, 20, 40]], np.array([0, 1, 2])))                # one sample a class


class EvaluatorMetricsTest(chex.TestCase):
  """A LeNet trained for a few steps on mnist5k: its sample metrics on real test images."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = default.get_config()
    cls.train, cls.test = data.load("mnist5k", "train"), data.load("mnist5k", "test")
    cls.spec = specs.model_spec("evaluator", cls.config, cls.train)
    cls.params = cls._train(cls.spec, cls.train, steps=20)
    cls.judge = evaluation.Judge(evaluation.make_predict(cls.spec.model.apply, cls.params), cls.test,
                               cls.train)

  @staticmethod
  def _train(spec, train, steps):
    opt = optax.adam(3e-3)
    params = jax.jit(spec.model.init)(jax.random.PRNGKey(0), *spec.init_args)["params"]

    @jax.jit
    def step(params, opt_state, batch, key):
      grads, _ = jax.grad(spec.loss_fn, has_aux=True)(params, batch, key)
      updates, opt_state = opt.update(grads, opt_state)
      return optax.apply_updates(params, updates), opt_state
    opt_state = opt.init(params)
    for i in range(steps):
      batch = data.batch_at(train, i, 64, seed=0)
      params, opt_state = step(params, opt_state, batch, jax.random.PRNGKey(i))
    return params

  def test_accuracy_of_real_images_is_the_evaluators_test_accuracy(self):
    metrics = evaluation.sample_metrics(self.judge, self.test.image, self.test.label)
    reported = evaluation.evaluate_model("evaluator", self.spec, self.config, self.params, self.test)
    self.assertGreater(metrics["accuracy"], 0.5)   # trained: the agreement is not one of chance
    self.assertEqual(metrics["accuracy"], reported["test_accuracy"])
    counts = np.bincount(self.test.label, minlength=10)
    per_class = np.array([metrics["per_class"][c] for c in range(10)])
    np.testing.assert_allclose(np.sum(per_class * counts) / counts.sum(), metrics["accuracy"])
    self.assertEqual(metrics["worst_class_accuracy"], per_class.min())

  def test_held_out_images_as_samples_match_themselves(self):
    metrics = evaluation.sample_metrics(self.judge, self.test.image, self.test.label)
    scale = np.trace(np.cov(self.judge.test_features, rowvar=False))
    self.assertLessEqual(metrics["frechet_distance"], 1e-6 * scale)
    np.testing.assert_allclose(metrics["diversity"], 1.0, rtol=1e-12)

  def test_floor_below_ceiling(self):
    labels = np.repeat(np.arange(10), 20)
    ref = evaluation.reference_figures(self.judge, labels)
    self.assertEqual((ref["n_samples"], ref["n_test"]), (200, len(self.test)))
    self.assertLess(ref["floor"], ref["ceiling"])
    only = evaluation.reference_figures(self.judge, np.repeat([3, 7], 20))   # two classes requested
    self.assertEqual(only["n_test"], int(np.isin(self.test.label, [3, 7]).sum()))
    single = evaluation.reference_figures(self.judge, np.array([3]))   # no covariance: no distance
    self.assertEqual((single["floor"], single["ceiling"]), (None, None))

  def test_measure_with_predictions_given_equals_measure(self):
    """evaluation.measure(predicted=...) (a caller that has judge.predict's output already, e.g.
    benchmarks/quality.py) gives the rows and reference it computes itself."""
    y, s = evaluation.sweep_layout([0, 1, 2], 20, [1.0, 2.0])
    images = np.concatenate([self.test.image[self.test.label == c][:20] for c in (0, 1, 2)] * 2)
    group = evaluation.Samples("cfg", (1.0, 2.0), images, y, s, None, 0.0, 0.0)
    own = evaluation.measure(self.judge, [group])
    given = evaluation.measure(self.judge, [group], predicted=[self.judge.predict(images)])
    self.assertEqual(own, given)
    self.assertEqual([r["scale"] for r in own[0]], [1.0, 2.0])


if __name__ == "__main__":
  absltest.main()
