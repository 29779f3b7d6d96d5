r"""2-D convolution whose gradients are canonical NHWC / HWIO convolutions.

`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (and for
`nn.Conv(conv_general_dilated=...)`): same forward, same gradients, but the
backward pass is written as two *forward-style* convolutions in XLA:CPU's
canonical layout (input NHWC, kernel HWIO, output NHWC, no window reversal),
with the transposes spelled out:

* input gradient (transposed convolution): with stride $s$, padding
  $(p_l, p_h)$, kernel size $k$ and $r = (H + p_l + p_h - k) \bmod s$,
  $\partial x = \mathrm{conv}(\mathrm{dilate}_s(\partial y),\,
  \mathrm{flip}(w)^{\top_{io}})$ with padding $(k-1-p_l,\ k-1-p_h+r)$;
* kernel gradient: batch and channels swap roles,
  $\partial w_{h w i o} = \sum_{n, a, b} x_{n, s a + h - p_l, s b + w - p_l, i}
  \, \partial y_{n a b o}$ = `conv(x` as `[I, H, W, N]`, `dy` as
  `[Ho, Wo, N, O]` kernel, kernel dilation $s$, padding $(p_l, p_h - r))`
  transposed from `[I, kh, kw, O]` to HWIO.

Why: XLA:CPU rewrites convolutions into its canonical form (inserting these
transposes) only in a program's entry computation; JAX's default
convolution transpose rules produce non-canonical convolutions (batch and
feature dimensions swapped, reversed windows), so inside a `lax.scan` /
`while` body XLA:CPU runs them on a slow generic loop -- a scanned conv-net
train step was ~50x slower per step than one call per step
(https://github.com/jax-ml/jax/issues/12868). Written canonically they take
the same fast library path inside and outside loops. Backends other than CPU
get the same math (XLA's layout assignment handles either form).

Layout copies on CPU: the weight gradient needs `x` as `[I, H, W, N]` and
`dy` as `[Ho, Wo, N, O]`. XLA:CPU fuses such a transpose with the
elementwise ops that produced its operand (BatchNorm's affine, ReLU, the
residual additions of several blocks) and emits one loop that reads every
fused input with a stride of a whole image row per output element: a
`[64, 32, 32, 16]` transpose costs 0.4 ms on a materialized buffer but 9-20
ms with a 4-block BatchNorm/ReLU/residual chain fused in, and these fusions
took ~45% of a ResNet-20 train step. `_layout_copy` therefore performs the
transpose inside a `lax.cond` whose two branches are the same transpose: a
conditional is a fusion boundary, so its operand is the already
materialized activation and the transpose runs on a plain buffer. Both
branches compute the same values, so the result does not depend on the
(data-dependent, never constant-folded) predicate: values are bit-identical
to the plain transpose. Only on CPU (`lax.platform_dependent`); other
backends get the plain transpose (a conditional there could cost a
device-to-host sync).

Covered: 2-D NHWC/HWIO/NHWC, any strides, explicit or 'SAME'/'VALID' padding
with $0 \le p \le k - 1$, `feature_group_count == 1`, no input / kernel
dilation. Anything else falls back to `lax.conv_general_dilated` unchanged
(e.g. grouped / depthwise convolutions keep the default gradients).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple, Union

import jax
from jax import lax
import jax.numpy as jnp

_DN = ("NHWC", "HWIO", "NHWC")
Pads = Tuple[Tuple[int, int], Tuple[int, int]]

LAYOUT_COPY_VIA_COND = True
"""Weight-gradient transposes on CPU through `lax.cond` (module docstring).

Read when a gradient is traced; `False` restores plain transposes (for
benchmarks that compare both)."""


def _conv(lhs, rhs, pads, *, precision, strides=(1, 1), lhs_dilation=None,
          rhs_dilation=None):
  return lax.conv_general_dilated(
      lhs, rhs, strides, pads, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=_DN, precision=precision)


def _remainders(in_hw, k_hw, strides, pads):
  """r per spatial dim: input rows past the last window position."""
  return tuple((n + lo + hi - k) % s
               for n, k, s, (lo, hi) in zip(in_hw, k_hw, strides, pads))


def _input_grad(g, w, in_hw, strides, pads, precision):
  k_hw = w.shape[:2]
  rs = _remainders(in_hw, k_hw, strides, pads)
  gpads = tuple((k - 1 - lo, k - 1 - hi + r)
                for k, (lo, hi), r in zip(k_hw, pads, rs))
  w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)           # [kh, kw, O, I]
  return _conv(g, w_t, gpads, precision=precision, lhs_dilation=strides)


def _layout_copy(fn, v):
  """`fn(v)` (a slice / transpose); on CPU from a materialized `v` (module)."""
  if not LAYOUT_COPY_VIA_COND:
    return fn(v)

  def on_cpu(a):
    first = a.reshape(-1)[0]
    return lax.cond(first == first, fn, fn, a)  # same branches: same values
  return lax.platform_dependent(v, cpu=on_cpu, default=fn)


def _kernel_grad(x, g, k_hw, strides, pads, precision):
  rs = _remainders(x.shape[1:3], k_hw, strides, pads)
  crop = [max(0, r - hi) for r, (_, hi) in zip(rs, pads)]
  h, w = x.shape[1] - crop[0], x.shape[2] - crop[1]
  kpads = tuple((lo, max(0, hi - r)) for (lo, hi), r in zip(pads, rs))
  x_t = _layout_copy(                                        # [I, H, W, N]
      lambda a: a[:, :h, :w, :].transpose(3, 1, 2, 0), x)
  g_t = _layout_copy(lambda a: a.transpose(1, 2, 0, 3), g)   # [Ho, Wo, N, O]
  dw = _conv(x_t, g_t, kpads, precision=precision, rhs_dilation=strides)
  return dw.transpose(1, 2, 0, 3)                            # [kh, kw, I, O]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _canonical_conv(x, w, strides, pads, precision):
  return _conv(x, w, pads, precision=precision, strides=strides)


def _canonical_conv_fwd(x, w, strides, pads, precision):
  return _canonical_conv(x, w, strides, pads, precision), (x, w)


def _canonical_conv_bwd(strides, pads, precision, res, g):
  x, w = res
  dx = _input_grad(g, w, x.shape[1:3], strides, pads, precision)
  dw = _kernel_grad(x, g, w.shape[:2], strides, pads, precision)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)


def _is_nhwc(lhs, rhs, dimension_numbers) -> bool:
  if lhs.ndim != 4 or rhs.ndim != 4:
    return False
  if dimension_numbers is None:
    return False  # lax's default is NCHW
  want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DN)
  got = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return got == want


def _ones(v) -> bool:
  return v is None or all(int(d) == 1 for d in v)


def conv_general_dilated(
    lhs, rhs, window_strides: Sequence[int],
    padding: Union[str, Sequence[Tuple[int, int]]],
    lhs_dilation: Optional[Sequence[int]] = None,
    rhs_dilation: Optional[Sequence[int]] = None,
    dimension_numbers=None, feature_group_count: int = 1,
    batch_group_count: int = 1, precision=None,
    preferred_element_type=None):
  """`lax.conv_general_dilated` with canonical-layout gradients (see module).

  Same signature and results as `lax.conv_general_dilated`; arguments outside
  the covered case (module docstring) go to it unchanged.
  """
  default = functools.partial(
      lax.conv_general_dilated, lhs, rhs, window_strides, padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
  if (not _is_nhwc(lhs, rhs, dimension_numbers) or feature_group_count != 1
      or batch_group_count != 1 or not _ones(lhs_dilation)
      or not _ones(rhs_dilation) or preferred_element_type is not None
      or jnp.result_type(lhs) != jnp.result_type(rhs)):
    return default()
  strides = tuple(int(s) for s in window_strides)
  k_hw = rhs.shape[:2]
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(lhs.shape[1:3], k_hw, strides, padding)
  else:
    pads = padding
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  if any(not 0 <= p <= k - 1 for k, pad in zip(k_hw, pads) for p in pad):
    return default()
  if isinstance(precision, list):
    precision = tuple(precision)
  return _canonical_conv(lhs, rhs, strides, pads, precision)
