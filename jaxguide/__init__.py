"""jaxguide: class-guided diffusion in JAX (classifier guidance and classifier-free guidance).

The names below load on first use (PEP 562), so that `from jaxguide import cli` does not start
jax: the scripts set up the host process (jaxguide.cpu.tune_host_malloc) before jax creates its threads.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "guidance": ("jaxguide.guidance", None),
    "ConfigError": ("jaxguide.errors", "ConfigError"),
    "GaussianMixture": ("jaxguide.diffusion.gmm", "GaussianMixture"),
    "ring_mixture": ("jaxguide.diffusion.gmm", "ring_mixture"),
    "SAMPLERS": ("jaxguide.samplers", "SAMPLERS"),
    "sample": ("jaxguide.samplers", "sample"),
    "eps_fn": ("jaxguide.diffusion.score", "eps_fn"),
    "log_prob_fn": ("jaxguide.diffusion.score", "log_prob_fn"),
    "VPSDE": ("jaxguide.diffusion.sde", "VPSDE"),
    "RectifiedFlow": ("jaxguide.diffusion.sde", "RectifiedFlow"),
    "Process": ("jaxguide.diffusion.sde", "Process"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'jaxguide' has no attribute {name!r}")
  module, attr = _EXPORTS[name]
  value = importlib.import_module(module)
  value = value if attr is None else getattr(value, attr)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
