"""Figures: image grids (classes as rows), the denoising GIF, 2-D scatter plots. The only module
that imports matplotlib; every file is written through a temporary name and a rename."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image

from jaxguide.training.checkpoint import atomic_path


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
  lo, hi = min(r["scale"] for r in rows), max(r["scale"] for r in rows)
  for ax in (ax_acc, ax_fd):
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(lo - 0.3, hi + 0.3 + 0.2 * max(hi, 0.0))   # margins that keep end points inside
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("guidance scale (cfg: s, classifier: w; symlog)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  with atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", bbox_inches="tight")
  plt.close(fig)


def save_quality_curve(points: Sequence[dict], path: str, *, baseline: Optional[dict] = None,
                       title: str = "", fd_targets: Sequence[float] = ()) -> None:
  """Quality against compute, one point per run: `points` (and the optional `baseline`, drawn
  apart) are dicts with minutes, acc_s1 (the conditional network alone), best_acc (the best
  guided scale) and fd_ratio (Fréchet distance ÷ its floor at that scale), optionally
  fd_ratio_98 (the ratio at the lowest scale reaching 98 %); `fd_targets` are FD ratios drawn
  as dashed lines."""
  plt = pyplot()
  fig, (ax_acc, ax_fd) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
  pts = sorted(points, key=lambda p: p["minutes"])
  mins = [p["minutes"] for p in pts]
  ax_acc.plot(mins, [p["acc_s1"] for p in pts], marker="o", label="s = 1 (no guidance)")
  ax_acc.plot(mins, [p["best_acc"] for p in pts], marker="s", label="best CFG scale")
  ax_fd.plot(mins, [p["fd_ratio"] for p in pts], marker="s", label="at the best CFG scale")
  at_98 = [(p["minutes"], p["fd_ratio_98"]) for p in pts if p.get("fd_ratio_98") is not None]
  if at_98:
    ax_fd.plot(*zip(*at_98), marker="^", label="at the lowest CFG scale with ≥ 98 %")
  if baseline is not None:
    ax_acc.plot([baseline["minutes"]] * 2, [baseline["acc_s1"], baseline["best_acc"]], "x",
                color="0.3", ms=9, label="previous recipe (s = 1, best)")
    ax_fd.plot([baseline["minutes"]], [baseline["fd_ratio"]], "x", color="0.3", ms=9,
               label="previous recipe")
  for target in fd_targets:
    ax_fd.axhline(target, color="0.5", ls="--", lw=0.8)
    ax_fd.annotate(f"{target:g}×", (1.0, target), xycoords=("axes fraction", "data"), fontsize=7,
                   color="0.4", ha="right", va="bottom")
  ax_acc.set(ylim=(0.0, 1.02), ylabel="accuracy of requested label", xlabel="minutes (train.py wall)")
  ax_fd.set(yscale="log", ylabel="Fréchet distance ÷ floor", xlabel="minutes (train.py wall)")
  from matplotlib.ticker import FuncFormatter
  ax_fd.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
  ax_fd.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}×" if round(v) in (2, 3, 5) else ""))
  for ax in (ax_acc, ax_fd):
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  save_figure(fig, path)


def save_frontier(rows: Sequence[dict], path: str, *, floor: float, title: str = "") -> None:
  """Fidelity against accuracy, one line per guidance kind through its scales: each row a dict
  with guidance, scale, accuracy and frechet_distance (evaluate.measure's rows)."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
  for kind in dict.fromkeys(r["guidance"] for r in rows):
    mine = sorted((r for r in rows if r["guidance"] == kind), key=lambda r: r["scale"])
    acc = [r["accuracy"] for r in mine]
    fd = [r["frechet_distance"] / floor for r in mine]
    ax.plot(acc, fd, marker="o", label=kind)
    for r, a, f in zip(mine, acc, fd):
      ax.annotate(f"{r['scale']:g}", (a, f), fontsize=7, xytext=(3, 3), textcoords="offset points")
  ax.set(yscale="log", xlabel="accuracy of the requested label", ylabel="Fréchet distance ÷ floor")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  ax.set_title(title, fontsize=10)
  save_figure(fig, path)


# ------------------------------------------------------------- diagnostics (diagnose.py's figures)

_PER_ROW = 8   # panels per row in the across-t figures: 16 times read as two rows of eight


def pyplot():
  """matplotlib.pyplot on the Agg backend (files only, no display)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save_figure(fig, path: str) -> None:
  """Writes `fig` as a PNG at `path` (through a temporary name) and closes it."""
  with atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", bbox_inches="tight")
  pyplot().close(fig)


def show_image(ax, image: np.ndarray) -> None:
  """One (H, W, C) image in [-1, 1], clipped (noised images leave that range), no ticks."""
  img = np.clip((np.asarray(image, np.float32) + 1.0) / 2.0, 0.0, 1.0)
  ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
  ax.set_xticks([])
  ax.set_yticks([])


def _pairs_of_rows(n: int, row_height: float, ratio: float):
  """A figure of n panel pairs (an image above a second plot), _PER_ROW pairs to a row.
  Returns (fig, [(top axis, bottom axis)] for the n pairs); unused slots are hidden."""
  cols = min(n, _PER_ROW)
  blocks = -(-n // cols)
  fig, axes = pyplot().subplots(2 * blocks, cols, figsize=(1.35 * cols, row_height * blocks),
                                 squeeze=False, layout="constrained",
                                 gridspec_kw={"height_ratios": [1, ratio] * blocks})
  pairs = [(axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols])
           for i in range(blocks * cols)]
  for top, bottom in pairs[n:]:
    top.axis("off")
    bottom.axis("off")
  return fig, pairs[:n]


def _time_label(t: float) -> str:
  return f"t = {t:.3f}" if t < 0.1 else f"t = {t:.2f}"   # t_eps = 0.001 must not read as 0


def save_confidence_vs_t(noised: np.ndarray, probs: np.ndarray, times: np.ndarray, label: int,
                         path: str, *, class_names: Optional[Sequence[str]] = None,
                         title: str = "") -> None:
  """Noised images (T, H, W, C), each above a bar chart of p_t(y | x_t) (T, K); true class in red."""
  k = probs.shape[-1]
  names = list(class_names) if class_names is not None else [str(c) for c in range(k)]
  colours = ["tab:red" if c == label else "0.6" for c in range(k)]
  fig, pairs = _pairs_of_rows(len(times), 2.7, 0.8)
  for i, (top, bottom) in enumerate(pairs):
    show_image(top, noised[i])
    top.set_title(_time_label(times[i]), fontsize=8)
    bottom.bar(range(k), probs[i], color=colours)
    bottom.set_ylim(0, 1)
    bottom.set_xticks(range(k))
    bottom.set_xticklabels(names, fontsize=6)
    bottom.tick_params(axis="y", labelsize=6)
    if i % _PER_ROW:
      bottom.set_yticklabels([])
  fig.suptitle(title or rf"noisy classifier $p_t(y\,|\,x_t)$; true class {names[label]} in red",
               fontsize=10)
  save_figure(fig, path)


def save_gradients(noised: np.ndarray, grads: np.ndarray, times: np.ndarray, label: int, path: str,
                   *, title: str = "") -> None:
  """Noised images (T, H, W, C) above ∇ₓ log p_t(label | x_t) (T, H, W, C), channels summed.

  Each gradient panel has its own symmetric colour range (its max |value|, printed under it):
  the magnitude grows by orders of magnitude as t → 0, so one shared range would blank most panels.
  """
  fig, pairs = _pairs_of_rows(len(times), 2.9, 1.0)
  for i, (top, bottom) in enumerate(pairs):
    show_image(top, noised[i])
    top.set_title(_time_label(times[i]), fontsize=8)
    g = np.asarray(grads[i], np.float32).sum(axis=-1)
    m = float(np.max(np.abs(g))) or 1.0
    bottom.imshow(g, cmap="RdBu_r", vmin=-m, vmax=m)
    bottom.set_xticks([])
    bottom.set_yticks([])
    bottom.set_xlabel(f"max {m:.2g}", fontsize=7)
  fig.suptitle(title or rf"$\nabla_x \log p_t(y={label}\,|\,x_t)$ (red +, blue −)", fontsize=10)
  save_figure(fig, path)


def _class_colours(k: int) -> np.ndarray:
  return np.asarray(pyplot().get_cmap("tab10")(np.arange(k) % 10))[:, :3]


def save_posterior_maps(axis: np.ndarray, learned: np.ndarray, exact: np.ndarray, times: np.ndarray,
                        path: str, *, col_titles: Optional[Sequence[str]] = None,
                        marks: Optional[np.ndarray] = None, title: str = "") -> None:
  """2-D class posteriors (T, R, R, K) as class colours mixed by probability: the classifier's
  row above the exact row, one column per time. `marks` (T, 2) puts a star at one point per time."""
  colours = _class_colours(learned.shape[-1])
  extent = (axis[0], axis[-1], axis[0], axis[-1])
  plt = pyplot()
  fig, axes = plt.subplots(2, len(times), figsize=(2.6 * len(times), 5.4), squeeze=False)
  for row, (name, probs) in enumerate((("classifier", learned), ("exact", exact))):
    for i, ax in enumerate(axes[row]):
      ax.imshow(np.clip(probs[i] @ colours, 0, 1), origin="lower", extent=extent)
      if marks is not None:
        ax.plot(*marks[i], marker="*", color="k", markersize=10, markeredgecolor="w")
      ax.set_xticks([])
      ax.set_yticks([])
      if row == 0:
        ax.set_title(col_titles[i] if col_titles else _time_label(times[i]), fontsize=8)
    axes[row, 0].set_ylabel(name, fontsize=9)
  fig.suptitle(title or r"$p_t(y\,|\,x)$: class colours mixed by probability", fontsize=10)
  save_figure(fig, path)


def save_point_panels(rows: Sequence[Sequence[tuple[np.ndarray, str]]], labels: np.ndarray, path: str,
                      *, density: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = None,
                      row_labels: Optional[Sequence[str]] = None, title: str = "") -> None:
  """Panels of 2-D samples (N, 2) coloured by `labels` (N,), each over optional density contours
  (X, Y, Z); `rows` lists (points, panel title) per row, e.g. one row per guidance kind."""
  cols = max(len(r) for r in rows)
  fig, axes = pyplot().subplots(len(rows), cols, figsize=(2.8 * cols, 2.9 * len(rows)),
                                 squeeze=False, sharex=True, sharey=True)
  for r, row in enumerate(rows):
    for c, ax in enumerate(axes[r]):
      if c >= len(row):
        ax.axis("off")
        continue
      if density is not None:
        ax.contour(*density, levels=8, colors="0.6", linewidths=0.6)
      ax.scatter(row[c][0][:, 0], row[c][0][:, 1], c=labels, cmap="tab10", s=2, vmin=0, vmax=9)
      ax.set_aspect("equal")
      ax.set_title(row[c][1], fontsize=8)
    if row_labels is not None:
      axes[r, 0].set_ylabel(row_labels[r], fontsize=9)
  fig.suptitle(title, fontsize=10)
  save_figure(fig, path)
