"""Networks (flax.linen): the ε-prediction UNet and MLP, the noisy classifiers, the LeNet evaluator.

Conventions shared by every module here:
  * images are NHWC, 2-D toy data is (B, D); time t is a float (B,) in [0, 1] (VP-SDE time) and
    labels y are int32 (B,); the label `num_classes` is the null label of classifier-free guidance;
  * `dtype` is the compute dtype (bfloat16 for mixed precision), parameters stay float32 and every
    network returns float32; the input and the first layer that reads it are float32 whatever
    `dtype` says: bfloat16's spacing near |x| = 1 (0.004-0.008) is about σ(t_eps) = 0.004, so a
    bfloat16 input would hide the noise the network must predict at small t;
  * no BatchNorm, so a model's variables are {'params'} only; dropout draws from the 'dropout' rng
    when `train=True`.
Networks only: losses live in `losses.py`, sampling in `samplers.py`.
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
  products, which XLA:CPU runs 25-35 % faster in the guided sampling step (docs/benchmarks.md,
  "GroupNorm on XLA:CPU"); "reduce" is the plain form every other backend gets. Both give flax's
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
      # Channel sums as a batched (1, P) @ (P, C) product: no operand transpose, and 2-4x
      # faster than XLA:CPU's column reduction (a `bpc,p->bc` einsum transposes x first).
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
    # Zero-init output: ε̂ starts at 0 and no steps are spent undoing a random output map; on
    # MNIST (ch=16) it reached a lower ε-loss than LeCun init after 100-400 steps.
    out = Conv(x.shape[-1], (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros,
                  name="conv_out")(h)
    return out.astype(jnp.float32)


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
