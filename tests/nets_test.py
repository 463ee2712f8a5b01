"""Networks: shapes (jit and not), float32 outputs under bfloat16 compute, conditioning, dropout,
configuration errors. Tiny widths (ch=8) keep every compile to a few seconds on a CPU."""
from __future__ import annotations

import functools

from absl.testing import parameterized
import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxguide import models
from jaxguide.errors import ConfigError

K = 10          # classes
B = 2           # batch
SMALL = (B, 8, 8, 1)   # two levels (8 -> 4): the cheapest UNet to compile


def _inputs(shape, seed=0):
  rng = np.random.default_rng(seed)          # numpy: eager jax.random would compile threefry
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  t = jnp.asarray(rng.uniform(0.05, 1.0, shape[0]), jnp.float32)
  y = jnp.arange(shape[0], dtype=jnp.int32) % K
  return x, t, y


def _key(seed):
  """An 'rbg' key: XLA:CPU compiles threefry bit generation slowly (seconds per init/dropout),
  and a typed key carries its implementation into every initialiser and dropout mask."""
  return jax.random.key(seed, impl="rbg")


def _init(model, *inputs):
  return jax.jit(model.init)(_key(0), *inputs)


def _random_variables(model, *inputs, seed=0):
  """Variables with the real tree and dtypes (from `eval_shape`, no compute) filled with noise.

  A real `init` of a UNet costs seconds of CPU compile; shapes, dtypes and conditioning tests
  need only some non-zero parameters (the zero-initialised output would hide conditioning).
  """
  shapes = jax.eval_shape(model.init, _key(0), *inputs)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)


@functools.lru_cache(maxsize=None)
def _unet(shape, ch_mult=(1, 2, 2), dtype=jnp.float32, dropout=0.0):
  lowest = shape[1] // 2 ** (len(ch_mult) - 1)             # attention where it is cheapest
  model = models.UNet(K, ch=8, ch_mult=ch_mult, attn_resolutions=(lowest,), dropout=dropout,
                    dtype=dtype)
  # One jitted apply per model, shared by the tests: each compile costs seconds.
  apply = jax.jit(model.apply, static_argnames="train")
  return model, _random_variables(model, *_inputs(shape)), apply


@functools.lru_cache(maxsize=None)
def _classifier(shape, ch_mult=(1, 2, 2), dtype=jnp.float32, dropout=0.0):
  model = models.NoisyClassifier(K, ch=8, ch_mult=ch_mult, dropout=dropout, dtype=dtype)
  apply = jax.jit(model.apply, static_argnames="train")
  return model, _random_variables(model, *_inputs(shape)[:2]), apply


def _assert_float32_params(test, variables):
  for leaf in jax.tree_util.tree_leaves(variables):
    test.assertEqual(leaf.dtype, jnp.float32)


class ImageNetsTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(((B, 28, 28, 1),), ((B, 32, 32, 3),))
  def test_unet_shape_finite(self, shape):
    model, variables, _ = _unet(shape)
    x, t, y = _inputs(shape)
    eps = self.variant(lambda v, x, t, y: model.apply(v, x, t, y))(variables, x, t, y)
    chex.assert_shape(eps, shape)
    chex.assert_type(eps, jnp.float32)
    chex.assert_tree_all_finite(eps)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(((B, 28, 28, 1),), ((B, 32, 32, 3),))
  def test_classifier_shape_finite(self, shape):
    model, variables, _ = _classifier(shape)
    x, t, _ = _inputs(shape)
    logits = self.variant(lambda v, x, t: model.apply(v, x, t))(variables, x, t)
    chex.assert_shape(logits, (B, K))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)

  def test_unet_real_init_zero_output(self):
    model, _, apply = _unet(SMALL, (1, 2))
    inputs = _inputs(SMALL)
    variables = _init(model, *inputs)
    self.assertEqual(set(variables), {"params"})                     # no BatchNorm state
    chex.assert_trees_all_close(apply(variables, *inputs), 0.0)      # zero-initialised conv_out

  def test_unet_is_conditional_and_accepts_null_label(self):
    _, variables, apply = _unet(SMALL, (1, 2))
    x, t, _ = _inputs(SMALL)
    outs = [apply(variables, x, t, jnp.full((B,), label, jnp.int32)) for label in (0, 1, K)]
    chex.assert_tree_all_finite(outs)
    self.assertGreater(float(jnp.abs(outs[0] - outs[1]).max()), 1e-4)
    self.assertGreater(float(jnp.abs(outs[0] - outs[2]).max()), 1e-4)   # ∅ differs from a class
    self.assertEqual(variables["params"]["label_emb"]["embedding"].shape[0], K + 1)
    t0, t1 = jnp.full((B,), 0.1), jnp.full((B,), 0.9)
    y = jnp.zeros((B,), jnp.int32)
    by_time = apply(variables, x, t0, y) - apply(variables, x, t1, y)
    self.assertGreater(float(jnp.abs(by_time).max()), 1e-4)

  def test_classifier_depends_on_time(self):
    _, clf_vars, apply = _classifier(SMALL, (1, 2))
    x, _, _ = _inputs(SMALL)
    logits = [apply(clf_vars, x, jnp.full((B,), t)) for t in (0.1, 0.9)]
    self.assertGreater(float(jnp.abs(logits[0] - logits[1]).max()), 1e-4)

  def test_classifier_input_gradient_for_guidance(self):
    model, clf_vars, _ = _classifier(SMALL, (1, 2))
    x, t, y = _inputs(SMALL)
    def log_p(x):   # the quantity classifier guidance differentiates
      logp = jax.nn.log_softmax(model.apply(clf_vars, x, t))
      return jnp.take_along_axis(logp, y[:, None], axis=-1).sum()
    grad = jax.jit(jax.grad(log_p))(x)
    chex.assert_shape(grad, SMALL)
    chex.assert_tree_all_finite(grad)
    self.assertGreater(float(jnp.abs(grad).max(axis=(1, 2, 3)).min()), 0.0)   # every sample

  def test_bfloat16_compute_keeps_float32_params_and_outputs(self):
    x, t, y = _inputs(SMALL)
    _, unet_vars, unet_apply = _unet(SMALL, (1, 2), jnp.bfloat16)
    _, clf_vars, clf_apply = _classifier(SMALL, (1, 2), jnp.bfloat16)
    _assert_float32_params(self, unet_vars)                          # dtypes of `init`
    _assert_float32_params(self, clf_vars)
    eps = unet_apply(unet_vars, x, t, y)
    logits = clf_apply(clf_vars, x, t)
    chex.assert_type([eps, logits], jnp.float32)
    chex.assert_tree_all_finite([eps, logits])
    # The same parameters in float32 give nearly the same ε: bfloat16 is only the compute dtype.
    ref = _unet(SMALL, (1, 2))[2](unet_vars, x, t, y)
    np.testing.assert_allclose(eps, ref, atol=0.05 * float(jnp.abs(ref).max()))

  def test_bfloat16_networks_see_noise_below_bfloat16_spacing(self):
    """x_t enters in float32: a change of 1e-3 at |x| near 1.5 (bfloat16's spacing there is
    0.0078; σ(t_eps) = 0.004) still changes the bfloat16 UNet's and classifier's outputs."""
    x, t, y = _inputs(SMALL)
    x = jnp.clip(1.5 + 0.1 * x, 1.05, 1.95).astype(jnp.bfloat16).astype(jnp.float32)
    bumped = x + 1e-3
    # Cast to bfloat16 at the input, the bump would vanish from every pixel.
    self.assertTrue(bool(jnp.all(x.astype(jnp.bfloat16) == bumped.astype(jnp.bfloat16))))
    _, unet_vars, unet_apply = _unet(SMALL, (1, 2), jnp.bfloat16)
    _, clf_vars, clf_apply = _classifier(SMALL, (1, 2), jnp.bfloat16)
    self.assertGreater(float(jnp.abs(unet_apply(unet_vars, bumped, t, y) - unet_apply(unet_vars, x, t, y)).max()), 0)
    self.assertGreater(float(jnp.abs(clf_apply(clf_vars, bumped, t) - clf_apply(clf_vars, x, t)).max()), 0)

  def test_dropout_uses_rng_in_train_mode_only(self):
    x, t, y = _inputs(SMALL)
    _, variables, apply = _unet(SMALL, (1, 2), dropout=0.5)
    with self.assertRaises(flax.errors.InvalidRngError):
      apply(variables, x, t, y, train=True)
    a = apply(variables, x, t, y, train=True, rngs={"dropout": _key(0)})
    b = apply(variables, x, t, y, train=True, rngs={"dropout": _key(1)})
    self.assertGreater(float(jnp.abs(a - b).max()), 1e-4)
    chex.assert_trees_all_equal(apply(variables, x, t, y), apply(variables, x, t, y))
    _, clf_vars, apply = _classifier(SMALL, (1, 2), dropout=0.5)
    c = apply(clf_vars, x, t, train=True, rngs={"dropout": _key(0)})
    d = apply(clf_vars, x, t, train=True, rngs={"dropout": _key(1)})
    self.assertGreater(float(jnp.abs(c - d).max()), 1e-5)


class ConfigErrorTest(chex.TestCase):

  def test_image_size_not_divisible(self):
    x, t, y = _inputs((B, 30, 30, 1))
    with self.assertRaisesRegex(ConfigError, r"30x30 is not divisible .*model\.ch_mult"):
      jax.eval_shape(models.UNet(K, ch=8).init, _key(0), x, t, y)
    with self.assertRaisesRegex(ConfigError, "not divisible"):
      jax.eval_shape(models.NoisyClassifier(K, ch=8).init, _key(0), x, t)

  def test_bad_hyper_parameters(self):
    with self.assertRaisesRegex(ConfigError, r"model\.ch=20 is not divisible by model\.groups=8"):
      models.UNet(K, ch=20)
    with self.assertRaisesRegex(ConfigError, r"model\.ch=12 .*model\.groups=8"):
      models.NoisyClassifier(K, ch=12)
    with self.assertRaisesRegex(ConfigError, r"model\.ch_mult"):
      models.UNet(K, ch=8, ch_mult=())
    with self.assertRaisesRegex(ConfigError, r"model\.num_res_blocks"):
      models.UNet(K, ch=8, num_res_blocks=0)
    with self.assertRaisesRegex(ConfigError, r"model\.dropout"):
      models.LeNet(dropout=1.0)
    with self.assertRaisesRegex(ConfigError, r"model\.hidden"):
      models.MLP(3, hidden=0)
    with self.assertRaisesRegex(ConfigError, "num_classes"):
      models.MLPClassifier(0)
    with self.assertRaises(ConfigError) as ctx:
      models.UNet(K, ch=8, groups=3)
    self.assertNotIn("\n", str(ctx.exception))                      # one line, for the scripts

  def test_attention_resolution_must_exist(self):
    x, t, y = _inputs((B, 28, 28, 1))
    with self.assertRaisesRegex(ConfigError, r"model\.attn_resolutions=\(16,\)"):
      jax.eval_shape(models.UNet(K, ch=8, attn_resolutions=(16,)).init, _key(0), x, t, y)


class VectorNetsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_mlp_shapes_and_conditioning(self):
    model = models.MLP(3, hidden=16, depth=2)
    x, t, _ = _inputs((5, 2))
    y = jnp.array([0, 1, 2, 3, 0], jnp.int32)                        # 3 is the null label
    variables = _init(model, x, t, y)
    apply = self.variant(lambda v, x, t, y: model.apply(v, x, t, y))
    eps = apply(variables, x, t, y)
    chex.assert_shape(eps, (5, 2))
    chex.assert_type(eps, jnp.float32)
    chex.assert_tree_all_finite(eps)
    other = apply(variables, x, t, (y + 1) % 4)
    self.assertGreater(float(jnp.abs(eps - other).max()), 1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_mlp_classifier_depends_on_time(self):
    model = models.MLPClassifier(4, hidden=16, depth=2, dtype=jnp.bfloat16)
    x, t, _ = _inputs((5, 2))
    variables = _init(model, x, t)
    _assert_float32_params(self, variables)
    apply = self.variant(lambda v, x, t: model.apply(v, x, t))
    logits = apply(variables, x, t)
    chex.assert_shape(logits, (5, 4))
    chex.assert_type(logits, jnp.float32)
    self.assertGreater(float(jnp.abs(logits - apply(variables, x, 1.0 - t)).max()), 1e-4)


class LeNetTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_logits_and_features(self):
    model = models.LeNet(num_classes=K)
    x, _, _ = _inputs((3, 28, 28, 1))
    variables = _init(model, x)
    self.assertEqual(set(variables), {"params"})                     # no BatchNorm state
    logits = self.variant(lambda v, x: model.apply(v, x))(variables, x)
    feats = self.variant(lambda v, x: model.apply(v, x, method=models.LeNet.features))(variables, x)
    chex.assert_shape([logits, feats], [(3, K), (3, 128)])
    chex.assert_type([logits, feats], jnp.float32)
    chex.assert_tree_all_finite([logits, feats])

  def test_dropout_in_train_mode(self):
    model = models.LeNet(num_classes=K)
    x, _, _ = _inputs((3, 28, 28, 1))
    variables = _init(model, x)
    a = model.apply(variables, x, train=True, rngs={"dropout": _key(2)})
    b = model.apply(variables, x, train=True, rngs={"dropout": _key(3)})
    self.assertGreater(float(jnp.abs(a - b).max()), 1e-6)
    chex.assert_trees_all_equal(model.apply(variables, x), model.apply(variables, x))


class PiecesTest(chex.TestCase):

  def test_count_params(self):
    variables = _random_variables(nn.Dense(3), jnp.ones((1, 4)))
    self.assertEqual(models.count_params(variables), 4 * 3 + 3)

  def test_sinusoidal_embedding(self):
    emb = models.sinusoidal_embedding(jnp.array([0.0, 0.5, 1.0]), 7)
    chex.assert_shape(emb, (3, 7))
    np.testing.assert_allclose(emb[0, :3], 0.0)                      # sin(0)
    np.testing.assert_allclose(emb[0, 3:6], 1.0)                     # cos(0)
    np.testing.assert_allclose(emb[:, 6], 0.0)                       # odd width: zero pad


@pytest.mark.cpu_exact
class GroupNormTest(chex.TestCase, parameterized.TestCase):
  """models.GroupNorm is flax's nn.GroupNorm computed another way: same parameters, same values
  and input gradients to float32 rounding, in both of its forms."""

  @parameterized.product(impl=("dots", "reduce"),
                         case=(((2, 8, 8, 16), 8), ((3, 7, 7, 48), 8), ((2, 5, 5, 6), 3),
                               ((2, 4, 6), 2)))
  def test_equals_flax_group_norm(self, impl, case):
    shape, groups = case
    rng = np.random.default_rng(1)
    x = jnp.asarray(2.0 * rng.standard_normal(shape) + 0.5, jnp.float32)   # a non-zero mean
    ref = nn.GroupNorm(num_groups=groups, epsilon=1e-5)
    ours = models.GroupNorm(groups, impl=impl)
    variables = _random_variables(ref, x)
    self.assertEqual(jax.tree.structure(variables), jax.tree.structure(ours.init(jax.random.PRNGKey(0), x)))
    # Jitted: op-by-op dispatch of the norms and their gradients is most of an eager test's time.
    apply = lambda m: jax.jit(lambda x: m.apply(variables, x))
    np.testing.assert_allclose(apply(ours)(x), apply(ref)(x), atol=2e-5)
    loss = lambda m: jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(m.apply(variables, x)))))
    np.testing.assert_allclose(loss(ours)(x), loss(ref)(x), atol=2e-5)

  def test_bfloat16_output_float32_statistics(self):
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 4, 4, 8)) * 100 + 1000, jnp.float32)
    out = models.GroupNorm(4, dtype=jnp.bfloat16).apply(
        models.GroupNorm(4).init(jax.random.PRNGKey(0), x), x)
    self.assertEqual(out.dtype, jnp.bfloat16)
    # Large mean, unit-ish spread: float32 statistics still normalise to mean 0, std 1.
    np.testing.assert_allclose(jnp.mean(out.astype(jnp.float32)), 0.0, atol=0.02)
    np.testing.assert_allclose(jnp.std(out.astype(jnp.float32)), 1.0, atol=0.02)

  def test_bad_groups_or_impl(self):
    x = jnp.ones((1, 2, 2, 6))
    with self.assertRaisesRegex(ConfigError, "not divisible by num_groups=4"):
      models.GroupNorm(4).init(jax.random.PRNGKey(0), x)
    with self.assertRaisesRegex(ConfigError, "impl='fast'"):
      models.GroupNorm(3, impl="fast").init(jax.random.PRNGKey(0), x)


def _responds(apply, variables, x, t, y, *, t_alt=None, y_alt=None, tol=1e-5) -> bool:
  """Whether every sample's output changes when only t (to t_alt) or only y (to y_alt) changes:
  the check that time and labels reach an (x, t, y) network."""
  base = apply(variables, x, t, y)
  other = apply(variables, x, t if t_alt is None else t_alt, y if y_alt is None else y_alt)
  per_sample = jnp.abs(base - other).reshape(base.shape[0], -1).max(axis=-1)
  return bool(jnp.all(per_sample > tol))


def _perturbed(variables, scale=0.05, seed=0):
  """A real init with small noise added to every leaf (the UNet's zero conv_out hides y and t)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: p + jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype), variables)


class ConditioningTest(chex.TestCase):
  """Labels and time reach the ε-networks; a network that ignores them fails the same check."""

  def _check(self, model, shape, num_classes):
    x, t, _ = _inputs(shape)
    y = jnp.arange(shape[0], dtype=jnp.int32) % num_classes
    apply = jax.jit(model.apply)
    variables = _perturbed(_init(model, x, t, y))
    self.assertTrue(_responds(apply, variables, x, t, y, y_alt=(y + 1) % num_classes))
    self.assertTrue(_responds(apply, variables, x, t, y, y_alt=jnp.full_like(y, num_classes)))  # ∅
    self.assertTrue(_responds(apply, variables, x, t, y, t_alt=1.0 - 0.5 * t))
    return apply, variables, (x, t, y)

  def test_unet_reads_labels_and_time(self):
    model = models.UNet(K, ch=8, ch_mult=(1, 2), groups=4)
    apply, variables, (x, t, y) = self._check(model, SMALL, K)
    # The unperturbed init answers 0 everywhere (zero conv_out): the check must fail on it.
    fresh = _init(model, x, t, y)
    self.assertFalse(_responds(apply, fresh, x, t, y, y_alt=(y + 1) % K))
    self.assertFalse(_responds(apply, fresh, x, t, y, t_alt=1.0 - 0.5 * t))

  def test_mlp_reads_labels_and_time(self):
    self._check(models.MLP(4, hidden=16, depth=2), (6, 2), 4)

  def test_check_rejects_networks_that_ignore_y_or_t(self):
    x, t, y = _inputs((4, 3))
    ignores_y = lambda v, x, t, y: v["w"] * x * t[:, None]
    ignores_t = lambda v, x, t, y: v["w"] * x + y[:, None]
    reads_one_sample = lambda v, x, t, y: x + (jnp.arange(4) == 0)[:, None] * y[:, None]
    v = {"w": 2.0}
    self.assertFalse(_responds(ignores_y, v, x, t, y, y_alt=y + 1))
    self.assertTrue(_responds(ignores_y, v, x, t, y, t_alt=t + 0.1))
    self.assertFalse(_responds(ignores_t, v, x, t, y, t_alt=t + 0.1))
    self.assertTrue(_responds(ignores_t, v, x, t, y, y_alt=y + 1))
    self.assertFalse(_responds(reads_one_sample, v, x, t, y, y_alt=y + 1))   # every sample


class LeNetStagesTest(chex.TestCase):

  def _tree(self, convs_per_stage):
    model = models.LeNet(num_classes=K, convs_per_stage=convs_per_stage)
    x = jnp.zeros((2, 28, 28, 1))
    shapes = jax.eval_shape(model.init, _key(0), x)["params"]
    return model, x, jax.tree_util.tree_map(lambda s: s.shape, shapes)

  def test_one_conv_per_stage_keeps_the_old_tree(self):
    _, _, tree = self._tree(1)
    self.assertEqual(set(tree), {"conv_0", "conv_1", "dense_0", "head"})
    self.assertEqual(tree["conv_0"], {"kernel": (3, 3, 1, 32), "bias": (32,)})
    self.assertEqual(tree["conv_1"], {"kernel": (3, 3, 32, 64), "bias": (64,)})
    self.assertEqual(tree["dense_0"], {"kernel": (7 * 7 * 64, 128), "bias": (128,)})
    self.assertEqual(tree["head"], {"kernel": (128, K), "bias": (K,)})
    self.assertEqual(models.LeNet().convs_per_stage, 1)                 # the default

  def test_two_convs_per_stage(self):
    _, _, tree = self._tree(2)
    convs = {k: v["kernel"] for k, v in tree.items() if k.startswith("conv")}
    self.assertLen(convs, 4)
    # conv32-conv32-pool-conv64-conv64-pool: in order, each conv reads the previous one's width.
    chain = [convs[k] for k in sorted(convs)]
    self.assertEqual([k[-1] for k in chain], [32, 32, 64, 64])
    self.assertEqual([k[-2] for k in chain], [1, 32, 32, 64])
    self.assertTrue(all(k[:2] == (3, 3) for k in chain))
    self.assertEqual(set(tree) - set(convs), {"dense_0", "head"})
    self.assertEqual(tree["dense_0"]["kernel"], (7 * 7 * 64, 128))   # two pools: 28 -> 7

  def test_features_shape_for_both(self):
    x, _, _ = _inputs((3, 28, 28, 1))
    for convs_per_stage in (1, 2):
      model = models.LeNet(num_classes=K, convs_per_stage=convs_per_stage)
      variables = _random_variables(model, x)
      feats = jax.jit(functools.partial(model.apply, method=models.LeNet.features))(variables, x)
      logits = jax.jit(model.apply)(variables, x)
      chex.assert_shape([feats, logits], [(3, 128), (3, K)])
      chex.assert_type([feats, logits], jnp.float32)
      chex.assert_tree_all_finite([feats, logits])
      self.assertTrue(bool(jnp.all(feats >= 0)))                      # penultimate ReLU

  def test_bad_convs_per_stage(self):
    with self.assertRaisesRegex(ConfigError, r"convs_per_stage=0"):
      models.LeNet(convs_per_stage=0)
