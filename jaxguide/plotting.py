"""Figures: image grids (classes as rows), the denoising GIF, 2-D scatter plots. The only module
that imports matplotlib; every file is written through a temporary name and a rename."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image

from jaxguide.checkpoint import atomic_path


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8, clipped."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def tile(images: np.ndarray, pad: int = 2) -> np.ndarray:
  """(rows, cols, H, W, C) in [-1, 1] -> one uint8 image (rows·(H+pad), cols·(W+pad), C)."""
  rows, cols, h, w, c = images.shape
  canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  pixels = to_uint8(images)
  for r in range(rows):
    for k in range(cols):
      y0, x0 = pad + r * (h + pad), pad + k * (w + pad)
      canvas[y0:y0 + h, x0:x0 + w] = pixels[r, k]
  return canvas


def _pil(canvas: np.ndarray, upscale: int) -> Image.Image:
  img = Image.fromarray(canvas[..., 0] if canvas.shape[-1] == 1 else canvas)
  return img.resize((img.width * upscale, img.height * upscale), Image.NEAREST) if upscale > 1 else img


def save_grid(images: np.ndarray, path: str, *, row_labels: Optional[Sequence[str]] = None,
              title: str = "", upscale: int = 2) -> None:
  """Saves (rows, cols, H, W, C) images as a PNG grid; rows are classes, labelled on the left."""
  canvas = tile(images)
  if row_labels is None and not title:
    with atomic_path(path) as tmp:
      _pil(canvas, upscale).save(tmp, format="PNG")
  else:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, _, h, _, _ = images.shape
    fig, ax = plt.subplots(figsize=(canvas.shape[1] / 40 + 0.6, canvas.shape[0] / 40 + 0.5), dpi=100)
    ax.imshow(canvas.squeeze(-1) if canvas.shape[-1] == 1 else canvas, cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([2 + r * (h + 2) + h / 2 for r in range(rows)])
    ax.set_yticklabels(list(row_labels) if row_labels is not None else [""] * rows)
    ax.set_title(title, fontsize=9)
    with atomic_path(path) as tmp:
      fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)


def save_gif(frames: np.ndarray, path: str, *, duration_ms: int = 100, hold_last: int = 10,
             upscale: int = 2) -> None:
  """Saves a denoising trajectory (T, rows, cols, H, W, C) as a looping GIF, the last frame held."""
  images = [_pil(tile(f), upscale) for f in frames]
  images += [images[-1]] * hold_last
  with atomic_path(path) as tmp:
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms,
                   loop=0)


def save_points(points: np.ndarray, labels: np.ndarray, path: str, *, title: str = "",
                density: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = None) -> None:
  """2-D samples coloured by requested label, optionally over density contours (X, Y, Z)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
  if density is not None:
    ax.contour(*density, levels=12, colors="0.6", linewidths=0.6)
  ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=3, vmin=0, vmax=9)
  ax.set_aspect("equal")
  ax.set_title(title, fontsize=9)
  with atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", bbox_inches="tight")
  plt.close(fig)


def save_sweep(rows: Sequence[dict], path: str, *, floor: Optional[float] = None,
               ceiling: Optional[float] = None, chance: Optional[float] = None,
               title: str = "") -> None:
  """A scale sweep in two panels, one line per guidance kind: accuracy, and Fréchet distance with
  its floor and ceiling, against the scale. `rows` are dicts with guidance, scale, accuracy and
  frechet_distance (None is left out). CFG's s spans ~0-10 and the classifier's w ~0-100, so the
  scale axis is symlog (linear below 1, logarithmic above) and the distance axis logarithmic."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  fig, (ax_acc, ax_fd) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
  for kind in dict.fromkeys(r["guidance"] for r in rows):
    mine = sorted((r for r in rows if r["guidance"] == kind), key=lambda r: r["scale"])
    scales = [r["scale"] for r in mine]
    ax_acc.plot(scales, [r["accuracy"] for r in mine], marker="o", label=kind)
    fd = [np.nan if r["frechet_distance"] is None else r["frechet_distance"] for r in mine]
    ax_fd.plot(scales, fd, marker="o", label=kind)
  if chance is not None:
    ax_acc.axhline(chance, ls=":", color="0.5", label="chance")
  if floor is not None:
    ax_fd.axhline(floor, ls="--", color="tab:green", label="floor: train vs test")
  if ceiling is not None:
    ax_fd.axhline(ceiling, ls="--", color="tab:red", label="ceiling: noise vs test")
  ax_acc.set(ylim=(0.0, 1.02), ylabel="accuracy of requested label")
  ax_fd.set(yscale="log", ylabel="Fréchet distance")
  for ax in (ax_acc, ax_fd):
    ax.set_xscale("symlog", linthresh=1.0)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("guidance scale (cfg: s, classifier: w; symlog)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  with atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", bbox_inches="tight")
  plt.close(fig)
