"""`lax.conv_general_dilated` with an input gradient that XLA:CPU runs fast inside loops.

JAX's transpose rule differentiates a convolution w.r.t. its input with another convolution
that reads the same kernel with its in/out feature axes swapped (dim_labels `01oi`). In a
straight-line program XLA folds a transpose of the kernel into its layout and the convolution
runs in Eigen/YNNPACK. Inside a `while` body (every `lax.scan`: the samplers), the kernel is
part of the loop state and that does not happen: XLA:CPU emits the `01oi` convolution as plain
loops. Measured on this project's classifier-guided Euler–Maruyama step (B = 8, 28×28,
docs/benchmarks.md): the classifier's input gradient took 51 ms per step in a scan against
10 ms unrolled, i.e. classifier guidance ran 2.4× slower than it should.

Here the input gradient reads an explicitly transposed copy of the kernel. The copy is behind
`lax.optimization_barrier`, so XLA cannot fold it back into the convolution's dimension
numbers, and the convolution it feeds is the canonical `01io` one. The copy costs one pass over
the kernel (kilobytes); the kernel gradient is JAX's own rule. Values are identical to
`lax.conv_general_dilated` (same operations, same order), tested in tests/conv_test.py.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv(static: tuple, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
  return _plain(static, lhs, rhs)


def _fwd(static, lhs, rhs):
  return _plain(static, lhs, rhs), (lhs, rhs)


def _bwd(static, residuals, g):
  lhs, rhs = residuals
  dn = static[4]
  out_axis, in_axis = dn.rhs_spec[0], dn.rhs_spec[1]
  # The same convolution, written on a materialised kernel whose in/out axes are swapped: its
  # transpose then reads that copy in the canonical order.
  swapped = lax.optimization_barrier(jnp.swapaxes(rhs, out_axis, in_axis))
  dn_swapped = lax.ConvDimensionNumbers(dn.lhs_spec, (in_axis, out_axis) + tuple(dn.rhs_spec[2:]),
                                        dn.out_spec)
  static_swapped = static[:4] + (dn_swapped,) + static[5:]
  _, vjp_lhs = jax.vjp(lambda l: _plain(static_swapped, l, swapped), lhs)
  _, vjp_rhs = jax.vjp(lambda r: _plain(static, lhs, r), rhs)
  return vjp_lhs(g)[0], vjp_rhs(g)[0]


_conv.defvjp(_fwd, _bwd)
