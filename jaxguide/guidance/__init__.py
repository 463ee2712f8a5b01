"""Guidance as a transform of the ε-function: every sampler works with every guidance.

Each function here takes an ε-function `(x, t, y) -> ε` (x (B, ...), t (B,), y int (B,)) and returns
another one with the same signature, in the manner of score_sde's controllable_generation:

  classifier guidance   ε̃ = ε − w σ(t) ∇ₓ log p_t(y | x)              (w = 1 is Bayes' rule)
  classifier-free       ε̃ = ε(x, t, ∅) + s (ε(x, t, y) − ε(x, t, ∅))   (s = 0 uncond., s = 1 cond.)
  CFG-Zero*             CFG on s*·ε(∅) in the path's velocity, zeroed first steps (Fan et al. 2025)

and the newer family (`free`, `gradient`, `projected`, `frequency`, `x0`): negative labels,
composed labels, autoguidance, adaptive projected guidance (APG, with momentum), frequency-
decoupled guidance (FDG), clean-image classifier guidance and CFG++ (a sampler option as well:
`CFGPlusPlus.pair` hands ddim, dpmpp_2m and ddpm the unconditional ε to re-noise with; the other
samplers, and every transform but clip_x0 and dynamic_threshold, refuse to wrap it).

Guidance may carry state across the sampler's steps (APG's momentum): `state.Stateful` and the
protocol by which the samplers thread it through their `lax.scan` are in `guidance.state`.

Scales are traced: a Python number, a 0-d array, one value per sample (B,), or a function of t
(`schedule`: constant, linear, cosine), broadcast over the data axes, so changing a scale never
recompiles. The null label ∅ is the integer `num_classes`.

Conditions need not be labels: y may be condition vectors (B, D) (a text encoder's prompt
embeddings, `jaxguide.conditioning`), and ∅ then the null vector (D,) (the empty prompt's
encoding) wherever a transform takes `null_label` (`null_like`). classifier_free, negative,
compose, apg, cfgpp, autoguidance, interval and rescale take them as they take labels; the
classifier-gradient kinds need labels (the classifier's classes).

Options of the guided transforms:
  interval=(t_lo, t_hi)  guide only for t_lo <= t <= t_hi (Kynkäänniemi et al. 2024). Outside it the
      result is the plain conditional ε(x, t, y) and the extra work (the null pass, the classifier
      backward pass) is not done. The samplers decide it from their time grid when they are traced
      (`intervals_of`, `decided_intervals`): their loop runs as one `lax.scan` per stretch of
      steps wholly inside or outside, each holding one branch, with no conditional per step.
      Called elsewhere (a loop of your own, a traced grid, a step straddling an end), the test is
      per sample: `lax.cond` runs the guided branch when any sample is inside and `jnp.where`
      keeps it only for those.
  rescale=φ  (classifier_free and combine) CFG rescale (Lin et al. 2023): scale the guided
      prediction so that its per-sample std matches the conditional prediction's, then blend
      `φ · rescaled + (1 − φ) · guided`. The paper defines it on x̂₀/v; we apply it on ε, as
      diffusers does, so that it needs no SDE. φ = 0 is plain CFG exactly.
"""
from jaxguide.guidance.frequency import fdg
from jaxguide.guidance.projected import apg
from jaxguide.guidance.state import Stateful, carried, init_states, stateful_of
from jaxguide.guidance.gradient import classifier, combine, x0_classifier
from jaxguide.guidance.free import (autoguidance, cfg_zero_star, classifier_free, compose, negative,
                                    unconditional)
from jaxguide.guidance.intervals import Interval, decided_intervals, intervals_of
from jaxguide.guidance.passes import classifier_grad, null_like, passes
from jaxguide.guidance.scales import SCHEDULES, Scale, scale_at, schedule
from jaxguide.guidance.x0 import CFGPlusPlus, Paired, cfgpp, clip_x0, dynamic_threshold, renoising_pair

__all__ = ["SCHEDULES", "CFGPlusPlus", "Interval", "Paired", "Scale", "Stateful", "apg",
           "autoguidance", "carried", "cfg_zero_star", "cfgpp", "classifier", "classifier_free", "classifier_grad",
           "clip_x0", "combine", "compose", "decided_intervals", "dynamic_threshold", "fdg",
           "init_states", "intervals_of", "negative", "null_like", "passes", "renoising_pair",
           "scale_at", "schedule", "stateful_of", "unconditional", "x0_classifier"]
