"""jaxguide: class-guided diffusion in JAX (classifier guidance and classifier-free guidance)."""
from jaxguide import guidance
from jaxguide.errors import ConfigError
from jaxguide.gmm import GaussianMixture, ring_mixture
from jaxguide.samplers import SAMPLERS, sample
from jaxguide.score import eps_fn, log_prob_fn
from jaxguide.sde import VPSDE

__version__ = "0.1.0"
