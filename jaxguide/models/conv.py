"""`lax.conv_general_dilated` with an input gradient that XLA:CPU runs fast inside loops
(jaxguide.cpu uses it on the CPU only; docs/benchmarks.md, "Classifier guidance inside `lax.scan`:
the convolution rule").

JAX differentiates a convolution w.r.t. its input with a convolution that reads the kernel with
its in/out axes swapped (`01oi`). Inside a `while` body (every sampler's `lax.scan`) XLA:CPU
cannot fold that swap into the kernel's layout and runs the `01oi` convolution as plain loops,
several times slower than the same gradient unrolled.

Here the tangent w.r.t. the input is written on an explicitly swapped copy of the kernel, kept
behind `lax.optimization_barrier`, so its transpose (the input gradient) is the canonical `01io`
convolution. It is a `custom_jvp`, so forward mode (`jax.jvp`, `jax.jacfwd`) and reverse mode
both work, to any order. Values equal lax's (tests/conv_test.py).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero


def _hashable(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return tuple(_hashable(v) for v in value)
  return value


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
  """Drop-in for `lax.conv_general_dilated` (and flax `nn.Conv(conv_general_dilated=...)`)."""
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if feature_group_count != 1 or batch_group_count != 1:   # grouped: keep JAX's own rule
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dn, feature_group_count, batch_group_count, precision,
                                    preferred_element_type)
  static = (_hashable(window_strides), _hashable(padding), _hashable(lhs_dilation),
            _hashable(rhs_dilation), dn, precision, preferred_element_type)
  return _conv(static, lhs, rhs)


def _plain(static: tuple, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
  strides, padding, lhs_dil, rhs_dil, dn, precision, pet = static
  return lax.conv_general_dilated(lhs, rhs, strides, padding, lhs_dil, rhs_dil, dn,
                                  precision=precision, preferred_element_type=pet)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _conv(static: tuple, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
  return _plain(static, lhs, rhs)


def _swapped(static: tuple, rhs: jax.Array) -> tuple[tuple, jax.Array]:
  """The kernel materialised with its in/out axes swapped, and the dimension numbers that read
  it as the same convolution."""
  dn = static[4]
  out_axis, in_axis = dn.rhs_spec[0], dn.rhs_spec[1]
  swapped = lax.optimization_barrier(jnp.swapaxes(rhs, out_axis, in_axis))
  dn_swapped = lax.ConvDimensionNumbers(dn.lhs_spec, (in_axis, out_axis) + tuple(dn.rhs_spec[2:]),
                                        dn.out_spec)
  return static[:4] + (dn_swapped,) + static[5:], swapped


def _jvp(static, primals, tangents):
  lhs, rhs = primals
  d_lhs, d_rhs = tangents
  out = _plain(static, lhs, rhs)
  terms = []
  if not isinstance(d_lhs, SymbolicZero):   # linear in d_lhs; its transpose reads `swapped`
    static_swapped, swapped = _swapped(static, rhs)
    terms.append(_plain(static_swapped, d_lhs, swapped))
  if not isinstance(d_rhs, SymbolicZero):
    terms.append(_plain(static, lhs, d_rhs))
  # symbolic_zeros: a tangent known to be zero (no gradient w.r.t. the kernel in guidance, none
  # w.r.t. the input in training) costs nothing.
  # (jax calls the rule only when some tangent is nonzero)
  return out, terms[0] if len(terms) == 1 else terms[0] + terms[1]


_conv.defjvp(_jvp, symbolic_zeros=True)
