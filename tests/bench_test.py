"""The benchmark's PyTorch twins (benchmarks/torch_nets.py) are jaxguide's networks: ported weights
give the same outputs and gradients (the UNet also as a v-prediction, score.model.param = "v"),
benchmarks/run.py builds the twin of every preset's networks and weights the ε-loss as jaxguide
does, and its eager Euler–Maruyama loop is jaxguide's. Skipped where torch (the `bench` extra) is
not installed, unless JAXGUIDE_REQUIRE_BENCH=1 (as in CI), when they fail.
Tiny networks on 8x8 images keep every compile to a second or two."""
from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest

conftest.need_torch()
import torch  # noqa: E402
# Tiny networks: more threads only add synchronisation, and cost seconds on a loaded machine.
torch.set_num_threads(1)

from benchmarks import run as bench  # noqa: E402
from benchmarks import torch_nets  # noqa: E402
from configs import mnist  # noqa: E402
import jaxguide as jg  # noqa: E402
from jaxguide.diffusion import losses
from jaxguide.diffusion import score
from jaxguide import models

K = 10
SHAPE = (8, 8, 1)          # two levels (8 -> 4)
KW = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1)
SDE = jg.VPSDE(0.1, 20.0)  # not the default β's: the twin must take the run's


def _nets(attn=(4,), param="eps"):
  """Flax and ported PyTorch UNet (read as a v-prediction where `param` is "v") and classifier,
  float32, random weights."""
  unet, clf = models.UNet(K, attn_resolutions=attn, **KW), models.NoisyClassifier(K, **KW)
  t_unet = torch_nets.UNet(K, image_size=SHAPE[0], attn_resolutions=attn, **KW)
  if param == "v":
    unet, t_unet = score.VPrediction(unet, SDE), torch_nets.VPrediction(t_unet, SDE.beta_min, SDE.beta_max)
  x, t, y = jnp.zeros((1,) + SHAPE), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
  unet_p, clf_p = bench.random_params(unet, (x, t, y), 0), bench.random_params(clf, (x, t), 1)
  t_unet = torch_nets.load_flax_params(t_unet, unet_p)
  t_clf = torch_nets.load_flax_params(torch_nets.NoisyClassifier(K, image_size=SHAPE[0], **KW), clf_p)
  return unet, clf, unet_p, clf_p, t_unet.eval(), t_clf.eval()


class PortTest(chex.TestCase):

  def test_outputs_and_gradients_match(self):
    # The v-prediction UNet, as both presets train it: the twin's UNet inside its wrapper, and the
    # wrapper's ε = α v + σ x with the SDE's α, σ. The plain ε-network is the EM test's.
    unet, clf, unet_p, clf_p, t_unet, t_clf = _nets(param="v")
    self.assertEqual(set(unet_p), {"net"})
    errors = bench.check_port(unet, clf, unet_p, clf_p, t_unet, t_clf, batch=4, shape=SHAPE)
    self.assertLessEqual(errors["unet"], bench.PORT_TOL)
    self.assertLessEqual(errors["classifier"], bench.PORT_TOL)
    for name in ("unet_grad", "classifier_grad", "classifier_grad_x"):
      self.assertLessEqual(errors[name], bench.GRAD_TOL, name)

  def test_a_wrong_port_is_caught(self):
    # Swapping the FiLM projection's scale and shift halves keeps every shape: only the values
    # can tell, so this is what the comparison must see.
    unet, _, unet_p, _, t_unet, _ = _nets(attn=())
    dense = t_unet.ResBlock_0.Dense_0
    with torch.no_grad():
      dense.weight.copy_(torch.cat(dense.weight.chunk(2, dim=0)[::-1]))
      x = np.random.default_rng(0).standard_normal((2,) + SHAPE).astype(np.float32)
      t, y = np.array([0.3, 0.9], np.float32), np.array([1, K], np.int32)
      got = t_unet(bench.to_torch(x, nchw=True), bench.to_torch(t), bench.to_torch(y).long())
    expected = jax.jit(unet.apply)({"params": unet_p}, x, t, y)
    self.assertGreater(bench.max_diff(expected, bench.from_torch(got, nhwc=True)), 1e-2)

  def test_port_is_strict(self):
    _, _, unet_p, _, _, _ = _nets(attn=())
    with self.assertRaises(RuntimeError):          # the attention block's weights are missing
      torch_nets.load_flax_params(torch_nets.UNet(K, image_size=SHAPE[0], attn_resolutions=(4,), **KW),
                                  unet_p)

  def test_twins_of_every_preset(self):
    """run.build_torch builds what models.build_model builds from each configs/mnist.py preset
    the benchmark runs: every model field taken (a field the twin lacks raises), the v-prediction
    wrapper where score.model.param says "v", and the Flax parameters load strictly."""
    x, t, y = jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
    for preset in sorted({p["config"] for p in bench.PRESETS.values()}):
      config = mnist.get_config(preset)
      sde = jg.VPSDE(config.sde.beta_min, config.sde.beta_max)
      for i, (role, args) in enumerate((("score", (x, t, y)), ("classifier", (x, t)))):
        flax_net = models.build_model(config[role].model, K, jnp.float32, sde, role)
        twin = bench.build_torch(config, role)
        torch_nets.load_flax_params(twin, bench.random_params(flax_net, args, i))
        wrapped = isinstance(twin, torch_nets.VPrediction)
        self.assertEqual(wrapped, role == "score" and config.score.model.param == "v", (preset, role))
        if wrapped:
          self.assertEqual((twin.beta_min, twin.beta_max), (sde.beta_min, sde.beta_max))

  def test_strided_same_padding_on_odd_sizes(self):
    # 7 -> 4 pads (1, 1) and 8 -> 4 pads (0, 1): Flax's SAME, which no symmetric padding matches.
    for size in (7, 8):
      conv = nn.Conv(3, (3, 3), strides=(2, 2))
      x = np.random.default_rng(size).standard_normal((2, size, size, 2)).astype(np.float32)
      params = conv.init(jax.random.PRNGKey(0), x)["params"]
      t_conv = torch_nets.Conv(2, 3, 3, stride=2)
      t_conv.load_state_dict(torch_nets.port_params(params))
      with torch.no_grad():
        out = bench.from_torch(t_conv(bench.to_torch(x, nchw=True)), nhwc=True)
      np.testing.assert_allclose(out, conv.apply({"params": params}, x), atol=1e-5)


class EulerMaruyamaTest(chex.TestCase):

  def test_eager_loop_is_jaxguides_sampler(self):
    # Classifier guidance exercises all of it: the null label, ∇ₓ log p, the schedule and the
    # reproduced noise (run.py checks every mode at the real sizes before it times anything).
    unet, clf, unet_p, clf_p, t_unet, t_clf = _nets(attn=())
    sde, steps, batch = jg.VPSDE(), 3, 4
    # A threefry key (not the faster-compiling 'rbg' of nets_test): em_noise reproduces the
    # sampler's draws only where split-then-draw gives the same bits in and out of vmap.
    shape, key = (batch,) + SHAPE, jax.random.PRNGKey(3)
    y = jnp.arange(batch, dtype=jnp.int32) % K
    x_t, z = bench.em_noise(key, shape, steps)
    schedule = bench.em_schedule(np.asarray(sde.time_grid(steps)), sde)
    fn = bench.jax_sampler("classifier", unet, clf, sde, shape, steps, K)
    expected = fn(key, y, unet_p, clf_p, jnp.float32(2.0))
    eps = bench.make_torch_eps("classifier", t_unet, t_clf, 2.0, bench.to_torch(y).long(), K)
    got = bench.torch_em(eps, bench.to_torch(x_t, nchw=True), bench.to_torch(z, nchw=True),
                         schedule)
    scale = float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(bench.from_torch(got, nhwc=True), expected,
                               atol=bench.EM_TOL * max(scale, 1.0))


def test_loss_weight_is_jaxguides():
  """TorchTrainer's w(t) is losses.loss_weight for every weighting, near t = 0 and 1 too."""
  t = np.array([1e-3, 0.05, 0.3, 0.5, 0.9, 1.0], np.float32)
  for weighting in losses.WEIGHTINGS:
    expected = losses.loss_weight(SDE, jnp.asarray(t), weighting, 3.0)
    got = bench.torch_loss_weight(SDE, torch.from_numpy(t), weighting, 3.0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=2e-5, err_msg=weighting)
  assert not np.allclose(bench.torch_loss_weight(SDE, torch.from_numpy(t), "v", 3.0), 1.0)
  with pytest.raises(ValueError, match="weighting"):
    bench.torch_loss_weight(SDE, torch.from_numpy(t), "snr", 3.0)
