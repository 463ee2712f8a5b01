"""MLPs for 2-D toy data: the ε-network and the noisy classifier.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxguide.errors import ConfigError
from jaxguide.models.layers import Dtype, TimeEmbedding, _check_common, _check_cond_dim
from jaxguide.models.unet import condition_embedding


def _check_mlp(num_classes: int, hidden: int, depth: int) -> None:
  _check_common(num_classes, 0.0)
  if hidden < 2 or depth < 1:
    raise ConfigError(f"model.hidden={hidden}, model.depth={depth}: need hidden >= 2 and depth >= 1 "
                      "(e.g. hidden=128, depth=3)")


class MLPTrunk(nn.Module):
  """Time-conditioned residual MLP on (B, D) data: Dense in, `depth` residual blocks
  (SiLU-Dense, + projected embedding, SiLU-Dense), SiLU out."""

  hidden: int = 128
  depth: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    # The input layer in float32 (module docstring), the rest in `dtype`.
    h = nn.Dense(self.hidden, dtype=jnp.float32, name="dense_in")(x.astype(jnp.float32))
    h = h.astype(self.dtype)
    dense = functools.partial(nn.Dense, self.hidden, dtype=self.dtype)
    for i in range(self.depth):
      r = dense(name=f"block_{i}_in")(nn.silu(h)) + dense(name=f"block_{i}_emb")(nn.silu(emb))
      h = h + dense(name=f"block_{i}_out")(nn.silu(r))
    return nn.silu(h)


class MLP(nn.Module):
  """ε-prediction MLP for 2-D toy data, conditioned on time and class; `y == num_classes` is ∅.

  __call__(x (B, D), t (B,), y (B,) int, train=False) -> ε (B, D), float32.
  `train` is accepted for a uniform interface; there is no dropout. With `cond_dim` > 0, y is a
  condition vector per sample (B, cond_dim) (`condition_embedding`).
  """

  num_classes: int
  hidden: int = 128
  depth: int = 3
  cond_dim: int = 0
  dtype: Dtype = jnp.float32

  def __post_init__(self):
    _check_mlp(self.num_classes, self.hidden, self.depth)
    _check_cond_dim(self.cond_dim)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, train: bool = False) -> jax.Array:
    del train
    emb = TimeEmbedding(self.hidden, self.hidden, self.dtype)(t)
    emb = emb + condition_embedding(y, self.num_classes, self.cond_dim, self.hidden, self.dtype)
    h = MLPTrunk(self.hidden, self.depth, self.dtype)(x, emb)
    return nn.Dense(x.shape[-1], dtype=jnp.float32, name="dense_out")(h)


class MLPClassifier(nn.Module):
  """Noise-conditional classifier for (B, D) data: logits (B, num_classes), float32."""

  num_classes: int
  hidden: int = 128
  depth: int = 3
  dtype: Dtype = jnp.float32

  def __post_init__(self):
    _check_mlp(self.num_classes, self.hidden, self.depth)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, train: bool = False) -> jax.Array:
    del train
    emb = TimeEmbedding(self.hidden, self.hidden, self.dtype)(t)
    h = MLPTrunk(self.hidden, self.depth, self.dtype)(x, emb)
    return nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(h)
