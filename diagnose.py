"""The reference tutorial's diagnostic figures from a workdir trained by train.py.

  python diagnose.py --workdir runs/mnist [--out runs/mnist/diagnostics] [--index 0] [--seed 0] \
                     [--figures confidence,gradients,grid,gif] [--num_times 16] \
                     [--guidance classifier --scale 8] [--sampler ddim --steps 50]
  python diagnose.py --workdir runs/toy [--cfg_scales 0,1,3,5 --clf_scales 0,1,4,8]

Image workdirs: confidence_vs_t.png (one test image noised at 16 times, each above the noisy
classifier's p_t(y|x_t)), gradients.png (∇ₓ log p_t(y|x_t) across t), grid_<kind>_s<scale>.png
(classes as rows) and denoise_<kind>_s<scale>.gif (classifier guidance when a classifier was
trained, else CFG). toy2d workdirs: posterior_vs_t.png (the classifier's p_t(y|x) beside the exact
posterior) and guided_contours.png (guided samples over the exact density, one panel per scale).
Prints the JSON list of written files.
"""
import json
import os
import sys
from typing import Any

from jaxguide import cli
from jaxguide import cpu

if __name__ == "__main__":
  cpu.tune_host_malloc()   # on a CPU host: re-executes with glibc backing XLA's per-step buffers by huge pages

import jax
import numpy as np
from absl import flags

from jaxguide import data
from jaxguide.evaluation import diagnostics
from jaxguide import pipeline
from jaxguide.evaluation import plotting
from jaxguide import samplers
from jaxguide.guidance import registry
from jaxguide.cli import sample_output
from jaxguide.cli import sample_request
from jaxguide.errors import ConfigError

IMAGE_FIGURES = ("confidence", "gradients", "grid", "gif")
TOY_FIGURES = ("posterior", "contours")
NEEDS_CLASSIFIER = ("confidence", "gradients", "posterior")
WORKDIR_HINT = "the folder train.py wrote"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "A folder trained by train.py.",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/diagnostics).",
                      flag_values=fv)
  flags.DEFINE_list("figures", None, "Which figures (default: all that the workdir allows): "
                    f"images {','.join(IMAGE_FIGURES)}; toy2d {','.join(TOY_FIGURES)}.",
                    flag_values=fv)
  flags.DEFINE_integer("index", 0, "Which test-split example the across-t figures noise.",
                       flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the noise and of the sampling.",
                       flag_values=fv)
  flags.DEFINE_integer("num_times", 16, "Times t in [t_eps, 1] for the confidence and gradient figures.",
                       flag_values=fv)
  flags.DEFINE_float("t_eps", None, "The smallest time (default: the config's train.t_eps).",
                     flag_values=fv)
  flags.DEFINE_enum("guidance", None, list(registry.NAMES),
                    "Grid and GIF guidance (default: classifier if one was trained, else cfg).",
                    flag_values=fv)
  flags.DEFINE_float("scale", None, "Grid and GIF scale (default: the config's sample.clf_scale / cfg_scale).",
                     flag_values=fv)
  flags.DEFINE_enum("sampler", None, list(samplers.SAMPLERS), "Sampler (default: the config's).",
                    flag_values=fv)
  flags.DEFINE_integer("steps", None, "Sampling steps (default: the config's sample.steps).",
                       flag_values=fv)
  flags.DEFINE_integer("num_per_class", None, "Samples per class (default: the config's).",
                       flag_values=fv)
  flags.DEFINE_list("cfg_scales", "0,1,3,5", "toy2d contours: the CFG scales, one panel each.",
                    flag_values=fv)
  flags.DEFINE_list("clf_scales", None, "toy2d contours: the classifier scales (default 0,1,4,8 when "
                    "a classifier was trained).",
                    flag_values=fv)


FLAGS = flags.FLAGS


def _floats(values, name: str) -> list[float]:
  try:
    out = [float(v) for v in values]
  except ValueError:
    raise ConfigError(f"--{name}={','.join(values)}: use a comma list of numbers, e.g. --{name}=0,1,3") from None
  if not out or not np.all(np.isfinite(out)):
    raise ConfigError(f"--{name}={','.join(values)}: give finite numbers, e.g. --{name}=0,1,3")
  return out


def _check_flags(f: flags.FlagValues) -> None:
  """The checks that need no workdir."""
  for name in ("steps", "num_per_class", "num_times"):
    if getattr(f, name) is not None and getattr(f, name) < 1:
      raise ConfigError(f"--{name}={getattr(f, name)}: must be a positive integer")
  if f.index < 0:
    raise ConfigError(f"--index={f.index}: must be >= 0 (a position in the test split)")
  if f.t_eps is not None and not 0.0 < f.t_eps < 1.0:
    raise ConfigError(f"--t_eps={f.t_eps}: must be in (0, 1), e.g. 0.001")
  if f.scale is not None and not np.isfinite(f.scale):
    raise ConfigError(f"--scale={f.scale}: must be a finite number")
  unknown = sorted(set(f.figures or ()) - set(IMAGE_FIGURES + TOY_FIGURES))
  if unknown or f.figures == []:
    raise ConfigError(f"--figures={','.join(f.figures)}: use names from "
                      f"{','.join(IMAGE_FIGURES + TOY_FIGURES)}")


def _figures(f: flags.FlagValues, run: pipeline.Run, toy: bool) -> list[str]:
  """The requested figures, checked against what the workdir can draw."""
  allowed = TOY_FIGURES if toy else IMAGE_FIGURES
  if f.figures is None:
    has_clf = "classifier" in run.params
    return [name for name in allowed if has_clf or name not in NEEDS_CLASSIFIER]
  wrong = [name for name in f.figures if name not in allowed]
  if wrong:
    raise ConfigError(f"--figures={wrong[0]} is not drawn for {'toy2d' if toy else 'image'} workdirs: "
                      f"use {','.join(allowed)}")
  for name in f.figures:
    if name in NEEDS_CLASSIFIER:
      run.require("classifier", f"--figures={name}")
  return list(dict.fromkeys(f.figures))


def _test_example(f: flags.FlagValues, run: pipeline.Run) -> tuple[np.ndarray, int]:
  """The --index'th example of the workdir's test split and its label."""
  cfg = run.config.data
  ds = data.load(cfg.source, "test", data_dir=cfg.get("data_dir") or None)
  if f.index >= len(ds):
    raise ConfigError(f"--index={f.index}: the test split of {cfg.source} has {len(ds)} "
                      f"examples: use 0..{len(ds) - 1}")
  return ds.image[f.index], int(ds.label[f.index])


def _sampling(f: flags.FlagValues, run: pipeline.Run, toy: bool) -> dict:
  """Sampler settings, and the guidance and scale of the image grid and GIF or the toy panels'
  kinds and scales, all checked before anything is written."""
  cfg = run.config.sample
  plan = {"sampler": f.sampler or cfg.sampler, "steps": f.steps or int(cfg.steps),
          "n": f.num_per_class or int(cfg.num_per_class)}
  foreign = ("guidance", "scale", "num_times", "t_eps") if toy else ("cfg_scales", "clf_scales")
  given = [name for name in foreign if f[name].present]
  if given:
    kinds = ("image", "a toy2d") if toy else ("toy2d", "an image")
    raise ConfigError(f"--{given[0]} is for {kinds[0]} workdirs and --workdir={run.workdir} is "
                      f"{kinds[1]} workdir: drop it")
  if toy:
    plan["kinds"] = [("cfg", _floats(f.cfg_scales, "cfg_scales"))]
    if f.clf_scales is not None:
      run.require("classifier", "--clf_scales")
    if "classifier" in run.params:
      plan["kinds"].append(("classifier", _floats(f.clf_scales or ["0", "1", "4", "8"], "clf_scales")))
    return plan
  kind = f.guidance or ("classifier" if "classifier" in run.params else "cfg")
  pipeline.check_request(run, kind, np.arange(run.num_classes))
  scale = f.scale if f.scale is not None else (
      cfg.clf_scale if kind == "classifier" else cfg.cfg_scale)
  return {**plan, "kind": kind, "scale": float(scale)}


def _draw_noisy(f, run, figures: list[str], example, times: np.ndarray, out: str) -> list[str]:
  x0, label = example
  diag = diagnostics.noisy_classifier(diagnostics.run_log_prob(run), run.sde,
                                      jax.random.PRNGKey(f.seed), x0, label, times)
  files = []
  if "confidence" in figures:
    files.append(os.path.join(out, "confidence_vs_t.png"))
    plotting.save_confidence_vs_t(diag.noised, diag.probs, diag.times, label, files[-1])
  if "gradients" in figures:
    files.append(os.path.join(out, "gradients.png"))
    plotting.save_gradients(diag.noised, diag.grads, diag.times, label, files[-1])
  return files


def _draw_samples(f, run, figures: list[str], plan: dict, out: str) -> list[str]:
  """The classes × n guided grid and, from the same sampling call, its denoising GIF."""
  k, n, gif = run.num_classes, plan["n"], "gif" in figures
  labels = np.repeat(np.arange(k, dtype=np.int32), n)
  result = pipeline.generate(run, jax.random.PRNGKey(f.seed), labels,
                             np.full(len(labels), plan["scale"], np.float32), kind=plan["kind"],
                             sampler=plan["sampler"], steps=plan["steps"],
                             clf_scale=float(run.config.sample.clf_scale), return_trajectory=gif,
                             save_every=max(plan["steps"] // 20, 1),
                             **sample_request.config_options(run))   # the config's spacing, clip_x0
  x0, traj = result if gif else (result, None)
  stem = f"{plan['kind']}_s{plan['scale']:g}"
  files = []
  if "grid" in figures:
    files.append(os.path.join(out, f"grid_{stem}.png"))
    plotting.save_grid(x0.reshape((k, n) + run.shape), files[-1], row_labels=[str(c) for c in range(k)],
                       title=f"{plan['kind']} scale {plan['scale']:g}, {plan['sampler']} {plan['steps']} steps")
  if gif:
    files.append(os.path.join(out, f"denoise_{stem}.gif"))
    plotting.save_gif(traj.reshape((len(traj), k, n) + run.shape), files[-1])
  return files


def _draw_posterior(f, run, example, out: str) -> str:
  """The classifier's and the exact posterior at a few t, the --index test point's x_t starred."""
  mixture = data.toy_mixture()
  maps = diagnostics.posterior_maps(diagnostics.run_log_prob(run), mixture, run.sde)
  tv = diagnostics.expected_total_variation(maps, mixture, run.sde)
  marks = diagnostics.noise_example(run.sde, jax.random.PRNGKey(f.seed), example[0], maps.times)
  path = os.path.join(out, "posterior_vs_t.png")
  plotting.save_posterior_maps(maps.axis, maps.learned, maps.exact, maps.times, path,
                               col_titles=[f"t = {t:.2f}, E[TV] = {v:.3f}" for t, v in zip(maps.times, tv)],
                               marks=np.asarray(marks))
  return path


def _draw_contours(f, run, plan: dict, out: str) -> str:
  """One row per guidance kind, one panel per scale, samples over the exact clean density."""
  mixture = data.toy_mixture()
  rows = []
  for i, (kind, scales) in enumerate(plan["kinds"]):
    x0, labels = diagnostics.guided_sweep(run, jax.random.PRNGKey(f.seed + i), kind, scales, plan["n"],
                                          sampler=plan["sampler"], steps=plan["steps"])
    rows.append([(x, f"{kind} {s:g}: accuracy {diagnostics.exact_accuracy(mixture, run.sde, x, labels):.2f}")
                 for x, s in zip(x0, scales)])
  path = os.path.join(out, "guided_contours.png")
  plotting.save_point_panels(rows, labels, path, density=diagnostics.density_grid(mixture, run.sde),
                             row_labels=[k for k, _ in plan["kinds"]],
                             title=f"guided samples over the exact density, {plan['sampler']} {plan['steps']} steps")
  return path


def check(f: flags.FlagValues) -> tuple[pipeline.Run, list[str], Any, dict]:
  """Everything checked and read before a file is written: (run, figures, the test example or
  None, the sampling plan). Bad input raises ConfigError."""
  _check_flags(f)
  run = pipeline.load_run(f.workdir)
  toy = run.config.data.source == "toy:gmm"
  figures = _figures(f, run, toy)
  # Only the across-t figures need the data: a grid from a host without the dataset still works.
  example = _test_example(f, run) if set(figures) & set(NEEDS_CLASSIFIER) else None
  return run, figures, example, _sampling(f, run, toy)


def main(argv, f: flags.FlagValues = FLAGS):
  cli.check_args(argv, f.workdir, WORKDIR_HINT)
  run, figures, example, plan = check(f)
  out = sample_output.prepare_out(f.out or os.path.join(f.workdir, "diagnostics"))
  t_eps = f.t_eps if f.t_eps is not None else float(run.config.train.t_eps)
  files = []
  if set(figures) & {"confidence", "gradients"}:
    files += _draw_noisy(f, run, figures, example, diagnostics.times_grid(f.num_times, t_eps), out)
  if set(figures) & {"grid", "gif"}:
    files += _draw_samples(f, run, figures, plan, out)
  if "posterior" in figures:
    files.append(_draw_posterior(f, run, example, out))
  if "contours" in figures:
    files.append(_draw_contours(f, run, plan, out))
  print(json.dumps(files, indent=2), file=sys.stdout)


if __name__ == "__main__":
  define_flags(FLAGS)
  cli.run(main)
