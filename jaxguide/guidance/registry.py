"""The table of guidance kinds that the pipeline, sample.py and the README read.

Each `Kind` says what it needs (trained models beyond the score network, class labels), the
scale at which it adds nothing to its base (`neutral`, for schedules), where its default scale
comes from, the options it reads, the samplers it runs on and the range of its scale, and builds
its ε-function from the run's bound networks (`Models`). Adding a kind means adding its
transform and one row here; the checks, flags and error messages follow from the row.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax.numpy as jnp

from jaxguide.diffusion.score import EpsFn, LogProbFn
from jaxguide.diffusion.sde import Process
from jaxguide.errors import ConfigError
from jaxguide.guidance import free, frequency, gradient, projected, x0
from jaxguide.guidance.scales import scale_at
from jaxguide.samplers import RENOISING


@dataclasses.dataclass(frozen=True)
class Option:
  """An option of some kinds: its keyword (pipeline.generate, the builders) and sample.py flag.
  A `strict` option given while no requested kind reads it is refused; the shared ones
  (interval, rescale, guide_conditional) may come from the workdir's config and are ignored by
  kinds that do not read them."""
  name: str
  flag: str
  strict: bool = True


OPTIONS = {o.name: o for o in (
    Option("guide_conditional", "--guide_conditional", strict=False),
    Option("interval", "--interval", strict=False),
    Option("rescale", "--rescale", strict=False),
    Option("negative_label", "--negative"),
    Option("compose", "--compose"),
    Option("apg_eta", "--apg_eta"),
    Option("norm_threshold", "--norm_threshold"),
    Option("apg_momentum", "--apg_momentum"),
    Option("fdg_low", "--fdg_low"),
    Option("fdg_levels", "--fdg_levels"),
    Option("zero_init_steps", "--zero_init_steps"),
)}


@dataclasses.dataclass(frozen=True)
class Models:
  """What a builder may use: the score network's ε, the run's other networks bound as
  functions (None where the workdir has none), the null condition ∅ and the SDE."""
  eps: EpsFn
  null: Any
  sde: Process
  text: bool = False
  classifier: Optional[LogProbFn] = None    # the noisy classifier, log p_t(y | x)
  guide: Optional[EpsFn] = None             # autoguidance's weak network
  evaluator: Optional[Callable] = None      # a classifier of clean data, x -> (B, K) log-probs


@dataclasses.dataclass(frozen=True)
class Kind:
  name: str
  formula: str
  build: Callable[..., EpsFn]               # (models, scale, clf_scale, **its options) -> ε-function
  needs: tuple[str, ...] = ()               # trained models beyond the score network
  labels_only: bool = False                 # needs class labels: not for text runs
  neutral: float = 1.0                      # the scale at which it adds nothing to its base
  default_scale: str = "cfg_scale"          # the config.sample field of its default scale
  options: tuple[str, ...] = ()
  samplers: Optional[tuple[str, ...]] = None    # the samplers it runs on; None: every one
  scale_range: Optional[tuple[float, float]] = None
  images_only: bool = False                 # needs (H, W, C) data: not for toy points


def _base(m: Models, guide_conditional: bool) -> EpsFn:
  return m.eps if guide_conditional else free.unconditional(m.eps, m.null)


def _compose(m: Models, scale, clf_scale, *, compose=None) -> EpsFn:
  labels = jnp.asarray([int(c[0]) for c in compose], jnp.int32)
  weights = jnp.asarray([float(c[1]) for c in compose], jnp.float32)

  def composed(x, t, y):
    s = jnp.broadcast_to(jnp.asarray(scale_at(scale, t), jnp.float32), y.shape)
    return free.compose(m.eps, labels, s[:, None] * weights[None], m.null)(x, t, y)
  return composed


def _x0_classifier(m: Models, scale, clf_scale, *, guide_conditional=False,
                   interval=None) -> EpsFn:
  return gradient.x0_classifier(_base(m, guide_conditional), m.evaluator, m.sde, scale,
                               interval=interval)


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("none", "ε(x, t, y), the conditional network as trained",
         lambda m, s, w: m.eps),
    Kind("classifier", "ε(∅) − w σ ∇ₓ log p_t(y | x): the unconditional model guided by the noisy "
         "classifier (guide_conditional: ε(y))",
         lambda m, s, w, guide_conditional=False, interval=None: gradient.classifier(
             _base(m, guide_conditional), m.classifier, m.sde, s, interval=interval),
         needs=("classifier",), labels_only=True, neutral=0.0, default_scale="clf_scale",
         options=("guide_conditional", "interval")),
    Kind("cfg", "ε(∅) + s (ε(y) − ε(∅))",
         lambda m, s, w, interval=None, rescale=0.0: free.classifier_free(
             m.eps, s, m.null, interval=interval, rescale=rescale),
         options=("interval", "rescale")),
    Kind("cfg_zero_star", "CFG-Zero*: s*·ε(∅) + s (ε(y) − s*·ε(∅)) in the path's velocity, the first "
         "--zero_init_steps steps zero",
         lambda m, s, w, zero_init_steps=0, interval=None: free.cfg_zero_star(
             m.eps, s, m.null, int(zero_init_steps), sde=m.sde, interval=interval),
         options=("zero_init_steps", "interval")),
    Kind("both", "CFG at s, then the classifier term at clf_scale",
         lambda m, s, w, interval=None, rescale=0.0: gradient.combine(
             m.eps, m.classifier, m.sde, s, w, m.null, interval=interval, rescale=rescale),
         needs=("classifier",), labels_only=True, options=("interval", "rescale")),
    Kind("negative", "ε(y⁻) + s (ε(y) − ε(y⁻)), y⁻ = --negative (a text run: --negative_prompt)",
         lambda m, s, w, negative_label=None, interval=None: free.negative(
             m.eps, s, m.null if negative_label is None else negative_label, interval=interval),
         options=("negative_label", "interval")),
    Kind("compose", "ε(∅) + s Σᵢ wᵢ (ε(yᵢ) − ε(∅)) for --compose y₁:w₁,…",
         _compose, labels_only=True, neutral=0.0, options=("compose",)),
    Kind("autoguidance", "ε_guide(y) + s (ε(y) − ε_guide(y)), the workdir's guide network",
         lambda m, s, w, interval=None: free.autoguidance(m.eps, m.guide, s, interval=interval),
         needs=("guide",), options=("interval",)),
    Kind("apg", "adaptive projected guidance at s (--apg_eta, --norm_threshold, --apg_momentum)",
         lambda m, s, w, apg_eta=0.0, norm_threshold=None, apg_momentum=0.0, interval=None:
         projected.apg(m.eps, m.sde, s, m.null, eta=apg_eta, norm_threshold=norm_threshold,
                       momentum=apg_momentum, interval=interval),
         options=("apg_eta", "norm_threshold", "apg_momentum", "interval")),
    Kind("fdg", "CFG's x̂₀ difference by frequency band: the fine band at s, the coarse at --fdg_low",
         lambda m, s, w, fdg_low=1.0, fdg_levels=2, interval=None: frequency.fdg(
             m.eps, m.sde, fdg_low, s, m.null, levels=fdg_levels, interval=interval),
         options=("fdg_low", "fdg_levels", "interval"), images_only=True),
    Kind("x0_classifier", "ε − s σ ∇ₓ log p(y | x̂₀) with the workdir's evaluator",
         _x0_classifier, needs=("evaluator",), labels_only=True, neutral=0.0,
         default_scale="clf_scale", options=("guide_conditional", "interval")),
    Kind("cfgpp", "CFG++ at λ = s: x̂₀ from CFG, re-noised with ε(∅)",
         lambda m, s, w: x0.cfgpp(m.eps, s, m.null), default_scale="cfgpp_scale",
         samplers=RENOISING, scale_range=(0.0, 1.0)),
)}
NAMES = tuple(KINDS)
# Default scales of workdirs whose config.json predates the field.
DEFAULT_SCALES = {"cfgpp_scale": 0.6}


def get(name: str, field: str = "--guidance") -> Kind:
  if name not in KINDS:
    raise ConfigError(f"{field}={name!r} is not known: use one of {', '.join(NAMES)}")
  return KINDS[name]


def build(name: str, models: Models, scale, clf_scale=0.0, **options) -> EpsFn:
  """The kind's ε-function; `options` not read by the kind are ignored (see `Option.strict`)."""
  kind = get(name)
  missing = [n for n in kind.needs if getattr(models, n) is None]
  if missing:
    raise ConfigError(f"--guidance={name} needs a trained {missing[0]}")
  return kind.build(models, scale, clf_scale, **{k: v for k, v in options.items()
                                                  if k in kind.options})


def check(names, options: dict[str, Any], sampler: Optional[str], scales: dict[str, list[float]],
          text: bool) -> None:
  """The request-level checks each row implies: strict options read by no requested kind,
  label-only kinds on text runs, samplers a kind cannot run on (sampler None: not checked),
  scales outside a kind's range."""
  for name, option in OPTIONS.items():
    readers = [k for k in NAMES if name in KINDS[k].options]
    if option.strict and name in options and not set(readers) & set(names):
      raise ConfigError(f"{option.flag} is an option of --guidance {' or '.join(readers)}: add "
                        f"that kind or drop {option.flag}")
  for name in names:
    kind = get(name)
    if text and kind.labels_only:
      usable = ", ".join(k for k in NAMES if not KINDS[k].labels_only)
      raise ConfigError(f"--guidance={name} needs class labels, and this workdir was trained on "
                        f"text prompts: use {usable}")
    if sampler is not None and kind.samplers is not None and sampler not in kind.samplers:
      raise ConfigError(f"--guidance {name} runs on --sampler {', '.join(kind.samplers)}, not "
                        f"{sampler}: choose one of them")
    lo, hi = kind.scale_range or (-float("inf"), float("inf"))
    bad = [s for s in scales.get(name, []) if not lo <= s <= hi]
    if bad:
      raise ConfigError(f"--scale {name}={bad[0]:g}: must be in [{lo:g}, {hi:g}], e.g. "
                        f"--scale {name}={lo + 0.2 * (hi - lo):g},{lo + 0.6 * (hi - lo):g}")


def table() -> str:
  """The kinds as a Markdown table (sample.py --help and the README list read it)."""
  rows = ["| kind | ε̃ | needs | options |", "|---|---|---|---|"]
  for k in KINDS.values():
    flags = ", ".join(OPTIONS[o].flag for o in k.options) or "—"
    rows.append(f"| {k.name} | {k.formula} | {', '.join(k.needs) or '—'} | {flags} |")
  return "\n".join(rows)

