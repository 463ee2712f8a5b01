"""In-memory datasets: uint8 images (or float toy points) with labels, and the map from
pixels to the model's [-1, 1] floats.

The host keeps images as uint8 pixels (N, H, W, C) (`Dataset.raw`), a quarter of float32's bytes
to gather and to copy to the device; `model_batch` turns them into float32 in [-1, 1]
(x / 127.5 − 1) inside the jitted step, and `Dataset.image` gives the same floats on the host.
Toy points are float32 (N, 2) throughout.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxguide.errors import ConfigError

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """One split held in memory. The arrays are read-only: loaded splits are cached and shared."""

  raw: np.ndarray    # what the host keeps: uint8 pixels (N, H, W, C), or float32 (N, D) points
  label: np.ndarray  # int32 (N,), in [0, num_classes)
  num_classes: int
  name: str          # the source string

  def __post_init__(self):
    # Views, so that freezing them below leaves the caller's own arrays writeable.
    raw = np.asarray(self.raw)
    raw = (raw if raw.dtype == np.uint8 else raw.astype(np.float32, copy=False)).view()
    label = np.asarray(self.label, np.int32).view()
    if label.ndim != 1 or len(raw) != len(label) or not len(label):
      raise ConfigError(f"data.source={self.name!r}: got {raw.shape} images and {label.shape} "
                        "labels: need the same non-zero number of each")
    if label.min() < 0 or label.max() >= self.num_classes:
      raise ConfigError(f"data.source={self.name!r}: labels span [{label.min()}, {label.max()}], "
                        f"outside [0, {self.num_classes}): fix the labels or num_classes")
    raw.flags.writeable = label.flags.writeable = False
    object.__setattr__(self, "raw", raw)
    object.__setattr__(self, "label", label)

  @functools.cached_property
  def image(self) -> np.ndarray:
    """float32 (N, H, W, C) in [-1, 1] (or the float points), converted once on first use."""
    image = to_unit_range(self.raw)
    image.flags.writeable = False
    return image

  def __len__(self) -> int:
    return len(self.label)

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of one example, e.g. (28, 28, 1) or (2,)."""
    return tuple(self.raw.shape[1:])


def to_unit_range(images: np.ndarray) -> np.ndarray:
  """uint8 pixels 0..255 -> float32 in [-1, 1] (x / 127.5 − 1); float arrays pass unchanged."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    return images.astype(np.float32, copy=False)
  return images.astype(np.float32) / 127.5 - 1.0


# The float of each pixel value, as the host computes it. Under jit the step looks pixels up here:
# XLA turns x / 127.5 into x · fl(1/127.5), which rounds differently for some pixels.
_UNIT_RANGE = to_unit_range(np.arange(256, dtype=np.uint8))


def model_batch(batch: dict[str, Any]) -> dict[str, Any]:
  """A host batch as the networks take it, inside jit: uint8 images become float32 in [-1, 1],
  bit for bit `to_unit_range`'s (a 256-entry table, exact on every backend); float data passes."""
  image = batch["image"]
  if image.dtype == np.uint8:
    image = jnp.asarray(_UNIT_RANGE)[image]
  return {**batch, "image": image}
