"""Building blocks of the networks (flax.linen): time embeddings, GroupNorm, residual and
attention blocks, upsampling, and the argument checks the networks share.

Conventions of every network in `jaxguide.models`:
  * images are NHWC, 2-D toy data is (B, D); time t is a float (B,) in [0, 1] and labels y are
    int32 (B,); the label `num_classes` is the null label of classifier-free guidance;
  * `dtype` is the compute dtype (bfloat16 for mixed precision); parameters stay float32 and every
    network returns float32. The input and the first layer that reads it stay float32: bfloat16's
    spacing near |x| = 1 is about σ(t_eps), so a bfloat16 input would hide the noise to predict;
  * no BatchNorm, so a model's variables are {'params'} only; dropout draws from the 'dropout' rng
    when `train=True`.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxguide import cpu
from jaxguide.errors import ConfigError

# Every convolution here: flax's, with jaxguide.cpu's input-gradient rule on the CPU.
Conv = functools.partial(nn.Conv, conv_general_dilated=cpu.conv_general_dilated)


Dtype = Any


def count_params(params: Any) -> int:
  """Total number of scalars in a parameter pytree."""
  return int(sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def sinusoidal_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """DDPM/score_sde sinusoidal features of t·1000, shape (B, dim), always float32.

  The factor 1000 puts continuous time on the scale of DDPM's integer steps, which the
  frequencies were designed for; float32 because bfloat16 cannot resolve t·1000 to one step.
  """
  t = jnp.asarray(t, jnp.float32).reshape(-1) * 1000.0
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  args = t[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim - 2 * half)))   # odd dim: one zero column


class TimeEmbedding(nn.Module):
  """t (B,) -> (B, emb_dim): sinusoidal features of width `features_dim`, then Dense-SiLU-Dense."""

  features_dim: int
  emb_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    h = sinusoidal_embedding(t, self.features_dim)
    h = nn.Dense(self.emb_dim, dtype=self.dtype, name="dense_0")(h)
    return nn.Dense(self.emb_dim, dtype=self.dtype, name="dense_1")(nn.silu(h))


def _group_expansion(channels: int, groups: int) -> jax.Array:
  """(groups, channels) 0/1 matrix: row g marks the channels of group g."""
  group_of = jnp.arange(channels) // (channels // groups)
  return (group_of[None, :] == jnp.arange(groups)[:, None]).astype(jnp.float32)


class GroupNorm(nn.Module):
  """GroupNorm over channels-last input (B, ..., C), ε = 1e-5: flax's `nn.GroupNorm` computation
  (statistics in float32, E[x²] − E[x]², parameters `scale` and `bias`), output in `dtype`.

  impl "dots" (on the CPU, `jaxguide.cpu.group_norm_impl`) writes the statistics as matrix
  products, which XLA:CPU runs faster than the reductions (docs/benchmarks.md, "GroupNorm
  statistics as dots"); "reduce" is the plain form every other backend gets. Both give flax's
  values to float32 rounding (tests/nets_test.py) and have the same parameters.
  """

  num_groups: int
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  impl: str = "auto"   # "dots" | "reduce" | "auto": jaxguide.cpu decides

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, g = x.shape[-1], self.num_groups
    impl = cpu.group_norm_impl() if self.impl == "auto" else self.impl
    if impl not in ("dots", "reduce"):
      raise ConfigError(f"GroupNorm impl={self.impl!r}: use 'auto', 'dots' or 'reduce'")
    if c % g:
      raise ConfigError(f"GroupNorm: {c} channels are not divisible by num_groups={g}")
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    axes = tuple(range(1, x.ndim - 1))
    count = math.prod(x.shape[1:-1]) * (c // g)
    if impl == "dots":
      expand = _group_expansion(c, g)
      flat = xf.reshape(x.shape[0], -1, c)                                       # (B, P, C)
      # Channel sums as a batched (1, P) @ (P, C) product: no operand transpose (a `bpc,p->bc`
      # einsum transposes x first), and faster than XLA:CPU's column reduction.
      ones = jnp.ones((x.shape[0], 1, flat.shape[1]), jnp.float32)
      channel_sum = lambda v: jnp.matmul(ones, v)[:, 0]                            # (B, C)
      mean = (channel_sum(flat) @ expand.T) / count                              # (B, G)
      mean_sq = (channel_sum(flat * flat) @ expand.T) / count
      inv = lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0.0) + self.epsilon)
      mean_c, inv_c = jnp.einsum("bkg,gc->kbc", jnp.stack([mean, inv], 1), expand)  # (B, C) each
    else:
      grouped = xf.reshape(x.shape[:-1] + (g, c // g))
      over = axes + (x.ndim,)
      mean = jnp.mean(grouped, over)
      inv = lax.rsqrt(jnp.maximum(jnp.mean(grouped * grouped, over) - mean * mean, 0.0) + self.epsilon)
      mean_c, inv_c = jnp.repeat(mean, c // g, axis=-1), jnp.repeat(inv, c // g, axis=-1)
    mul = inv_c * scale
    add = bias - mean_c * mul
    spatial = lambda v: v.reshape(v.shape[:1] + (1,) * len(axes) + v.shape[1:])
    return (xf * spatial(mul) + spatial(add)).astype(self.dtype)


def group_norm(num_groups: int, dtype: Dtype = jnp.float32) -> GroupNorm:
  """GroupNorm (ε = 1e-5) with float32 statistics and parameters, output in `dtype`."""
  return GroupNorm(num_groups=num_groups, dtype=dtype)


class ResBlock(nn.Module):
  """GN-SiLU-Conv, FiLM by the embedding (scale-shift), GN-SiLU-Dropout-Conv, plus a skip.

  The embedding modulates the second normalisation, h = GN(h)·(1 + s) + b (improved DDPM's
  `use_scale_shift_norm`), which conditions more strongly than adding a bias alone.
  """

  features: int
  groups: int = 8
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
    h = nn.silu(group_norm(self.groups, self.dtype)(x))
    h = Conv(self.features, (3, 3), dtype=self.dtype)(h)
    scale_shift = nn.Dense(2 * self.features, dtype=self.dtype)(nn.silu(emb))
    scale, shift = jnp.split(scale_shift[:, None, None, :], 2, axis=-1)
    h = group_norm(self.groups, self.dtype)(h) * (1 + scale) + shift
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = Conv(self.features, (3, 3), dtype=self.dtype)(h)
    if x.shape[-1] != self.features:
      x = Conv(self.features, (1, 1), dtype=self.dtype, name="skip")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over the H·W positions, residual. The output projection is
  zero-initialised so that the block starts as the identity."""

  groups: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    h = group_norm(self.groups, self.dtype)(x).reshape(b, hgt * wid, c)
    q, k, v = jnp.split(nn.Dense(3 * c, dtype=self.dtype, name="qkv")(h), 3, axis=-1)
    # Logits accumulated and kept in float32 whatever the compute dtype (softmax of bf16 logits
    # loses the small differences attention is made of).
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    h = jnp.einsum("bqk,bkc->bqc", weights, v)
    h = nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="proj")(h)
    return x + h.reshape(x.shape)


class Upsample(nn.Module):
  """Doubles H and W: nearest-neighbour ×2, then a 3x3 convolution (no checkerboard artefacts)."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return Conv(self.features, (3, 3), dtype=self.dtype)(x)


def _check_common(num_classes: int, dropout: float) -> None:
  if num_classes < 1:
    raise ConfigError(f"num_classes={num_classes}: need at least 1 class (set data.num_classes)")
  if not 0.0 <= dropout < 1.0:
    raise ConfigError(f"model.dropout={dropout} is outside [0, 1): use e.g. 0.1 or 0.0")


def _check_cond_dim(cond_dim: int) -> None:
  if not isinstance(cond_dim, int) or cond_dim < 0:
    raise ConfigError(f"model.cond_dim={cond_dim!r}: must be 0 (integer labels) or the size D of "
                      "the condition vectors (B, D), e.g. 384 for all-MiniLM-L6-v2 prompts")


def _check_conv_config(ch: int, ch_mult: Sequence[int], num_res_blocks: int, groups: int) -> None:
  """Raises ConfigError for hyper-parameters no image could satisfy."""
  if groups < 1 or ch < 1 or ch % groups:
    raise ConfigError(f"model.ch={ch} is not divisible by model.groups={groups}: "
                      f"use a multiple of {max(groups, 1)}")
  if not ch_mult or any(int(m) < 1 for m in ch_mult):
    raise ConfigError(f"model.ch_mult={tuple(ch_mult)} must be a non-empty tuple of positive "
                      "integers, e.g. (1, 2, 2)")
  if num_res_blocks < 1:
    raise ConfigError(f"model.num_res_blocks={num_res_blocks}: need at least 1 (e.g. 1 or 2)")


def _check_image(x: jax.Array, ch_mult: Sequence[int]) -> None:
  """The encoder halves H and W len(ch_mult) - 1 times and the decoder doubles them back."""
  if x.ndim != 4:
    raise ConfigError(f"image input has shape {x.shape}: expected NHWC (batch, height, width, channels)")
  factor = 2 ** (len(ch_mult) - 1)
  if x.shape[1] % factor or x.shape[2] % factor:
    raise ConfigError(
        f"image size {x.shape[1]}x{x.shape[2]} is not divisible by 2**(len(model.ch_mult)-1)={factor}: "
        f"use fewer levels in model.ch_mult={tuple(ch_mult)} or pad the images to a multiple of {factor}")
