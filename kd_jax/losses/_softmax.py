r"""Row-softmax statistics for the logit losses, in the shape XLA:CPU runs fast.

What an HLO dump of the losses shows on XLA:CPU (jax 0.10): every row
reduction becomes its own YNNPACK kernel, which can absorb elementwise
producers (`exp`, `log`, `+ - * /`, `max`, `min`, `abs`, broadcasts) but not
`select`/`compare`/`clamp`; any `[B, K]` value that two kernels share is
written to memory and read back. A `[1024, 1000]` float32 loss is bandwidth-
bound (one core streams ~22 GB/s here: ~0.2 ms per pass over a 4 MB array),
so the cost is the number of passes. A maximum-shifted softmax adds a max
pass per input, and a `where`-guarded sum or a shared `exp(x - m)` adds
materialized arrays (the old KL took 10 passes, 5 of them writes).

The fast path here therefore

* shifts each row by its **first entry** `c = x[..., :1]` instead of the
  maximum (no extra pass). Any entry of the row is a valid shift as long as
  `exp(x - c)` does not overflow: the sum contains `exp(0) = 1`, so it never
  underflows, and log-probabilities are formed as `(x - c) - log z` from
  small numbers;
* keeps every reduction free of `select` and gives each pass its own
  per-row broadcasts (`minus_shift`, `log_probs`, `per_row`), so each
  reduction is one kernel that reads the logits and computes its own `exp`.

It is exact whenever its results are finite. When they are not (a row whose
spread exceeds ~88 so that `exp(x - c)` overflows, `-inf` logits, NaN/inf
inputs), `fast_or_exact` recomputes the whole batch with the loss's exact
(maximum-shift, `where`-guarded) formulation via `lax.cond`, so values and
gradients are those of the exact path. Under `vmap` the `cond` becomes a
`select` and both paths run (still correct, just slower). Inputs smaller
than `MIN_FAST_SIZE` use the exact path only.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = Any


def first_entry(x: Array) -> Array:
  """The shift of the fast path: each row's first entry, keepdims."""
  return x[..., :1]


def per_row(k: Array, c: Array) -> Array:
  """The scalar `k` as a `[..., 1]` array that XLA cannot constant-fold.

  `(c - c) + k` equals `k` wherever the shift `c` is finite (elsewhere the
  fast path's results are not finite and `fast_or_exact` falls back). A
  scalar constant broadcast to `[..., K]` and shared by several reduction
  kernels is written to memory by XLA:CPU (a full extra pass); a per-row
  value is broadcast inside each kernel instead, like the shift itself.
  """
  return (c - c) + k


def minus_shift(x: Array, c: Array) -> Array:
  """`x - c` written as `x + (-c)`: the same rounding, a distinct HLO value.

  XLA:CPU writes a per-row broadcast to memory (a full `[..., K]` pass) when
  the same broadcast value feeds several reduction kernels. The normalizer
  passes use `c` itself (`log_sum_exp_shifted`); the other passes use `-c`
  through this function, so no broadcast is shared.
  """
  return x + (-c)


def log_probs(x: Array, c: Array, lz: Array, copy: int = 0) -> Array:
  """`(x - c) - lz` for one reduction pass; `copy` picks its HLO form.

  Each copy uses its own per-row broadcast values (`-c, lz` or
  `(c - c) + c, -lz`, equal to `c, lz` wherever the fast path is used), so
  two passes over the same rows share no broadcast (see `minus_shift`).
  """
  if copy == 0:
    return minus_shift(x, c) - lz
  return (x - ((c - c) + c)) + (-lz)


def max_shift(x: Array) -> Array:
  """Each row's maximum (keepdims); 0 for rows without a finite maximum."""
  m = jnp.max(x, axis=-1, keepdims=True)
  return jnp.where(jnp.isfinite(m), m, jnp.zeros((), m.dtype))


def log_sum_exp_shifted(x: Array, c: Array, k=1.0) -> Array:
  """`log sum_j exp((x_j - c) k)` over the last axis (keepdims): one pass.

  Written as `exp(-(c - x) k)` (the same rounding as `(x - c) k`) so that XLA does
  not treat the `[..., K]` difference as shared with the callers' `x - c`:
  a shared elementwise result between two reduction kernels is written to
  memory and read back (one more pass over the data).
  """
  return jnp.log(jnp.sum(jnp.exp(-(c - x) * k), axis=-1, keepdims=True))


def all_finite(tree) -> Array:
  """Scalar bool: every entry of every array in `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]
  out = leaves[0]
  for leaf in leaves[1:]:
    out = jnp.logical_and(out, leaf)
  return out


MIN_FAST_SIZE = 1 << 16
"""Inputs with fewer entries than this skip the fast path (and its `cond`).

Below it a loss is dominated by per-kernel overheads, where the extra
kernels of the fast path and the conditional cost more than the passes
they save (`[64, 100]` KL: ~0.2 ms with, ~0.1 ms without).
"""


def fast_or_exact(fast: Callable, exact: Callable, *args,
                  checked: Callable = lambda out: out):
  """`fast(*args)` if `checked(out)` is all finite, else `exact(*args)`.

  Both must return the same pytree structure, shapes and dtypes. The fast
  result is computed unconditionally; `exact` runs only when needed.
  `checked` selects the outputs to test (per-row sums, whose finiteness
  implies that of the entries they sum), so the test is not another pass.
  Inputs smaller than `MIN_FAST_SIZE` entries use `exact` directly.
  """
  if max(jnp.size(a) for a in args) < MIN_FAST_SIZE:
    return exact(*args)
  out = fast(*args)
  ok = all_finite(checked(out))
  return jax.lax.cond(ok, lambda *_: out, exact, *args)
