"""What sample.py does, as library calls: validate a sampling request, sample every label × scale
in one compiled call, write samples.npz, grids, the GIF and the report (each atomically)."""
from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Optional

import jax
import numpy as np

from jaxguide import checkpoint, data, evaluate, pipeline, plotting, samplers
from jaxguide.errors import ConfigError


@dataclasses.dataclass
class Request:
  guidance: str = "cfg"
  scales: Optional[list[float]] = None
  clf_scale: Optional[float] = None
  sampler: Optional[str] = None
  steps: Optional[int] = None
  num_per_class: Optional[int] = None
  labels: Optional[list[int]] = None
  seed: int = 0
  batch_size: int = 1000
  gif: bool = False
  evaluate: bool = False
  options: dict[str, Any] = dataclasses.field(default_factory=dict)


def _numbers(text: Optional[str], field: str, kind=float, example: str = "1,3,5") -> Optional[list]:
  if text is None:
    return None
  try:
    values = [kind(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ConfigError(f"--{field}={text!r}: use a comma list of numbers, e.g. --{field} {example}") from None
  if not values:
    raise ConfigError(f"--{field} is empty: e.g. --{field} {example}")
  if kind is float and not all(np.isfinite(values)):
    raise ConfigError(f"--{field}={text!r}: scales must be finite numbers")
  return values


def request_from_flags(flags_: Any) -> Request:
  """Reads and checks the flags that need no workdir (every error names the flag and the fix)."""
  options: dict[str, Any] = {}
  for name in ("eta", "snr", "clip_x0"):
    if getattr(flags_, name) is not None:
      options[name] = float(getattr(flags_, name))
  if flags_.guide_conditional:
    options["guide_conditional"] = True
  if flags_.rescale:
    if not 0.0 <= flags_.rescale <= 1.0:
      raise ConfigError(f"--rescale={flags_.rescale}: must be in [0, 1], e.g. 0.7")
    options["rescale"] = float(flags_.rescale)
  interval = _numbers(flags_.interval, "interval", example="0.1,0.9")
  if interval is not None:
    if len(interval) != 2 or not 0.0 <= interval[0] < interval[1] <= 1.0:
      raise ConfigError(f"--interval={flags_.interval!r}: give 'lo,hi' with 0 <= lo < hi <= 1")
    options["interval"] = tuple(interval)
  if flags_.sampler is not None and flags_.sampler not in samplers.SAMPLERS:
    raise ConfigError(f"--sampler={flags_.sampler!r} is not known: use one of {', '.join(samplers.SAMPLERS)}")
  for name in ("steps", "num_per_class", "batch_size"):
    value = getattr(flags_, name)
    if value is not None and value < 1:
      raise ConfigError(f"--{name}={value}: must be a positive integer")
  return Request(guidance=flags_.guidance, scales=_numbers(flags_.scale, "scale"),
                 clf_scale=flags_.clf_scale, sampler=flags_.sampler, steps=flags_.steps,
                 num_per_class=flags_.num_per_class, labels=_numbers(flags_.labels, "labels", int, "0,3,7"),
                 seed=flags_.seed, batch_size=flags_.batch_size, gif=flags_.gif,
                 evaluate=flags_.evaluate, options=options)


def complete_request(req: Request, run: pipeline.Run) -> Request:
  """Fills what the flags left open from the workdir's config.sample, and checks the rest."""
  cfg = run.config.sample
  default_scale = cfg.clf_scale if req.guidance == "classifier" else cfg.cfg_scale
  req = dataclasses.replace(
      req, scales=req.scales or [float(default_scale)],
      clf_scale=float(cfg.clf_scale) if req.clf_scale is None else req.clf_scale,
      sampler=req.sampler or cfg.sampler, steps=req.steps or int(cfg.steps),
      num_per_class=req.num_per_class or int(cfg.num_per_class),
      labels=req.labels if req.labels is not None else list(range(run.num_classes)))
  pipeline.check_request(run, req.guidance, np.asarray(req.labels))
  if req.evaluate and "evaluator" not in run.params and run.config.data.source != "toy:gmm":
    raise ConfigError(f"--evaluate needs a trained evaluator in --workdir={run.workdir}: train it with "
                      f"python train.py --workdir {run.workdir} --config.models=evaluator (same --config)")
  if req.options.get("eta") is not None and req.sampler != "ddim":
    raise ConfigError(f"--eta is an option of --sampler ddim, not {req.sampler}: drop it or use ddim")
  if req.options.get("snr") is not None and req.sampler != "pc":
    raise ConfigError(f"--snr is an option of --sampler pc, not {req.sampler}: drop it or use pc")
  return req


def prepare_out(out: str) -> str:
  """Creates the output folder (after every check has passed)."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise ConfigError(f"--out={out} is a file: choose a folder path")
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--out={out}: cannot create it ({e.strerror}): choose a writable folder") from None
  return out


def save_npz(path: str, **arrays: np.ndarray) -> None:
  """np.savez through a temporary file and a rename."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  with checkpoint.atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(buffer.getvalue())


def _judge(run: pipeline.Run, images: np.ndarray) -> np.ndarray:
  """Predicted classes of samples: the trained evaluator for images, the exact mixture posterior
  (at t ≈ 0) for the toy data (complete_request has checked that one of them exists)."""
  if "evaluator" in run.params:
    return evaluate.classify(run.apply_fns["evaluator"], run.params["evaluator"], images)
  mixture = data.toy_mixture()
  t = np.full((len(images),), 1e-4, np.float32)
  return np.asarray(np.argmax(mixture.log_prob_y(run.sde, images, t), -1))


def _write_figures(run, req: Request, x0: np.ndarray, traj, out: str) -> list[str]:
  n_lab, n_per = len(req.labels), req.num_per_class
  files = []
  for i, scale in enumerate(req.scales):
    block = x0[i * n_lab * n_per:(i + 1) * n_lab * n_per]
    title = f"{req.guidance} scale {scale:g}, {req.sampler} {req.steps} steps"
    if len(run.shape) == 3:
      path = os.path.join(out, f"grid_{req.guidance}_s{scale:g}.png")
      plotting.save_grid(block.reshape((n_lab, n_per) + run.shape), path,
                         row_labels=[str(l) for l in req.labels], title=title)
    else:
      path = os.path.join(out, f"points_{req.guidance}_s{scale:g}.png")
      plotting.save_points(block, np.repeat(req.labels, n_per), path, title=title)
    files.append(path)
  if traj is not None and len(run.shape) == 3:
    frames = traj[:, :n_lab * n_per].reshape((traj.shape[0], n_lab, n_per) + run.shape)
    path = os.path.join(out, f"denoise_{req.guidance}_s{req.scales[0]:g}.gif")
    plotting.save_gif(frames, path)
    files.append(path)
  return files


def accuracy_report(req: Request, labels: np.ndarray, scales: np.ndarray, pred: np.ndarray) -> list[dict]:
  rows = []
  for scale in req.scales:
    sel = scales == np.float32(scale)
    per_class = {int(c): float(np.mean(pred[sel & (labels == c)] == c)) for c in req.labels}
    worst = min(per_class, key=per_class.get)
    rows.append({"guidance": req.guidance, "scale": scale,
                 "accuracy": float(np.mean(pred[sel] == labels[sel])),
                 "worst_class": worst, "worst_class_accuracy": per_class[worst], "per_class": per_class})
  return rows


def sample_and_write(run: pipeline.Run, req: Request, out: str) -> dict[str, Any]:
  labels = np.tile(np.repeat(np.asarray(req.labels, np.int32), req.num_per_class), len(req.scales))
  scales = np.repeat(np.asarray(req.scales, np.float32), len(req.labels) * req.num_per_class)
  timings: dict[str, float] = {}
  result = pipeline.generate(run, jax.random.PRNGKey(req.seed), labels, scales, kind=req.guidance,
                             sampler=req.sampler, steps=req.steps, clf_scale=req.clf_scale,
                             batch_size=req.batch_size, return_trajectory=req.gif,
                             save_every=max(req.steps // 20, 1), timings=timings, **req.options)
  x0, traj = result if req.gif else (result, None)
  save_npz(os.path.join(out, "samples.npz"), image=x0.astype(np.float32), label=labels, scale=scales)
  files = [os.path.join(out, "samples.npz")] + _write_figures(run, req, x0, traj, out)
  summary: dict[str, Any] = {"samples": int(len(x0)), **timings, "files": files,
                             "request": dataclasses.asdict(req)}
  if req.evaluate:
    pred = _judge(run, x0)
    summary["report"] = accuracy_report(req, labels, scales, pred)
    write_report(out, summary)
  return summary


def write_report(out: str, summary: dict[str, Any]) -> None:
  checkpoint.atomic_write_text(os.path.join(out, "report.json"), json.dumps(summary, indent=2))
  lines = ["| guidance | scale | accuracy | worst class (accuracy) |", "|---|---|---|---|"]
  for r in summary["report"]:
    lines.append(f"| {r['guidance']} | {r['scale']:g} | {r['accuracy']:.3f} | "
                 f"{r['worst_class']} ({r['worst_class_accuracy']:.2f}) |")
  checkpoint.atomic_write_text(os.path.join(out, "report.md"), "\n".join(lines) + "\n")


def final_grids(workdir: str) -> dict[str, Any]:
  """train.py's last act: a CFG grid and, when a classifier was trained, a classifier-guidance
  grid at the config's scales, judged by the evaluator when there is one."""
  run = pipeline.load_run(workdir)
  out = prepare_out(os.path.join(workdir, "samples"))
  kinds = ["cfg"] + (["classifier"] if "classifier" in run.params else [])
  judge = "evaluator" in run.params or run.config.data.source == "toy:gmm"
  results = {}
  for kind in kinds:
    req = complete_request(Request(guidance=kind, evaluate=judge), run)
    summary = sample_and_write(run, req, prepare_out(os.path.join(out, kind)))
    results[kind] = {"files": summary["files"], "compile_s": summary["compile_s"],
                     "sample_s": summary["sample_s"],
                     **({"accuracy": summary["report"][0]["accuracy"]} if judge else {})}
  return results
