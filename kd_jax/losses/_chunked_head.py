r"""Chunked language-model-head losses with a chunk-by-chunk custom VJP.

The engine behind `kd_jax.losses.tokens.fused_head_divergence` and
`fused_head_topk_kd`. Tokens arrive flattened and padded to `[n_chunks, C, D]`;
for every chunk of `C` tokens the student logits `h W + b` (`[C, V]`) are
formed, a per-token loss of those logits is evaluated and the chunk's logits
are dropped again, so no `[N, V]` array ever exists.

Gradients (w.r.t. the student hidden states, kernel and bias only; the teacher
is a constant). With `a_n = d loss_n / d logits_n` and the per-token output
cotangent `g_n`:

.. math::
  \partial h_n = g_n\, a_n W^\top, \qquad
  \partial W = \textstyle\sum_n g_n\, h_n^\top a_n, \qquad
  \partial b = \textstyle\sum_n g_n\, a_n .

`fwd` already computes `a_n W^T` per token (`[N, D]`, small) and the
unweighted sums `sum_n h_n^T a_n`, `sum_n a_n` in the same pass as the
value. `bwd` then multiplies: exact for `dh` always, and exact for `dW`, `db`
when `g` is the same for every unmasked token (any `mean` or
`sum(loss * mask) / count` reduction), which `bwd` checks at run time. For a
non-uniform `g` (e.g. per-sequence normalization) `bwd` falls back to a
second chunked pass that recomputes the logits (`lax.cond`: only one branch
runs, except under `vmap`). So a `mean` loss costs the same matmuls as the
materialized computation, and memory stays `O(C V + D V + N D)`.

The same idea (gradients in the forward pass, chunk by chunk) is Liger-Kernel's
`LigerFusedLinearJSDLoss` / fused linear cross-entropy (Hsu et al.,
"Liger Kernel: Efficient Triton Kernels for LLM Training", 2024), which
returns only a scalar.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
from jax.custom_derivatives import SymbolicZero
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class HeadLoss:
  """Static description of a chunked head loss.

  Attributes:
    loss_fn: `(student_logits [C, V], teacher_chunk, teacher_consts,
      valid [C]) -> [C]` per-token loss (teacher arguments are pytrees).
    with_ce: also return the temperature-1 cross-entropy with the labels.
    dtype: the compute dtype (float32, or float64 under x64).
  """
  loss_fn: Callable[..., Any]
  with_ce: bool
  dtype: Any


def _varying_axes(x):
  """The shard_map axes `x` varies over (empty outside shard_map)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", frozenset()))


def _varying_zeros(shape, dtype, *refs):
  """Zeros that vary over the same shard_map axes as `refs`.

  A scan carry inside `shard_map` must have the same varying-manual-axes
  type as the values accumulated into it.
  """
  axes = frozenset().union(*(_varying_axes(r) for r in jax.tree.leaves(refs)))
  z = jnp.zeros(shape, dtype)
  return jax.lax.pcast(z, tuple(sorted(axes)), to="varying") if axes else z


def _like_primal(ct, primal):
  """Sums a cotangent over the shard_map axes its primal is invariant over.

  (What autodiff does for a replicated input: the transpose of the implicit
  broadcast to "varying" is a `psum`.)
  """
  extra = _varying_axes(ct) - _varying_axes(primal)
  ct = jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct
  return ct.astype(primal.dtype)


def _logits(spec, h, kernel, bias):
  return jnp.matmul(h, kernel, preferred_element_type=spec.dtype) + bias


def _cross_entropy(s, labels, valid):
  """`logsumexp(s) - s[label]` per row, 0 where not `valid`."""
  lse = jax.nn.logsumexp(s, axis=-1)
  s_y = jnp.take_along_axis(s, labels[:, None], axis=-1)[:, 0]
  return jnp.where(valid, lse - s_y, 0.0)


def _chunk_losses(spec, s, tchunk, tconsts, valid, labels):
  div = spec.loss_fn(s, tchunk, tconsts, valid).astype(spec.dtype)
  if spec.with_ce:
    ce = _cross_entropy(s, labels, valid)
  else:
    ce = jnp.zeros_like(div)
  return div, ce


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def head_losses(spec, hidden, kernel, bias, tchunks, tconsts, valid, labels):
  """`(loss [n, C], ce [n, C])` of `hidden [n, C, D] @ kernel [D, V] + bias`.

  `tchunks` (leaves `[n, C, ...]`) are scanned with the tokens, `tconsts`
  are closed over; both are constants. `labels` `[n, C]` int32 (ignored
  unless `spec.with_ce`); `valid` `[n, C]` bool.
  """
  def body(xs):
    h, tch, v, y = xs
    s = _logits(spec, h, kernel, bias)
    return _chunk_losses(spec, s, tch, tconsts, v, y)
  return jax.lax.map(body, (hidden, tchunks, valid, labels))


def _chunk_vjps(spec, s, tch, tconsts, v, y):
  """`(div, ce, vjps)`: values and the VJP of each of the m = 1 or 2 outputs.

  Separate VJPs, so that pulling back one output does no work for the other.
  """
  div, vjp_div = jax.vjp(
      lambda s_: spec.loss_fn(s_, tch, tconsts, v).astype(spec.dtype), s)
  if not spec.with_ce:
    return div, jnp.zeros_like(div), (vjp_div,)
  ce, vjp_ce = jax.vjp(lambda s_: _cross_entropy(s_, y, v), s)
  return div, ce, (vjp_div, vjp_ce)


def _head_fwd(spec, hidden, kernel, bias, tchunks, tconsts, valid, labels):
  need_h, need_k, need_b = hidden.perturbed, kernel.perturbed, bias.perturbed
  hidden, kernel, bias = hidden.value, kernel.value, bias.value
  tchunks, tconsts = jax.tree.map(lambda p: p.value, (tchunks, tconsts))
  valid, labels = valid.value, labels.value
  m = 2 if spec.with_ce else 1
  d, vocab = kernel.shape
  kernel_c = kernel.astype(spec.dtype)

  def body(carry, xs):
    dk, db = carry
    h, tch, v, y = xs
    s = _logits(spec, h, kernel, bias)
    div, ce, vjps = _chunk_vjps(spec, s, tch, tconsts, v, y)
    # a_i = d out_i / d logits per row (unit cotangent), [C, V] each.
    a = [vjp(jnp.ones_like(div))[0] for vjp in vjps]
    dh0 = jnp.stack([ai @ kernel_c.T for ai in a]) if need_h else None
    if need_k:
      dk = tuple(k + h.astype(spec.dtype).T @ ai for k, ai in zip(dk, a))
    if need_b:
      db = tuple(b + jnp.sum(ai, axis=0) for b, ai in zip(db, a))
    return (dk, db), (div, ce, dh0)

  refs = (hidden, kernel, bias, tchunks, tconsts, valid, labels)
  zeros = lambda *shape: _varying_zeros(shape, spec.dtype, refs)
  init = (tuple(zeros(d, vocab) for _ in range(m)) if need_k else None,
          tuple(zeros(vocab) for _ in range(m)) if need_b else None)
  (dk0, db0), (div, ce, dh0) = jax.lax.scan(
      body, init, (hidden, tchunks, valid, labels))
  res = (hidden, kernel, bias, tchunks, tconsts, valid, labels, dh0, dk0, db0)
  return (div, ce), res


def _uniform_scale(g, valid):
  """(is g constant over the valid tokens, that constant or 0)."""
  big = jnp.asarray(np.inf, g.dtype)
  hi = jnp.max(jnp.where(valid, g, -big))
  lo = jnp.min(jnp.where(valid, g, big))
  any_valid = jnp.any(valid)
  return (hi == lo) | ~any_valid, jnp.where(any_valid, hi, 0.0)


def _recompute_param_grads(spec, res, gs, need_k, need_b):
  """Second chunked pass: `sum_n g_n h_n^T a_n`, `sum_n g_n a_n`."""
  hidden, kernel, bias, tchunks, tconsts, valid, labels = res[:7]

  def body(carry, xs):
    dk, db = carry
    h, tch, v, y, g = xs
    s = _logits(spec, h, kernel, bias)
    _, _, vjps = _chunk_vjps(spec, s, tch, tconsts, v, y)
    a = sum(vjp(gi)[0] for vjp, gi in zip(vjps, g))
    if need_k:
      dk = dk + jnp.einsum("cd,cv->dv", h.astype(spec.dtype), a)
    if need_b:
      db = db + jnp.sum(a, axis=0)
    return (dk, db), None

  d, vocab = kernel.shape
  refs = (res[:7], gs)
  init = (_varying_zeros((d, vocab), spec.dtype, refs) if need_k else None,
          _varying_zeros((vocab,), spec.dtype, refs) if need_b else None)
  (dk, db), _ = jax.lax.scan(
      body, init, (hidden, tchunks, valid, labels, jnp.stack(gs, axis=1)))
  return dk, db


def _head_bwd(spec, res, cts):
  hidden, kernel, bias = res[:3]
  valid = res[5]
  dh0, dk0, db0 = res[7:]
  gs = [jnp.zeros(valid.shape, spec.dtype) if isinstance(g, SymbolicZero)
        else g.astype(spec.dtype) for g in cts]
  m = 2 if spec.with_ce else 1
  g_m = jnp.stack(gs[:m], axis=1)  # [n, m, C]
  d_hidden = None
  if dh0 is not None:
    d_hidden = _like_primal(jnp.einsum("nmc,nmcd->ncd", g_m, dh0), hidden)
  need_k, need_b = dk0 is not None, db0 is not None
  d_kernel = d_bias = None
  if need_k or need_b:
    checks = [_uniform_scale(g, valid) for g in gs[:m]]
    uniform = functools.reduce(jnp.logical_and, [c[0] for c in checks])
    scales = jnp.stack([c[1] for c in checks])

    def fast(_):
      combine = lambda parts: sum(scales[i] * x for i, x in enumerate(parts))
      return (combine(dk0) if need_k else None,
              combine(db0) if need_b else None)

    def slow(_):
      return _recompute_param_grads(spec, res, gs, need_k, need_b)

    d_kernel, d_bias = jax.lax.cond(uniform, fast, slow, None)
    if need_k:
      d_kernel = _like_primal(d_kernel, kernel)
    if need_b:
      d_bias = _like_primal(d_bias, bias)
  return (d_hidden, d_kernel, d_bias, None, None, None, None)


head_losses.defvjp(_head_fwd, _head_bwd, symbolic_zeros=True)


def chunk_tokens(x, n_tokens, chunk, fill=0):
  """`[N, ...]` -> `[ceil(N / chunk), chunk, ...]`, padded with `fill`."""
  n_chunks = -(-n_tokens // chunk)
  pad = n_chunks * chunk - n_tokens
  if pad:
    widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
    x = jnp.pad(x, widths, constant_values=fill)
  return x.reshape((n_chunks, chunk) + x.shape[1:])
