"""The ε-prediction UNet (DDPM's, with FiLM conditioning on a label or a condition vector)
and its encoder and decoder halves.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxguide.errors import ConfigError
from jaxguide.models.layers import (
  AttnBlock,
  Conv,
  Dtype,
  ResBlock,
  TimeEmbedding,
  Upsample,
  _check_common,
  _check_cond_dim,
  _check_conv_config,
  _check_image,
  group_norm,
)


class Encoder(nn.Module):
  """Time-conditioned UNet encoder: conv_in, then per level ResBlocks (+ attention) and a
  stride-2 3x3 conv except at the last level. Returns the final features and the skips."""

  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int] = ()
  dropout: float = 0.0
  groups: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool = False) -> tuple[jax.Array, list[jax.Array]]:
    # The input (x_t, float32) and the convolution reading it stay float32 (module docstring).
    h = Conv(self.ch, (3, 3), dtype=jnp.float32, name="conv_in")(x.astype(jnp.float32))
    h = h.astype(self.dtype)
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = ResBlock(self.ch * mult, self.groups, self.dropout, self.dtype)(h, emb, train)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(self.groups, self.dtype)(h)
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        # Strided conv rather than pooling: learned, and smooth for the classifier's gradient.
        h = Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype, name=f"down_{level}")(h)
        skips.append(h)
    return h, skips


class Decoder(nn.Module):
  """UNet decoder: per level (coarse to fine) num_res_blocks + 1 ResBlocks, each fed the
  concatenation of h and one encoder skip, then nearest ×2 up-sampling except at the finest level."""

  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int] = ()
  dropout: float = 0.0
  groups: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, skips: list[jax.Array], emb, train: bool = False) -> jax.Array:
    skips = list(skips)
    for level in reversed(range(len(self.ch_mult))):
      # One block more than the encoder per level: it consumes the down-sampling's skip too.
      for _ in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = ResBlock(self.ch * self.ch_mult[level], self.groups, self.dropout, self.dtype)(h, emb, train)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(self.groups, self.dtype)(h)
      if level != 0:
        h = Upsample(h.shape[-1], self.dtype)(h)
    return h


def condition_embedding(y: jax.Array, num_classes: int, cond_dim: int, features: int,
                        dtype: Dtype) -> jax.Array:
  """The condition's part of the FiLM embedding (B, features), added to the time embedding.

  cond_dim = 0: y holds labels (B,) int, embedded by a learned table whose row `num_classes` is
  the null label ∅. cond_dim = D > 0: y holds condition vectors (B, D) (e.g. prompt embeddings;
  ∅ is then a fixed vector such as the empty prompt's encoding), mapped linearly, so that
  one-hot vectors of the labels give exactly the label table's rows.
  """
  if not cond_dim:
    if y.ndim != 1 or not jnp.issubdtype(y.dtype, jnp.integer):
      raise ConfigError(f"y has shape {y.shape} and dtype {y.dtype}: this network takes integer "
                        "labels (B,); for condition vectors (B, D) build it with model.cond_dim=D")
    return nn.Embed(num_classes + 1, features, dtype=dtype, name="label_emb")(y)
  if y.ndim != 2 or y.shape[-1] != cond_dim:
    raise ConfigError(f"y has shape {y.shape}: this network takes condition vectors (B, {cond_dim}) "
                      f"(model.cond_dim={cond_dim}); pass embeddings of that size")
  return nn.Dense(features, dtype=dtype, name="cond_emb")(y.astype(jnp.float32))


class UNet(nn.Module):
  """ε-prediction UNet (DDPM layout) conditioned on time and class; `y == num_classes` is ∅.

  __call__(x (B,H,W,C), t (B,), y (B,) int, train=False) -> ε with the shape of x, float32.
  With `cond_dim` = D > 0, y is a condition vector per sample (B, D) instead (`condition_embedding`).
  H and W must be divisible by 2**(len(ch_mult) - 1): 28 → 14 → 7 with the default (1, 2, 2).
  `attn_resolutions` lists spatial sizes (e.g. (7,) or (16,)) that get self-attention.
  """

  num_classes: int
  ch: int = 32
  ch_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 1
  attn_resolutions: Sequence[int] = ()
  dropout: float = 0.0
  groups: int = 8
  cond_dim: int = 0
  dtype: Dtype = jnp.float32

  def __post_init__(self):
    _check_common(self.num_classes, self.dropout)
    _check_cond_dim(self.cond_dim)
    _check_conv_config(self.ch, self.ch_mult, self.num_res_blocks, self.groups)
    super().__post_init__()

  def _check_attn(self, size: int) -> None:
    levels = [size // 2**i for i in range(len(self.ch_mult))]
    unused = [r for r in self.attn_resolutions if r not in levels]
    if unused:
      raise ConfigError(f"model.attn_resolutions={tuple(self.attn_resolutions)}: {unused} matches no "
                        f"level of this UNet (sizes {levels}); pick sizes from that list or ()")

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, train: bool = False) -> jax.Array:
    _check_image(x, self.ch_mult)
    self._check_attn(x.shape[1])
    emb_dim = 4 * self.ch
    emb = TimeEmbedding(self.ch, emb_dim, self.dtype)(t)
    # Labels: row `num_classes` is the learned null label ∅ that CFG's unconditional pass uses.
    emb = emb + condition_embedding(y, self.num_classes, self.cond_dim, emb_dim, self.dtype)
    h, skips = Encoder(self.ch, self.ch_mult, self.num_res_blocks, self.attn_resolutions,
                       self.dropout, self.groups, self.dtype)(x, emb, train)
    h = ResBlock(h.shape[-1], self.groups, self.dropout, self.dtype)(h, emb, train)
    if h.shape[1] in self.attn_resolutions:
      h = AttnBlock(self.groups, self.dtype)(h)
    h = ResBlock(h.shape[-1], self.groups, self.dropout, self.dtype)(h, emb, train)
    h = Decoder(self.ch, self.ch_mult, self.num_res_blocks, self.attn_resolutions,
                self.dropout, self.groups, self.dtype)(h, skips, emb, train)
    h = nn.silu(group_norm(self.groups, self.dtype)(h))
    # Zero-init output: ε̂ starts at 0, so no steps are spent undoing a random output map.
    out = Conv(x.shape[-1], (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros,
                  name="conv_out")(h)
    return out.astype(jnp.float32)
