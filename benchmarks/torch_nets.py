"""PyTorch eager twins of jaxguide's `UNet` and `NoisyClassifier` (and of `score.VPrediction`, the
v-prediction reading of a UNet that `score.model.param = "v"` asks for), and the Flax → PyTorch
weight port.

Benchmark-only: torch is the optional `bench` extra and nothing in jaxguide/ imports this file.

Every layer mirrors `jaxguide/models/` one for one (GroupNorm ε = 1e-5, SiLU, FiLM scale-shift,
nearest ×2 up-sampling, stride-2 down-sampling with Flax's asymmetric SAME padding, the label
embedding with its null row, single-head attention), and every submodule carries the name Flax
gives it (`Encoder_0.ResBlock_1.Conv_0`; under `net.` in a v-prediction wrapper), so that
`port_params` is a mechanical renaming plus the layout changes below, and
`load_state_dict(strict=True)` proves that no parameter was missed:

  Flax Conv kernel  (H, W, I, O)  →  PyTorch Conv2d weight (O, I, H, W)
  Flax Dense kernel (I, O)        →  PyTorch Linear weight (O, I)
  Flax GroupNorm scale / Embed embedding  →  `weight`, unchanged

The modules compute in NCHW (PyTorch's native layout); `UNet` and `NoisyClassifier` take and
return NCHW tensors. Mixed precision is PyTorch's own: run them under `torch.autocast`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
  """jaxguide.models.sinusoidal_embedding: features of t·1000, (B, dim), always float32."""
  t = t.to(torch.float32).reshape(-1) * 1000.0
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                    / max(half - 1, 1))
  args = t[:, None] * freqs[None, :]
  emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
  return F.pad(emb, (0, dim - 2 * half))


def marginal_coeffs(t: torch.Tensor, beta_min: float, beta_max: float) -> tuple[torch.Tensor, torch.Tensor]:
  """jaxguide.diffusion.sde.VPSDE.marginal_coeffs: (α(t), σ(t)) of the linear-β VP-SDE, float32."""
  t = t.to(torch.float32)
  log_alpha = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
  return torch.exp(log_alpha), torch.sqrt(-torch.expm1(2.0 * log_alpha))


class Conv(nn.Conv2d):
  """Conv2d with Flax's "SAME" padding.

  For stride 1 and an odd kernel SAME is the symmetric k // 2 that Conv2d does itself. For stride 2
  Flax pads the total (ceil(n / s) − 1)·s + k − n with the smaller half first, i.e. (0, 1) on 28 →
  14, which no symmetric `padding=` reproduces: that case pads explicitly.
  """

  def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1):
    self.explicit_pad = stride != 1
    super().__init__(in_ch, out_ch, kernel, stride, padding=0 if self.explicit_pad else kernel // 2)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.explicit_pad:
      pads = []
      for n, k, s in zip(reversed(x.shape[2:]), reversed(self.kernel_size), reversed(self.stride)):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]          # F.pad: last axis first, (lo, hi)
      x = F.pad(x, pads)
    return super().forward(x)


def group_norm(groups: int, channels: int) -> nn.GroupNorm:
  return nn.GroupNorm(groups, channels, eps=1e-5)


class TimeEmbedding(nn.Module):
  """t (B,) -> (B, emb_dim): sinusoidal features, then Dense-SiLU-Dense."""

  def __init__(self, features_dim: int, emb_dim: int):
    super().__init__()
    self.features_dim = features_dim
    self.dense_0 = nn.Linear(features_dim, emb_dim)
    self.dense_1 = nn.Linear(emb_dim, emb_dim)

  def forward(self, t: torch.Tensor) -> torch.Tensor:
    h = sinusoidal_embedding(t, self.features_dim)
    return self.dense_1(F.silu(self.dense_0(h)))


class ResBlock(nn.Module):
  """GN-SiLU-Conv, FiLM h = GN(h)·(1 + s) + b from the embedding, SiLU-Dropout-Conv, plus a skip."""

  def __init__(self, in_ch: int, features: int, emb_dim: int, groups: int, dropout: float):
    super().__init__()
    self.GroupNorm_0 = group_norm(groups, in_ch)
    self.Conv_0 = Conv(in_ch, features, 3)
    self.Dense_0 = nn.Linear(emb_dim, 2 * features)
    self.GroupNorm_1 = group_norm(groups, features)
    self.Conv_1 = Conv(features, features, 3)
    self.dropout = nn.Dropout(dropout)
    self.has_skip = in_ch != features
    if self.has_skip:
      self.skip = Conv(in_ch, features, 1)

  def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    h = self.Conv_0(F.silu(self.GroupNorm_0(x)))
    scale, shift = self.Dense_0(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
    h = self.GroupNorm_1(h) * (1 + scale) + shift
    h = self.Conv_1(self.dropout(F.silu(h)))
    if self.has_skip:
      x = self.skip(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over the H·W positions, residual."""

  def __init__(self, channels: int, groups: int):
    super().__init__()
    self.GroupNorm_0 = group_norm(groups, channels)
    self.qkv = nn.Linear(channels, 3 * channels)
    self.proj = nn.Linear(channels, channels)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, c, hgt, wid = x.shape
    # (B, C, H, W) -> (B, H·W, C): positions in row-major (h, w) order, as Flax's reshape of NHWC.
    h = self.GroupNorm_0(x).reshape(b, c, hgt * wid).transpose(1, 2)
    q, k, v = self.qkv(h).chunk(3, dim=-1)
    # Softmax in float32 as jaxguide does, whatever autocast chose for the products.
    logits = torch.einsum("bqc,bkc->bqk", q, k).float() / math.sqrt(c)
    weights = torch.softmax(logits, dim=-1).to(v.dtype)
    h = self.proj(torch.einsum("bqk,bkc->bqc", weights, v))
    return x + h.transpose(1, 2).reshape(b, c, hgt, wid)


class Upsample(nn.Module):
  """Nearest-neighbour ×2, then a 3x3 convolution."""

  def __init__(self, channels: int):
    super().__init__()
    self.Conv_0 = Conv(channels, channels, 3)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.Conv_0(F.interpolate(x, scale_factor=2, mode="nearest"))


class Encoder(nn.Module):
  """conv_in, then per level ResBlocks (+ attention) and a stride-2 conv except at the last level.

  Flax decides attention from the feature map's height at trace time; eager PyTorch needs it at
  construction, hence `image_size`. `self.out_ch` and `self.skip_ch` tell the decoder what it gets.
  """

  def __init__(self, in_ch: int, image_size: int, ch: int, ch_mult: Sequence[int],
               num_res_blocks: int, attn_resolutions: Sequence[int], dropout: float, groups: int,
               emb_dim: int):
    super().__init__()
    self.conv_in = Conv(in_ch, ch, 3)
    self.plan: list[tuple[str, str]] = []        # (kind, submodule name) in call order
    self.skip_ch = [ch]
    size, cur, n_res, n_attn = image_size, ch, 0, 0
    for level, mult in enumerate(ch_mult):
      for _ in range(num_res_blocks):
        self.add_module(f"ResBlock_{n_res}", ResBlock(cur, ch * mult, emb_dim, groups, dropout))
        self.plan.append(("res", f"ResBlock_{n_res}"))
        cur, n_res = ch * mult, n_res + 1
        if size in attn_resolutions:
          self.add_module(f"AttnBlock_{n_attn}", AttnBlock(cur, groups))
          self.plan.append(("attn", f"AttnBlock_{n_attn}"))
          n_attn += 1
        self.plan.append(("skip", ""))
        self.skip_ch.append(cur)
      if level != len(ch_mult) - 1:
        self.add_module(f"down_{level}", Conv(cur, cur, 3, stride=2))
        self.plan.append(("down", f"down_{level}"))
        self.skip_ch.append(cur)
        size = -(-size // 2)
    self.out_ch, self.out_size = cur, size

  def forward(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    h = self.conv_in(x)
    skips = [h]
    for kind, name in self.plan:
      if kind == "res":
        h = getattr(self, name)(h, emb)
      elif kind == "skip":
        skips.append(h)
      else:                                        # attn, or down: its output is a skip too
        h = getattr(self, name)(h)
        if kind == "down":
          skips.append(h)
    return h, skips


class Decoder(nn.Module):
  """Per level (coarse to fine) num_res_blocks + 1 ResBlocks on [h, skip], ×2 up except at level 0."""

  def __init__(self, in_ch: int, in_size: int, skip_ch: Sequence[int], ch: int,
               ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
               dropout: float, groups: int, emb_dim: int):
    super().__init__()
    skip_ch = list(skip_ch)
    self.plan: list[tuple[str, str]] = []
    size, cur, n_res, n_attn, n_up = in_size, in_ch, 0, 0, 0
    for level in reversed(range(len(ch_mult))):
      for _ in range(num_res_blocks + 1):
        cat = cur + skip_ch.pop()
        self.add_module(f"ResBlock_{n_res}", ResBlock(cat, ch * ch_mult[level], emb_dim, groups, dropout))
        self.plan.append(("res", f"ResBlock_{n_res}"))
        cur, n_res = ch * ch_mult[level], n_res + 1
        if size in attn_resolutions:
          self.add_module(f"AttnBlock_{n_attn}", AttnBlock(cur, groups))
          self.plan.append(("attn", f"AttnBlock_{n_attn}"))
          n_attn += 1
      if level != 0:
        self.add_module(f"Upsample_{n_up}", Upsample(cur))
        self.plan.append(("up", f"Upsample_{n_up}"))
        n_up, size = n_up + 1, size * 2
    self.out_ch = cur

  def forward(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
    skips = list(skips)
    for kind, name in self.plan:
      if kind == "res":
        h = getattr(self, name)(torch.cat([h, skips.pop()], dim=1), emb)
      else:
        h = getattr(self, name)(h)
    return h


class UNet(nn.Module):
  """ε-prediction UNet: forward(x (B,C,H,W), t (B,), y (B,) int) -> ε (B,C,H,W), float32.

  `y == num_classes` is the null label ∅ (the last row of `label_emb`). Arguments as
  `jaxguide.models.UNet`, plus the input's `in_ch` and `image_size` (its height).
  """

  def __init__(self, num_classes: int, in_ch: int = 1, image_size: int = 28, ch: int = 32,
               ch_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1,
               attn_resolutions: Sequence[int] = (), dropout: float = 0.0, groups: int = 8):
    super().__init__()
    emb_dim = 4 * ch
    self.TimeEmbedding_0 = TimeEmbedding(ch, emb_dim)
    self.label_emb = nn.Embedding(num_classes + 1, emb_dim)
    self.Encoder_0 = Encoder(in_ch, image_size, ch, ch_mult, num_res_blocks, attn_resolutions,
                             dropout, groups, emb_dim)
    mid, size = self.Encoder_0.out_ch, self.Encoder_0.out_size
    self.ResBlock_0 = ResBlock(mid, mid, emb_dim, groups, dropout)
    self.mid_attn = size in attn_resolutions
    if self.mid_attn:
      self.AttnBlock_0 = AttnBlock(mid, groups)
    self.ResBlock_1 = ResBlock(mid, mid, emb_dim, groups, dropout)
    self.Decoder_0 = Decoder(mid, size, self.Encoder_0.skip_ch, ch, ch_mult, num_res_blocks,
                             attn_resolutions, dropout, groups, emb_dim)
    self.GroupNorm_0 = group_norm(groups, self.Decoder_0.out_ch)
    self.conv_out = Conv(self.Decoder_0.out_ch, in_ch, 3)

  def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    emb = self.TimeEmbedding_0(t) + self.label_emb(y)
    h, skips = self.Encoder_0(x, emb)
    h = self.ResBlock_0(h, emb)
    if self.mid_attn:
      h = self.AttnBlock_0(h)
    h = self.ResBlock_1(h, emb)
    h = self.Decoder_0(h, skips, emb)
    return self.conv_out(F.silu(self.GroupNorm_0(h))).float()


class VPrediction(nn.Module):
  """jaxguide.diffusion.score.VPrediction: `net`'s output read as v = α ε − σ x₀ and returned as
  ε = α v + σ x (jaxguide.diffusion.score.v_to_eps), α and σ of the VP-SDE with these β's. The wrapped
  network's parameters sit under `net`, as Flax's do."""

  def __init__(self, net: nn.Module, beta_min: float, beta_max: float):
    super().__init__()
    self.net, self.beta_min, self.beta_max = net, beta_min, beta_max

  def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    v = self.net(x, t, y)
    alpha, sigma = (c[:, None, None, None] for c in marginal_coeffs(t, self.beta_min, self.beta_max))
    return alpha * v + sigma * x.to(torch.float32)


class NoisyClassifier(nn.Module):
  """p_t(y | x_t): forward(x (B,C,H,W), t (B,)) -> logits (B, num_classes), float32."""

  def __init__(self, num_classes: int, in_ch: int = 1, image_size: int = 28, ch: int = 32,
               ch_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1, dropout: float = 0.0,
               groups: int = 8):
    super().__init__()
    self.TimeEmbedding_0 = TimeEmbedding(ch, 4 * ch)
    self.Encoder_0 = Encoder(in_ch, image_size, ch, ch_mult, num_res_blocks, (), dropout, groups,
                             4 * ch)
    self.GroupNorm_0 = group_norm(groups, self.Encoder_0.out_ch)
    self.head = nn.Linear(self.Encoder_0.out_ch, num_classes)

  def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    h, _ = self.Encoder_0(x, self.TimeEmbedding_0(t))
    h = F.silu(self.GroupNorm_0(h)).float().mean(dim=(2, 3))
    # jaxguide's head is a float32 Dense whatever the compute dtype: keep it out of autocast.
    with torch.autocast(h.device.type, enabled=False):
      return self.head(h)


_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def port_params(flax_params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
  """A PyTorch state_dict (float32, CPU) from a Flax `params` tree of `UNet`, `NoisyClassifier` or
  `score.VPrediction` (its 'net' subtree becomes `net.`).

  Also ports any tree of the same structure, e.g. gradients, for comparing them with `.grad`.
  """
  state = {}
  for path, value in _flatten(flax_params).items():
    array = np.asarray(value, dtype=np.float32)
    leaf = path[-1]
    if leaf == "kernel" and array.ndim == 4:
      array = array.transpose(3, 2, 0, 1)          # HWIO -> OIHW
    elif leaf == "kernel" and array.ndim == 2:
      array = array.T                              # (in, out) -> Linear's (out, in)
    state[".".join(path[:-1] + (_LEAF_NAMES[leaf],))] = torch.from_numpy(np.array(array, order="C"))
  return state


def load_flax_params(module: nn.Module, flax_params: Mapping[str, Any]) -> nn.Module:
  """Copies Flax parameters into `module` in place; strict, so a missing or extra name raises."""
  module.load_state_dict(port_params(flax_params), strict=True)
  return module
