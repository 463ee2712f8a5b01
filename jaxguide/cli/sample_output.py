"""sample.py's outputs: sample a checked request, write samples.npz, the grids (or 2-D
scatters), the GIF and, with --evaluate, report.json, report.md and sweep.png, each atomically;
train.py's final grids. With several processes every process samples, process 0 writes.

Image samples are written clipped to [−1, 1] unless `Request.raw` (sample.py --raw); toy points
never are.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import numpy as np
from etils import epath

from jaxguide import parallel, pipeline
from jaxguide.cli.sample_request import (
  Request,
  _complete_prompts,
  complete_request,
  prompt_class,
  report_request,
)
from jaxguide.errors import ConfigError
from jaxguide.evaluation import judge as evaluate
from jaxguide.evaluation import plotting
from jaxguide.training import checkpoint


def prepare_out(out: str) -> str:
  """Creates the output folder (after every check has passed). With several processes process 0
  creates it and tells the others whether it could: all refuse alike, or none does."""
  folder = epath.Path(out)
  if folder.exists() and not folder.is_dir():
    raise ConfigError(f"--out={out} is a file: choose a folder path")
  error = None
  if parallel.is_primary():
    try:
      folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      error = e.strerror
  if not parallel.agree(error is None):
    raise ConfigError(f"--out={out}: cannot create it ({error or 'on process 0'}): choose a "
                      "writable folder")
  return out


save_npz = checkpoint.atomic_write_npz   # np.savez through a temporary file and a rename


def _row_labels(req: Request) -> list[str]:
  """What each grid row (and report) shows: the prompts of a text run, else the labels."""
  return list(req.prompts) if req.prompts is not None else [str(l) for l in req.labels]


def _write_figures(run, req: Request, group: evaluate.Samples, out: str) -> list[str]:
  """One grid (or 2-D scatter) per scale of one guidance kind, and the GIF of its first scale."""
  rows = _row_labels(req)
  n_lab, n_per, kind = len(rows), req.num_per_class, group.kind
  files = []
  for scale, block in group.blocks():
    title = f"{kind} scale {scale:g}, {req.sampler} {req.steps} steps"
    if req.negative_prompt is not None and kind == "negative":
      title += f", away from {req.negative_prompt!r}"
    if len(run.shape) == 3:
      path = os.path.join(out, f"grid_{kind}_s{scale:g}.png")
      plotting.save_grid(group.images[block].reshape((n_lab, n_per) + run.shape), path,
                         row_labels=rows, title=title)
    else:
      path = os.path.join(out, f"points_{kind}_s{scale:g}.png")
      plotting.save_points(group.images[block], group.labels[block], path, title=title)
    files.append(path)
  if group.trajectory is not None and len(run.shape) == 3:
    traj = group.trajectory
    frames = traj[:, :n_lab * n_per].reshape((traj.shape[0], n_lab, n_per) + run.shape)
    path = os.path.join(out, f"denoise_{kind}_s{group.scale_list[0]:g}.gif")
    plotting.save_gif(frames, path)
    files.append(path)
  return files


def _write_samples(run: pipeline.Run, req: Request, groups: list, out: str,
                   extra: dict[str, np.ndarray]) -> list[str]:
  """samples.npz (image, label, scale, guidance and `extra` per sample) and the figures."""
  npz = os.path.join(out, "samples.npz")
  save_npz(npz, image=np.concatenate([g.images for g in groups]).astype(np.float32),
           label=np.concatenate([g.labels for g in groups]),
           scale=np.concatenate([g.scales for g in groups]),
           guidance=np.concatenate([np.full(len(g.labels), g.kind) for g in groups]), **extra)
  return [npz] + [f for g in groups for f in _write_figures(run, req, g, out)]


def sample_and_write(run: pipeline.Run, req: Request, out: str,
                     judge: Optional[evaluate.Judge] = None) -> dict[str, Any]:
  """Samples the request, writes samples.npz and the figures, and with req.evaluate the report
  (judged by `judge`, default the workdir's). Returns the summary that report.json holds.
  A text run's samples are conditioned on the prompts' encodings; samples.npz then also holds
  each sample's `prompt`, and `label` is the class the prompt names (-1 if none)."""
  options, conditions, classes = dict(req.options), None, None
  slots = req.labels
  if req.prompts is not None:
    if req.encodings is None:
      req = _complete_prompts(req, run)
    conditions = req.encodings
    classes = np.asarray([-1 if c is None else c for c in map(lambda p: prompt_class(run, p),
                                                              req.prompts)], np.int32)
    slots = list(range(len(req.prompts)))
    if req.negative_encoding is not None:   # a tuple: hashable, part of the compile cache's key
      options["negative_label"] = tuple(float(v) for v in req.negative_encoding)
  groups = evaluate.draw(run, jax.random.PRNGKey(req.seed), req.scales, slots, req.num_per_class,
                         conditions=conditions, sampler=req.sampler, steps=req.steps,
                         spacing=req.spacing or "linear", clf_scale=req.clf_scale,
                         batch_size=req.batch_size, return_trajectory=req.gif,
                         save_every=max(req.steps // 20, 1), **options)
  extra = {}
  if classes is not None:   # Samples.labels held prompt indices: judge against their classes
    extra["prompt"] = np.concatenate([np.asarray(req.prompts)[g.labels] for g in groups])
    groups = [dataclasses.replace(g, labels=classes[g.labels]) for g in groups]
  if len(run.shape) == 3 and not req.raw:
    # Images are [−1, 1] data: what is written (and judged) stays there. The trajectory is not
    # clipped: its noisy states leave [−1, 1] by design (the GIF clips them for display).
    groups = [dataclasses.replace(g, images=np.clip(g.images, -1.0, 1.0)) for g in groups]
  # With several processes every process has sampled its share and holds all the samples;
  # process 0 alone writes, and `files` lists what this process wrote.
  # With several processes every process has sampled its share and holds all the samples; process
  # 0 alone writes, and `files` lists what this process wrote.
  primary = parallel.is_primary()
  files = _write_samples(run, req, groups, out, extra) if primary else []
  summary: dict[str, Any] = {
      "samples": int(sum(len(g.labels) for g in groups)),
      "compile_s": sum(g.compile_s for g in groups), "sample_s": sum(g.sample_s for g in groups),
      "timings": {g.kind: {"compile_s": g.compile_s, "sample_s": g.sample_s} for g in groups},
      "files": files, "request": report_request(req)}
  if req.evaluate:   # measured by every process: the judge's networks live on the global mesh
    rows, reference = evaluate.measure(judge or evaluate.run_judge(run), groups, seed=req.seed)
    summary.update(report=rows, reference=reference)
    if primary:
      write_report(out, summary, run)
  return summary


def _fmt(value: Optional[float], spec: str) -> str:
  return "—" if value is None else format(value, spec)


def report_markdown(summary: dict[str, Any], run: pipeline.Run) -> str:
  """report.md: what was sampled, the Fréchet distance's floor and ceiling, then one row per
  guidance × scale."""
  req, ref = summary["request"], summary["reference"]
  asked = (f"{req['num_per_class']} per prompt, prompts {', '.join(map(repr, req['prompts']))}"
           if req.get("prompts") is not None else
           f"{req['num_per_class']} per class, classes {', '.join(map(str, req['labels']))}")
  judge = ("the workdir's evaluator (LeNet penultimate features)" if "evaluator" in run.params
           else "the exact mixture posterior, the 2-D points as features")
  lines = [
      f"# Guided samples from {run.workdir}", "",
      f"{req['sampler']}, {req['steps']} steps, seed {req['seed']}; each row: {ref['n_samples']} samples "
      f"({asked}), judged by {judge}.", "",
      f"Fréchet distance to {ref['n_test']} held-out examples of those classes, read against sets of "
      f"the same size: floor {_fmt(ref['floor'], '.4g')} (real train examples), ceiling "
      f"{_fmt(ref['ceiling'], '.4g')} "
      "(the sampler's N(0, I) starting noise).",
      "Diversity: mean pairwise feature distance within a class ÷ the same for held-out examples "
      "(1 = as diverse as real data), averaged over classes.", "",
      "| guidance | scale | accuracy | worst class (accuracy) | Fréchet distance | diversity |",
      "|---|---|---|---|---|---|"]
  for r in summary["report"]:
    lines.append(f"| {r['guidance']} | {r['scale']:g} | {r['accuracy']:.3f} | {r['worst_class']} "
                 f"({r['worst_class_accuracy']:.2f}) | {_fmt(r['frechet_distance'], '.4g')} | "
                 f"{_fmt(r['diversity'], '.3f')} |")
  return "\n".join(lines) + "\n"


def write_report(out: str, summary: dict[str, Any], run: pipeline.Run) -> None:
  """report.json (the summary), report.md and sweep.png (accuracy and Fréchet distance vs scale)."""
  names = ("report.json", "report.md", "sweep.png")
  summary["files"] += [os.path.join(out, n) for n in names]
  ref = summary["reference"]
  plotting.save_sweep(summary["report"], os.path.join(out, "sweep.png"), floor=ref["floor"],
                      ceiling=ref["ceiling"], chance=1.0 / run.num_classes,
                      title=f"{summary['request']['sampler']}, {summary['request']['steps']} steps, "
                            f"{ref['n_samples']} samples per point")
  checkpoint.atomic_write_text(os.path.join(out, "report.md"), report_markdown(summary, run))
  checkpoint.atomic_write_text(os.path.join(out, "report.json"), json.dumps(summary, indent=2))


def final_grids(workdir: str, stop: Any = None) -> dict[str, Any]:
  """train.py's last act: a CFG grid and, when a classifier was trained, a classifier-guidance
  grid at the config's scales, judged by the evaluator when there is one. With several processes
  every process calls it (each samples its share; process 0 writes): a batch the devices do not
  divide is sampled whole by each device rather than refused, since training has already ended.
  `stop` (an entered `training.StopSignal`): a signal during a grid stops after it, by
  `training.Preempted`."""
  run = pipeline.load_run(workdir)
  out = prepare_out(os.path.join(workdir, "samples"))
  kinds = ["cfg"] + (["classifier"] if "classifier" in run.params else [])
  can_judge = "evaluator" in run.params or run.config.data.source == "toy:gmm"
  judge = evaluate.run_judge(run) if can_judge else None   # one judge: its features compile once
  results = {}
  for kind in kinds:
    req = complete_request(Request(guidance=(kind,), evaluate=can_judge), run)
    summary = sample_and_write(run, req, prepare_out(os.path.join(out, kind)), judge)
    if stop is not None:
      stop.check(None, None, "the final grids")
    results[kind] = {"files": summary["files"], "compile_s": summary["compile_s"],
                     "sample_s": summary["sample_s"],
                     **({"accuracy": summary["report"][0]["accuracy"]} if can_judge else {})}
  return results
