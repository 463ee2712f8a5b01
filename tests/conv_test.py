"""conv.conv_general_dilated equals lax's in values and both gradients, and keeps the
classifier's input gradient a canonical convolution inside lax.scan."""
import re

import chex
import jax
import jax.numpy as jnp
from absl.testing import parameterized
from jax import lax

import pytest

from jaxguide.models import conv
from jaxguide import models

pytestmark = pytest.mark.cpu_exact   # XLA:CPU's HLO and exact values (tests/conftest.py)


class ConvTest(parameterized.TestCase):

  @parameterized.parameters(((1, 1), "SAME"), ((2, 2), ((0, 1), (0, 1))), ((1, 1), "VALID"),
                            ((2, 1), ((1, 1), (2, 0))))
  def test_equals_lax_with_gradients(self, strides, padding):
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (3, 9, 10, 5))
    w = jax.random.normal(kw, (3, 3, 5, 7))
    dn = ("NHWC", "HWIO", "NHWC")

    def loss(fn):
      return lambda x, w: jnp.sum(jnp.sin(fn(x, w, strides, padding, dimension_numbers=dn)))
    ours, theirs = loss(conv.conv_general_dilated), loss(lax.conv_general_dilated)
    chex.assert_trees_all_close(ours(x, w), theirs(x, w), atol=0, rtol=0)
    chex.assert_trees_all_close(jax.grad(ours, (0, 1))(x, w), jax.grad(theirs, (0, 1))(x, w),
                                atol=1e-5, rtol=1e-5)

  def test_input_gradient_in_scan_is_canonical(self):
    # Inside a while body XLA:CPU runs a convolution that reads its kernel as `01oi` in plain
    # loops (5x slower here); every convolution of a scanned classifier gradient must be `01io`.
    model = models.NoisyClassifier(num_classes=3, ch=8, ch_mult=(1, 2), num_res_blocks=1, groups=4)
    x = jnp.zeros((2, 8, 8, 1))
    params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x, jnp.ones(2))["params"]

    def step(x, t):
      grad = jax.grad(lambda x: jnp.sum(model.apply({"params": params}, x, jnp.full(2, t))[:, 0]))
      return x + 1e-3 * grad(x), None
    hlo = jax.jit(lambda x: lax.scan(step, x, jnp.linspace(1, 0.1, 20))[0]).lower(x).compile().as_text()
    labels = re.findall(r"convolution\(.*?dim_labels=(\S+?),", hlo)
    self.assertNotEmpty(labels)
    self.assertEqual([l for l in labels if "_01io->" not in l], [])
