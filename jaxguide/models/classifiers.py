"""Classifiers: the noise-conditional classifier p_t(y | x) that classifier guidance
differentiates, and the LeNet evaluator of clean images that judges samples.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxguide.errors import ConfigError
from jaxguide.models.layers import (_check_cond_dim, 
  Conv,
  Dtype,
  TimeEmbedding,
  _check_common,
  _check_conv_config,
  _check_image,
  group_norm,
)
from jaxguide.models.unet import Encoder


class NoisyClassifier(nn.Module):
  """Noise-conditional classifier p_t(y | x_t): the UNet encoder, time in every ResBlock.

  __call__(x (B,H,W,C), t (B,), train=False) -> logits (B, num_classes), float32.
  SiLU and mean pooling keep ∇ₓ log p_t(y|x) smooth for classifier guidance (no max-pool).
  """

  num_classes: int
  ch: int = 32
  ch_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 1
  dropout: float = 0.0
  groups: int = 8
  cond_dim: int = 0
  dtype: Dtype = jnp.float32

  def __post_init__(self):
    _check_common(self.num_classes, self.dropout)
    _check_cond_dim(self.cond_dim)
    _check_conv_config(self.ch, self.ch_mult, self.num_res_blocks, self.groups)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, train: bool = False) -> jax.Array:
    _check_image(x, self.ch_mult)
    emb = TimeEmbedding(self.ch, 4 * self.ch, self.dtype)(t)
    h, _ = Encoder(self.ch, self.ch_mult, self.num_res_blocks, (), self.dropout, self.groups,
                   self.dtype)(x, emb, train)
    h = nn.silu(group_norm(self.groups, self.dtype)(h))
    h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(h)


class LeNet(nn.Module):
  """Clean-image evaluator: conv32-pool-conv64-pool-dense128 (ReLU), dropout, linear head.

  __call__(x (B,H,W,C), train=False) -> logits (B, num_classes), float32.
  `features(x)` returns the 128 penultimate ReLU features, float32, for a Fréchet distance:
  `model.apply(variables, x, method=LeNet.features)`.
  """

  num_classes: int = 10
  dropout: float = 0.25
  convs_per_stage: int = 1   # 2: conv32-conv32-pool-conv64-conv64-pool (a VGG-style judge)
  dtype: Dtype = jnp.float32

  def __post_init__(self):
    _check_common(self.num_classes, self.dropout)
    if self.convs_per_stage < 1:
      raise ConfigError(f"evaluator.model.convs_per_stage={self.convs_per_stage}: use 1 or 2")
    super().__post_init__()

  def setup(self):
    # The first convolution reads the input in float32 (module docstring).
    self.convs = [[Conv(width, (3, 3), dtype=jnp.float32 if i == j == 0 else self.dtype,
                        name=f"conv_{i}_{j}" if j else f"conv_{i}")
                   for j in range(self.convs_per_stage)] for i, width in enumerate((32, 64))]
    self.dense_0 = nn.Dense(128, dtype=self.dtype)
    self.drop = nn.Dropout(self.dropout)
    self.head = nn.Dense(self.num_classes, dtype=jnp.float32)

  def features(self, x: jax.Array, train: bool = False) -> jax.Array:
    if x.ndim != 4:
      raise ConfigError(f"LeNet input has shape {x.shape}: expected NHWC (batch, height, width, channels)")
    h = x.astype(jnp.float32)
    for stage in self.convs:
      for conv in stage:
        h = nn.relu(conv(h)).astype(self.dtype)
      h = nn.max_pool(h, (2, 2), (2, 2))
    h = self.drop(h.reshape(h.shape[0], -1), deterministic=not train)
    return nn.relu(self.dense_0(h)).astype(jnp.float32)

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = self.drop(self.features(x, train), deterministic=not train)
    return self.head(h)
