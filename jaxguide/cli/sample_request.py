"""sample.py's request: the flags read and checked (`request_from_flags`), then completed
and checked against the workdir (`complete_request`, `load_request`) before anything is written.

A request sweeps guidance kinds, each with its own scales (`parse_sweep`):
  --guidance cfg --scale 1,3,5                                one kind, three scales
  --guidance cfg,classifier --scale cfg=0,1,3 --scale classifier=0,4,8
  --scale cfg=0,1,3 --scale classifier=0,4,8                  the kinds --scale names
  --guidance cfg,none --scale 1,3                             a LIST without KIND= serves every kind
                                                              that has no list of its own
A kind without scales takes its default scale from the config (`guidance.registry`).

Sampling settings the flags leave open come from the workdir's config.sample (sampler, steps,
spacing, clip_x0); t_eps is the score network's training t_eps (`pipeline.Run.t_eps`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import numpy as np

from jaxguide import conditioning, guidance, pipeline, samplers
from jaxguide import config as config_lib
from jaxguide.diffusion.sde import SPACINGS
from jaxguide.errors import ConfigError
from jaxguide.guidance import registry

SCALE_FORMS = "--scale LIST or --scale KIND=LIST (repeatable), e.g. --scale cfg=1,3 --scale classifier=4,8"


@dataclasses.dataclass
class Request:
  guidance: tuple[str, ...] = ("cfg",)
  scales: dict[str, list[float]] = dataclasses.field(default_factory=dict)   # kind -> its scales
  clf_scale: Optional[float] = None
  sampler: Optional[str] = None
  steps: Optional[int] = None
  spacing: Optional[str] = None      # the time grid: linear | logsnr | karras (Process.time_grid)
  num_per_class: Optional[int] = None   # samples per label (per prompt) and scale
  labels: Optional[list[int]] = None
  prompts: Optional[list[str]] = None   # a text run's prompts (default: one held-out caption per class)
  negative_prompt: Optional[str] = None # --guidance negative on a text run: the prompt to guide away from
  # Filled by complete_request on a text run (before anything is written): the prompts' and the
  # negative prompt's encodings. Not part of the report.
  encodings: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)
  negative_encoding: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)
  seed: int = 0
  batch_size: int = 1000
  gif: bool = False
  evaluate: bool = False
  raw: bool = False                  # write image samples as sampled, not clipped to [−1, 1]
  options: dict[str, Any] = dataclasses.field(default_factory=dict)


def _numbers(text: Optional[str], field: str, kind=float, example: str = "1,3,5",
             shown: Optional[str] = None) -> Optional[list]:
  """A comma list of numbers; `shown` is the flag value named in errors (default: text)."""
  if text is None:
    return None
  shown = text if shown is None else shown
  try:
    values = [kind(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ConfigError(f"--{field}={shown!r}: use a comma list of numbers, e.g. --{field} {example}") from None
  if not values:
    raise ConfigError(f"--{field}={shown!r} is empty: e.g. --{field} {example}")
  if kind is float and not all(np.isfinite(values)):
    raise ConfigError(f"--{field}={shown!r}: scales must be finite numbers")
  return values


def _scale_list(text: str, entry: str, kind: str) -> list[float]:
  example = f"{kind}=1,3,5" if kind else "1,3,5 or --scale cfg=1,3,5"
  values = _numbers(text, "scale", example=example, shown=entry)
  seen = set()
  for v in values:
    if f"{v:g}" in seen:   # grids, npz blocks and report rows are keyed by the printed scale
      raise ConfigError(f"--scale={entry!r} lists {v:g} twice: give each scale once")
    seen.add(f"{v:g}")
  return values


def _guidance_kinds(text: str) -> list[str]:
  kinds = [k.strip() for k in text.split(",")]
  for k in kinds:
    if k not in registry.NAMES:
      raise ConfigError(f"--guidance={text!r}: {k!r} is not known: use one of "
                        f"{', '.join(registry.NAMES)}, or a comma list of them")
  if len(set(kinds)) < len(kinds):
    raise ConfigError(f"--guidance={text!r} names a kind twice: list each kind once")
  return kinds


def parse_sweep(guidance: Optional[str],
                scale_entries: Optional[Sequence[str]]) -> tuple[tuple[str, ...], dict[str, list[float]]]:
  """--guidance and the --scale entries -> (kinds, {kind: scales}); kinds missing from the dict
  take the config's default scale. See the module docstring for the forms."""
  named: dict[str, list[float]] = {}
  shared = None
  for entry in scale_entries or []:
    kind, sep, text = entry.partition("=")
    kind = kind.strip()
    if not sep:
      if shared is not None:
        raise ConfigError(f"--scale is given twice without a kind: use {SCALE_FORMS}")
      shared = _scale_list(entry, entry, "")
    elif kind not in registry.NAMES:
      raise ConfigError(f"--scale={entry!r}: {kind!r} is not a guidance kind: use KIND=LIST with KIND "
                        f"one of {', '.join(registry.NAMES)}")
    elif kind in named:
      raise ConfigError(f"--scale names {kind} twice: give one list per kind, e.g. --scale {kind}=1,3,5")
    else:
      named[kind] = _scale_list(text, entry, kind)
  if guidance is None:
    if named and shared is not None:
      raise ConfigError("--scale LIST without a kind, beside KIND=LIST ones, needs --guidance to say "
                        "which kinds it serves: add --guidance, or write KIND=LIST")
    kinds = list(named) or ["cfg"]
  else:
    kinds = _guidance_kinds(guidance)
    for kind in named:
      if kind not in kinds:
        raise ConfigError(f"--scale names {kind} but --guidance={guidance}: add it "
                          f"(--guidance={guidance},{kind}) or drop --scale {kind}=...")
    if shared is not None and all(k in named for k in kinds):
      raise ConfigError("--scale LIST without a kind serves no kind (each has its own KIND=LIST): drop it")
  scales = {k: named.get(k, shared) for k in kinds if named.get(k, shared) is not None}
  return tuple(kinds), scales


EDM_OPTIONS = ("churn", "s_tmin", "s_tmax", "s_noise")   # samplers.edm's


def _sampler_options(flags_: Any) -> dict[str, Any]:
  """The samplers' and shared guidance options (eta, snr, clip_x0, rescale, interval, ...)."""
  options: dict[str, Any] = {}
  for name in ("eta", "snr", "clip_x0", *EDM_OPTIONS, "rho"):
    if getattr(flags_, name, None) is not None:
      options[name] = float(getattr(flags_, name))
  s_tmax = options.get("s_tmax")
  if s_tmax is not None and np.isposinf(s_tmax):
    del options["s_tmax"]   # the default: churn up to σ̃(T)
  if not all(np.isfinite(v) for v in options.values()):
    bad = next(k for k, v in options.items() if not np.isfinite(v))
    raise ConfigError(f"--{bad}={options[bad]}: must be a finite number")
  if options.get("eta", 0.0) < 0:
    raise ConfigError(f"--eta={flags_.eta}: must be >= 0 (0 = deterministic DDIM, 1 = DDPM's noise)")
  if options.get("snr", 1.0) <= 0:
    raise ConfigError(f"--snr={flags_.snr}: must be > 0, e.g. 0.16")
  for name in ("churn", "s_noise"):
    if options.get(name, 0.0) < 0:
      raise ConfigError(f"--{name}={options[name]:g}: must be >= 0, e.g. --{name} "
                        f"{'40' if name == 'churn' else '1'}")
  if options.get("s_tmin", 0.0) > options.get("s_tmax", np.inf):
    raise ConfigError(f"--s_tmin={options['s_tmin']:g} > --s_tmax={options['s_tmax']:g}: churn "
                      "applies for σ̃ in [s_tmin, s_tmax]")
  if options.get("rho", 1.0) <= 0:
    raise ConfigError(f"--rho={options['rho']:g}: the Karras grid's exponent must be > 0, e.g. 7")
  if options.get("clip_x0", 0.0) < 0:
    raise ConfigError(f"--clip_x0={flags_.clip_x0}: must be >= 0 (0 = off), e.g. 1")
  if flags_.guide_conditional is not None:
    options["guide_conditional"] = bool(flags_.guide_conditional)
  if flags_.rescale:
    if not 0.0 <= flags_.rescale <= 1.0:
      raise ConfigError(f"--rescale={flags_.rescale}: must be in [0, 1], e.g. 0.7")
    options["rescale"] = float(flags_.rescale)
  interval = _numbers(flags_.interval, "interval", example="0.1,0.9")
  if interval is not None:
    options["interval"] = config_lib.parse_interval(interval)
    if options["interval"] is None:
      raise ConfigError(f"--interval={flags_.interval!r}: give 'lo,hi' with 0 <= lo < hi <= 1")
  options.update(_family_options(flags_))
  return options


def _check_sampling(flags_: Any) -> None:
  """The sampler, its grid and the sizes."""
  if flags_.clf_scale is not None and not np.isfinite(flags_.clf_scale):
    raise ConfigError(f"--clf_scale={flags_.clf_scale}: must be a finite number, e.g. 4")
  if flags_.sampler is not None and flags_.sampler not in samplers.SAMPLERS:
    raise ConfigError(f"--sampler={flags_.sampler!r} is not known: use one of {', '.join(samplers.SAMPLERS)}")
  if flags_.spacing is not None and flags_.spacing not in SPACINGS:
    raise ConfigError(f"--spacing={flags_.spacing!r} is not known: use one of "
                      f"{', '.join(SPACINGS)}")
  for name in ("steps", "num_per_class", "batch_size"):
    value = getattr(flags_, name)
    if value is not None and value < 1:
      raise ConfigError(f"--{name}={value}: must be a positive integer")


def _prompts(flags_: Any) -> list[str] | None:
  """--prompt or --prompt_set (as a placeholder `complete_request` expands), never with --labels."""
  prompts = list(getattr(flags_, "prompt", None) or []) or None
  prompt_set = getattr(flags_, "prompt_set", None)
  if prompt_set is not None:
    if prompt_set not in conditioning.SPLITS:
      raise ConfigError(f"--prompt_set={prompt_set!r} is not known: use one of "
                        f"{', '.join(conditioning.SPLITS)} (every caption of that split)")
    if prompts:
      raise ConfigError("--prompt_set and --prompt both choose the prompts: give one of them")
    prompts = [f"<{prompt_set}>"]
  if prompts and flags_.labels is not None:
    raise ConfigError("--prompt and --labels both choose what to sample: give prompts to a text "
                      "run, labels to a label run")
  return prompts


def request_from_flags(flags_: Any) -> Request:
  """Reads and checks the flags that need no workdir (every error names the flag and the fix)."""
  options = _sampler_options(flags_)
  _check_sampling(flags_)
  prompts = _prompts(flags_)
  negative_prompt = getattr(flags_, "negative_prompt", None)
  guidance_flag = flags_.guidance
  if negative_prompt is not None and guidance_flag is None and not any(
      "=" in e for e in flags_.scale or []):
    guidance_flag = "negative"   # the negative prompt takes the empty prompt's place in CFG
  kinds, scales = parse_sweep(guidance_flag, flags_.scale)
  if negative_prompt is not None and "negative" not in kinds:
    raise ConfigError(f"--negative_prompt is an option of --guidance negative, not "
                      f"{','.join(kinds)}: add negative, or drop --negative_prompt")
  return Request(guidance=kinds, scales=scales, clf_scale=flags_.clf_scale, sampler=flags_.sampler,
                 steps=flags_.steps, spacing=flags_.spacing, num_per_class=flags_.num_per_class,
                 labels=_numbers(flags_.labels, "labels", int, "0,3,7"), prompts=prompts,
                 negative_prompt=negative_prompt, seed=flags_.seed,
                 batch_size=flags_.batch_size, gif=flags_.gif, evaluate=flags_.evaluate,
                 raw=flags_.raw, options=options)


def _family_options(flags_: Any) -> dict[str, Any]:
  """The newer guidance kinds' options (`pipeline.guided_eps_fn`), each checked against its domain."""
  get = lambda name: getattr(flags_, name, None)
  out: dict[str, Any] = {}
  if get("schedule") is not None:
    if flags_.schedule not in guidance.SCHEDULES:
      raise ConfigError(f"--schedule={flags_.schedule!r} is not known: use one of "
                        f"{', '.join(guidance.SCHEDULES)}")
    if flags_.schedule != "constant":
      out["schedule"] = flags_.schedule
  if get("negative") is not None:
    out["negative_label"] = int(flags_.negative)
  if get("compose") is not None:
    pairs = []
    for item in flags_.compose.split(","):
      label, sep, weight = item.partition(":")
      try:
        pair = (int(label), float(weight))
      except ValueError:
        pair = None
      if not sep or pair is None or not np.isfinite(pair[1]):
        raise ConfigError(f"--compose={flags_.compose!r}: give LABEL:WEIGHT pairs, e.g. "
                          "--compose 3:1.5,8:-0.5")
      pairs.append(pair)
    out["compose"] = tuple(pairs)
  if get("apg_eta") is not None:
    if not np.isfinite(flags_.apg_eta):
      raise ConfigError(f"--apg_eta={flags_.apg_eta}: must be a finite number, e.g. 0")
    out["apg_eta"] = float(flags_.apg_eta)
  if get("norm_threshold") is not None:
    if not flags_.norm_threshold > 0 or not np.isfinite(flags_.norm_threshold):
      raise ConfigError(f"--norm_threshold={flags_.norm_threshold}: must be a positive number "
                        "(drop it for no bound), e.g. 15")
    out["norm_threshold"] = float(flags_.norm_threshold)
  if get("apg_momentum") is not None:
    if not -1 < flags_.apg_momentum < 1:
      raise ConfigError(f"--apg_momentum={flags_.apg_momentum}: must be in (-1, 1), e.g. -0.5")
    out["apg_momentum"] = float(flags_.apg_momentum)
  if get("fdg_low") is not None:
    if not np.isfinite(flags_.fdg_low):
      raise ConfigError(f"--fdg_low={flags_.fdg_low}: must be a finite number, e.g. 1")
    out["fdg_low"] = float(flags_.fdg_low)
  if get("fdg_levels") is not None:
    if flags_.fdg_levels < 2:
      raise ConfigError(f"--fdg_levels={flags_.fdg_levels}: must be an integer >= 2, e.g. 2")
    out["fdg_levels"] = int(flags_.fdg_levels)
  if get("zero_init_steps") is not None:
    if flags_.zero_init_steps < 0:
      raise ConfigError(f"--zero_init_steps={flags_.zero_init_steps}: must be an integer >= 0, e.g. 1")
    out["zero_init_steps"] = int(flags_.zero_init_steps)
  if get("recurrence") is not None:
    if flags_.recurrence < 0:
      raise ConfigError(f"--recurrence={flags_.recurrence}: must be an integer >= 0, e.g. 1")
    if flags_.recurrence:
      out["recurrence"] = int(flags_.recurrence)
  return out


def _check_family(req: "Request", run: pipeline.Run) -> None:
  """The guidance table's checks (`guidance.registry.check`), then the values that need the run."""
  registry.check(req.guidance, req.options, req.sampler, req.scales, run.captions is not None)
  for name in req.guidance:
    if registry.get(name).images_only and len(run.shape) != 3:
      raise ConfigError(f"--guidance {name} needs image data, and this workdir's data are points "
                        f"of shape {run.shape}: use cfg or apg")
  k = run.num_classes
  if run.captions is not None and "negative_label" in req.options:
    raise ConfigError("--negative takes a class label, and this workdir was trained on text "
                      "prompts: use --negative_prompt 'a handwritten three'")
  label = req.options.get("negative_label")
  if label is not None and not 0 <= label <= k:
    raise ConfigError(f"--negative={label}: must be a class in [0, {k - 1}] or {k} (∅)")
  for label, _ in req.options.get("compose", ()):
    if not 0 <= label < k:
      raise ConfigError(f"--compose: label {label} is outside [0, {k}): use class indices "
                        f"0..{k - 1}")
  if "compose" in req.guidance and "compose" not in req.options:
    raise ConfigError("--guidance compose needs --compose LABEL:WEIGHT pairs, e.g. --compose 3:1,8:-0.5")


def config_options(run: pipeline.Run, options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  """`options` (sampler and guidance options from the flags) with the config's sample.spacing,
  sample.clip_x0, sample.guide_conditional and sample.interval filled in where the flags left
  them open; clip_x0 = 0, guide_conditional = False and interval = None (guide at every t) are
  dropped (the defaults downstream).

  A workdir saved before these fields existed samples on the linear grid and clips x̂₀ to [−1, 1]
  for image data, not for toy data: the presets' defaults."""
  cfg = run.config.sample
  out = dict(options or {})
  out.setdefault("spacing", cfg.get("spacing", "linear"))
  if out["spacing"] not in SPACINGS:
    raise ConfigError(f"sample.spacing={out['spacing']!r} in {run.workdir}/config.json is not "
                      f"known: use --spacing {' or --spacing '.join(SPACINGS)}")
  clip = float(out.pop("clip_x0", cfg.get("clip_x0", 1.0 if len(run.shape) == 3 else 0.0)))
  if clip < 0:
    raise ConfigError(f"sample.clip_x0={clip:g} in {run.workdir}/config.json: must be >= 0 "
                      "(0 = off): pass --clip_x0 1 or --clip_x0 0")
  if clip > 0:
    out["clip_x0"] = clip
  conditional = out.pop("guide_conditional", cfg.get("guide_conditional", False))
  if not isinstance(conditional, bool):
    raise ConfigError(f"sample.guide_conditional={conditional!r} in {run.workdir}/config.json: must "
                      "be true or false: pass --guide_conditional or --noguide_conditional")
  if conditional:
    out["guide_conditional"] = True
  if "interval" not in out and cfg.get("interval") is not None:
    out["interval"] = _config_interval(cfg.interval, run.workdir)
  if tuple(out.get("interval", ())) == (0.0, 1.0):   # every t: the same as no interval
    del out["interval"]
  return out


def _config_interval(value: Any, workdir: str) -> tuple[float, float]:
  """sample.interval from a workdir's config, checked as train.py checks it (`config.parse_interval`)."""
  interval = config_lib.parse_interval(value)
  if interval is None:
    raise ConfigError(f"sample.interval={value!r} in {workdir}/config.json: "
                      f"{config_lib.INTERVAL_FIX} (or pass --interval lo,hi)")
  return interval


def complete_request(req: Request, run: pipeline.Run) -> Request:
  """Fills what the flags left open from the workdir's config.sample, and checks the rest."""
  cfg = run.config.sample
  def default(kind):   # the config field the guidance table names
    field = registry.get(kind).default_scale
    return [float(cfg[field] if field in cfg else registry.DEFAULT_SCALES[field])]
  flagged = dict(req.options, **({"spacing": req.spacing} if req.spacing else {}))
  options = config_options(run, flagged)   # spacing is popped below: it is a Request field
  req = dataclasses.replace(
      req, scales={k: req.scales.get(k) or default(k) for k in req.guidance},
      clf_scale=float(cfg.clf_scale) if req.clf_scale is None else req.clf_scale,
      sampler=req.sampler or cfg.sampler, steps=req.steps or int(cfg.steps),
      spacing=options.pop("spacing"), num_per_class=req.num_per_class or int(cfg.num_per_class),
      labels=req.labels if req.labels is not None or req.prompts is not None or run.captions is not None
      else list(range(run.num_classes)),
      options=options)
  if run.captions is not None or req.prompts is not None or req.negative_prompt is not None:
    req = _complete_prompts(req, run)
  for kind in req.guidance:
    pipeline.check_request(run, kind, np.asarray(req.labels if req.labels is not None else []))
  _check_family(req, run)
  if req.evaluate and "evaluator" not in run.params and run.config.data.source != "toy:gmm":
    raise ConfigError(f"--evaluate needs a trained evaluator in --workdir={run.workdir}: train it with "
                      f"python train.py --workdir {run.workdir} --config.models=evaluator (same --config)")
  if req.options.get("eta") is not None and req.sampler != "ddim":
    raise ConfigError(f"--eta is an option of --sampler ddim, not {req.sampler}: drop it or use ddim")
  if req.options.get("snr") is not None and req.sampler != "pc":
    raise ConfigError(f"--snr is an option of --sampler pc, not {req.sampler}: drop it or use pc")
  for name in EDM_OPTIONS:
    if req.options.get(name) is not None and req.sampler != "edm":
      raise ConfigError(f"--{name} is an option of --sampler edm, not {req.sampler}: drop it or "
                        "use edm")
  if req.options.get("rho") is not None and req.spacing != "karras":
    raise ConfigError(f"--rho is an option of --spacing karras, not {req.spacing}: drop it or use "
                      "--spacing karras")
  return req


def _complete_prompts(req: Request, run: pipeline.Run) -> Request:
  """A text run's prompts: checked against the workdir, defaulted to the first held-out template
  of every class (else the first training template), --prompt_set expanded."""
  where = f"--workdir={run.workdir}"
  if run.captions is None:
    flag = "--prompt" if req.prompts is not None else "--negative_prompt"
    raise ConfigError(f"{flag}: {where} was trained on class labels (condition.kind=label): use "
                      "--labels (--negative LABEL), or a workdir trained with configs/mnist_text.py")
  if req.labels is not None:
    raise ConfigError(f"--labels: {where} was trained on text prompts: use --prompt "
                      "'a handwritten seven' (repeatable) or --prompt_set held_out")
  cap = run.captions
  prompts = req.prompts
  if prompts is None:
    split = "held_out" if np.any(cap.split == "held_out") else "train"
    first = np.flatnonzero(cap.split == split)[:int(cap.labels.max()) + 1]
    prompts = [str(c) for c in cap.captions[first]]
  elif len(prompts) == 1 and prompts[0] in (f"<{s}>" for s in conditioning.SPLITS):
    split = prompts[0][1:-1]
    prompts = [str(c) for c in cap.captions[cap.split == split]]
    if not prompts:
      raise ConfigError(f"--prompt_set={split}: {where} has no {split} captions "
                        "(condition.held_out is empty): use --prompt")
  if not prompts:
    raise ConfigError("--prompt: no prompts given: pass --prompt 'a handwritten seven' (repeatable)")
  if len(set(prompts)) < len(prompts):
    raise ConfigError("--prompt names a prompt twice: give each prompt once")
  if req.negative_prompt is None and "negative" in req.guidance:
    raise ConfigError("--guidance negative on a text run needs --negative_prompt 'a handwritten "
                      "three' (the prompt to guide away from)")
  if req.evaluate:
    for p in prompts:
      if prompt_class(run, p) is None:
        raise ConfigError(f"--evaluate: the prompt {p!r} names no class (or several) of "
                          f"condition.names / condition.numerals, so it cannot be judged: drop it "
                          "or --evaluate")
  encode = lambda ps: conditioning.embed_prompts(run.config, cap, ps)
  negative = None if req.negative_prompt is None else encode([req.negative_prompt])[0]
  return dataclasses.replace(req, prompts=prompts, encodings=encode(prompts),
                             negative_encoding=negative)


def report_request(req: Request) -> dict[str, Any]:
  """The request as report.json records it (without the prompts' encodings)."""
  out = dataclasses.asdict(req)
  for name in ("encodings", "negative_encoding"):
    out.pop(name)
  return out


def prompt_class(run: pipeline.Run, prompt: str) -> Optional[int]:
  """The class a prompt asks for: a cached caption's own class, else the one class it names."""
  j = run.captions.lookup(prompt)
  if j is not None:
    return int(run.captions.labels[j])
  return conditioning.digit_of(prompt, run.config.condition)


def check_split(req: Request) -> None:
  """With several processes, each compiled call's batch must split evenly over every device of
  every process (one share each): refused otherwise, before anything is written. (A batch the
  devices do not divide would be sampled whole by every device: no error, and no speed-up.)"""
  n_proc, n_dev = jax.process_count(), jax.device_count()
  if n_proc == 1:
    return
  for kind in req.guidance:
    slots = len(req.prompts) if req.prompts is not None else len(req.labels)
    per_call = slots * len(req.scales[kind])   # samples per unit of --num_per_class
    total = per_call * req.num_per_class
    if req.batch_size < total and req.batch_size % n_dev:
      raise ConfigError(f"--batch_size={req.batch_size} is not divisible by the {n_dev} devices of "
                        f"{n_proc} processes: use a multiple of {n_dev}")
    if req.batch_size >= total and total % n_dev:
      step = n_dev // math.gcd(n_dev, per_call)
      raise ConfigError(f"--num_per_class={req.num_per_class}: --guidance {kind} samples {total} "
                        f"in one call ({slots} labels or prompts x {len(req.scales[kind])} scales x "
                        f"{req.num_per_class}), which the {n_dev} devices of {n_proc} processes do "
                        f"not split evenly: use a multiple of {step}, e.g. --num_per_class="
                        f"{-(-req.num_per_class // step) * step}")


def load_request(workdir: str, req: Request,
                 dtype: Optional[str] = None) -> tuple[pipeline.Run, Request]:
  """The workdir's run and the request completed and checked against it, writing nothing: what
  sample.py does between its flags and its first file. Every process reads the checkpoints."""
  run = pipeline.load_run(workdir, dtype=dtype)
  req = complete_request(req, run)
  check_split(req)
  return run, req
