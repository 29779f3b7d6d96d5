"""Divergences between the softmax distributions of two sets of logits.

General-purpose, per-example divergences for logit distillation, including
token-level distillation of language models (`[B, T, V]` logits with a
`[B, T]` mask). With `p = softmax(teacher_logits / T)` and
`q = softmax(student_logits / T)`:

* `forward_kl`: KL(p || q), mass-covering ("standard" KD direction).
* `reverse_kl`: KL(q || p), mode-seeking.
* `js_divergence`: the generalized Jensen-Shannon divergence of GKD with
  TRL's convention (`beta=0` is `forward_kl`, `beta=1` is `reverse_kl`).
* `total_variation`: 1/2 ||p - q||_1.

None of them multiplies by `T^2` (use `kd_loss` for Hinton's scaled KD).

All functions: `[..., K]` logits -> float32 loss of shape `[...]`; optional
boolean `where` of shape `[...]` (masked entries give 0 with finite
gradients even if their logits are NaN/inf); the teacher is a constant
(`stop_gradient`); bfloat16/float16 inputs are computed in float32 (float64
inputs, only possible with `jax_enable_x64`, stay float64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
import numpy as np

from kd_jax.losses import _common
from kd_jax.losses import _softmax

Array = jax.Array


# ---------------------------------------------------------------------------
# Shared preparation.
# ---------------------------------------------------------------------------


def _compute_dtype(*arrays):
  """float32, or float64 when an input is float64 (x64 mode only)."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def prepare_logits_pair(student_logits, teacher_logits, *, where=None,
                        min_classes: int = 1, temperature=None):
  """Validates and prepares a (student, teacher) logits pair.

  Checks dtypes/shapes (messages name the argument), casts to the compute
  dtype, stops the gradient into the teacher, validates `where` and zeroes
  masked rows *before* any computation so NaN/inf there cannot leak into the
  value or the gradient.

  Returns:
    `(student, teacher, where)` with `where` None or a bool array `[...]`.
  """
  _common.check_float(student_logits, "student_logits")
  _common.check_float(teacher_logits, "teacher_logits")
  _common.check_rank(student_logits, "student_logits", min_ndim=1,
                     what="([..., num_classes])")
  _common.check_same_shape(student_logits, teacher_logits, "student_logits",
                           "teacher_logits")
  num_classes = jnp.shape(student_logits)[-1]
  if num_classes < min_classes:
    raise ValueError(
        f"`student_logits` must have at least {min_classes} classes on the "
        f"last axis; got shape {tuple(jnp.shape(student_logits))}.")
  if temperature is not None:
    _common.check_positive(temperature, "temperature")
  dtype = _compute_dtype(student_logits, teacher_logits)
  s = jnp.asarray(student_logits, dtype)
  t = jax.lax.stop_gradient(jnp.asarray(teacher_logits, dtype))
  where = _common.check_where(where, s.shape[:-1])
  s, t = _common.mask_inputs(where, s, t)
  return s, t, where


def slice_vocab(student_logits, teacher_logits, vocab_size=None,
                *, student_name="student_logits",
                teacher_name="teacher_logits"):
  """Keeps the first `vocab_size` classes of both logits (padded vocabularies).

  Tokenizers of one model family often share the true vocabulary while the
  checkpoints pad the output layer to different sizes (e.g. 151936 vs 152064).
  With `vocab_size=None` the class counts must match; an unequal count raises
  a ValueError naming both sizes. Otherwise both last axes must be at least
  `vocab_size` long and the classes beyond it are dropped (they get no
  probability mass and a zero gradient).
  """
  vs = jnp.shape(student_logits)[-1] if jnp.ndim(student_logits) else None
  vt = jnp.shape(teacher_logits)[-1] if jnp.ndim(teacher_logits) else None
  if vocab_size is None:
    if vs is not None and vt is not None and vs != vt:
      raise ValueError(
          f"`{student_name}` has {vs} classes but `{teacher_name}` has {vt}; "
          f"pass `vocab_size=` (the true vocabulary size, at most {min(vs, vt)}"
          ") to compare the classes both share.")
    return student_logits, teacher_logits
  if (not isinstance(vocab_size, (int, np.integer))
      or isinstance(vocab_size, bool) or vocab_size < 1):
    raise ValueError(
        f"`vocab_size` must be a positive Python int; got {vocab_size!r}.")
  for x, name, v in ((student_logits, student_name, vs),
                     (teacher_logits, teacher_name, vt)):
    if v is None or v < vocab_size:
      raise ValueError(
          f"`vocab_size`={vocab_size} exceeds the {v} classes of `{name}` "
          f"(shape {tuple(jnp.shape(x))}).")
  return student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]


def _is_zero(tangent) -> bool:
  return isinstance(tangent, SymbolicZero)


# ---------------------------------------------------------------------------
# KL(softmax(v) || softmax(u)) with a fused analytic derivative.
# ---------------------------------------------------------------------------


def _kl_fast(x, y, k):
  """KL(softmax(k y) || softmax(k x)) per row, first-entry shifts (fast path).

  Three fused passes (`log z_x`, `log z_y`, the weighted sum), no `select`.
  The scale `k` (1 / temperature) is applied inside each pass rather than to
  a shared `k x` (XLA would write that to memory: one more pass), and the
  normalizer's `exp(-(c - x) k)` is written differently from the other
  passes' `(x - c) k` for the same reason. Returns
  `(kl, (c_x, log z_x, c_y, log z_y))`; `log q = (x - c_x) k - log z_x`.
  """
  cx, cy = _softmax.first_entry(x), _softmax.first_entry(y)
  lzx = _softmax.log_sum_exp_shifted(x, cx, _softmax.per_row(k, cx))
  lzy = _softmax.log_sum_exp_shifted(y, cy, _softmax.per_row(k, cy))
  kw = _softmax.per_row(k, cx + cy)
  dx = _softmax.minus_shift(x, cx) * kw
  dy = _softmax.minus_shift(y, cy) * kw
  # sum_c p_c (log p_c - log q_c) = sum_c p_c (dy_c - dx_c) + log z_x - log z_y
  w = jnp.sum(jnp.exp(dy - lzy) * (dy - dx), axis=-1)
  return w + (lzx - lzy)[..., 0], (cx, lzx, cy, lzy)


def _kl_exact(x, y, k):
  """The same with maximum shifts and `0 log 0 = 0` (any finite input).

  Entries with `p_c = 0` contribute 0, which also keeps positions where both
  logits are -inf finite.
  """
  mx, my = _softmax.max_shift(x), _softmax.max_shift(y)
  lzx = _softmax.log_sum_exp_shifted(x, mx, k)
  lzy = _softmax.log_sum_exp_shifted(y, my, k)
  dx, dy = (x - mx) * k, (y - my) * k
  p = jnp.exp(dy - lzy)
  diff = jnp.where(p > 0, dy - dx, 0.0)
  kl = jnp.sum(p * diff, axis=-1) + (lzx - lzy)[..., 0]
  return kl, (mx, lzx, my, lzy)


def _kl_stats(x, y, k):
  return _softmax.fast_or_exact(_kl_fast, _kl_exact, x, y, k)


@jax.custom_jvp
def kl_from_scaled_logits(x: Array, y: Array, k: Array) -> Array:
  r"""`KL(softmax(k y) || softmax(k x))` over the last axis, in log space.

  No masking or validation: the building block of `kd_loss`, `forward_kl`
  and `reverse_kl` (`k = 1 / T`, a positive scalar). Custom JVP with the
  analytic derivatives (`u = k x`, `v = k y`, `q = softmax(u)`,
  `p = softmax(v)`)

  .. math::
    \partial_u KL = q - p, \qquad
    \partial_v KL = p \odot (\log p - \log q - KL),

  chained through `u = k x` (and `k`, when the temperature is
  differentiated). They are computed from the per-row statistics of the
  forward pass, so reverse mode is one more fused pass (two `exp` per entry)
  and no stored softmax. The forward pass is `_softmax.fast_or_exact`'s
  first-entry-shift fast path (three fused passes) with the maximum-shift
  formulation as fallback.
  """
  return _kl_stats(x, y, k)[0]


def scaled_tangent(x, dx, k, dk):
  """Tangent of `k x` (None when both tangents are symbolic zeros)."""
  out = None
  if not _is_zero(dx):
    out = k * dx
  if not _is_zero(dk):
    out = x * dk if out is None else out + x * dk
  return out


def _kl_jvp(primals, tangents):
  x, y, k = primals
  dx, dy, dk = tangents
  kl, (cx, lzx, cy, lzy) = _kl_stats(x, y, k)
  log_q = (x - cx) * k - lzx
  log_p = (y - cy) * k - lzy
  p = jnp.exp(log_p)
  out = jnp.zeros_like(kl)
  du = scaled_tangent(x, dx, k, dk)
  dv = scaled_tangent(y, dy, k, dk)
  if du is not None:
    out = out + jnp.sum((jnp.exp(log_q) - p) * du, axis=-1)
  if dv is not None:
    # log p - log q (0 where p = 0, as in the value).
    log_ratio = jnp.where(p > 0, log_p - log_q, 0.0)
    out = out + jnp.sum(p * (log_ratio - kl[..., None]) * dv, axis=-1)
  return kl, out


kl_from_scaled_logits.defjvp(_kl_jvp, symbolic_zeros=True)


def kl_from_logits(u: Array, v: Array) -> Array:
  """`KL(softmax(v) || softmax(u))` over the last axis (`k = 1`)."""
  return kl_from_scaled_logits(u, v, jnp.ones((), jnp.result_type(u, v)))


def inverse_temperature(temperature, dtype):
  """`1 / T` as a scalar array of `dtype` (traced temperatures stay traced)."""
  return jnp.asarray(1.0 / jnp.asarray(temperature, dtype), dtype)


# ---------------------------------------------------------------------------
# Public divergences.
# ---------------------------------------------------------------------------


def forward_kl(student_logits, teacher_logits, *, temperature=1.0,
               where=None, vocab_size=None) -> Array:
  r"""Forward KL divergence `KL(p || q)` per example.

  .. math::
    \mathrm{KL}(p \| q) = \sum_c p_c (\log p_c - \log q_c), \quad
    p = \sigma(z^t / T), \; q = \sigma(z^s / T)

  This is `F.kl_div(log q, p)` summed over classes; no `T^2` factor (that is
  `kd_loss`: `kd_loss(s, t, temperature=T) == T**2 * forward_kl(s, t,
  temperature=T)`). Computed in log space with `0 log 0 = 0`.

  Args:
    student_logits: `[..., K]` float array.
    teacher_logits: `[..., K]`, same shape; treated as a constant.
    temperature: softmax temperature `T > 0`.
    where: optional bool mask `[...]`; masked entries give 0.
    vocab_size: optional true vocabulary size; only the first `vocab_size`
      classes of both logits are used (padded heads of unequal width).

  Returns:
    float32 array of shape `[...]`.

  References:
    Kullback & Leibler, "On Information and Sufficiency", Ann. Math. Stat.
    1951; Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
    Network", NeurIPS Deep Learning Workshop 2015.

  >>> import jax.numpy as jnp
  >>> s = jnp.log(jnp.array([[0.5, 0.5]])); t = jnp.log(jnp.array([[0.9, 0.1]]))
  >>> round(float(forward_kl(s, t)[0]), 5)  # 0.9 ln 1.8 + 0.1 ln 0.2
  0.36806
  """
  student_logits, teacher_logits = slice_vocab(
      student_logits, teacher_logits, vocab_size)
  s, t, where = prepare_logits_pair(student_logits, teacher_logits,
                                    where=where, temperature=temperature)
  kl = kl_from_scaled_logits(s, t, inverse_temperature(temperature, s.dtype))
  return _common.apply_where(kl, where)


def reverse_kl(student_logits, teacher_logits, *, temperature=1.0,
               where=None, vocab_size=None) -> Array:
  r"""Reverse KL divergence `KL(q || p)` per example (mode-seeking).

  .. math::
    \mathrm{KL}(q \| p) = \sum_c q_c (\log q_c - \log p_c), \quad
    p = \sigma(z^t / T), \; q = \sigma(z^s / T)

  Used by MiniLLM-style and on-policy (GKD with `beta=1`) distillation of
  language models. No `T^2` factor.

  Args:
    student_logits: `[..., K]` float array.
    teacher_logits: `[..., K]`, same shape; treated as a constant.
    temperature: softmax temperature `T > 0`.
    where: optional bool mask `[...]`; masked entries give 0.
    vocab_size: optional true vocabulary size; only the first `vocab_size`
      classes of both logits are used (padded heads of unequal width).

  Returns:
    float32 array of shape `[...]`.

  References:
    Gu, Dong, Wei & Huang, "MiniLLM: Knowledge Distillation of Large Language
    Models", ICLR 2024.

  >>> import jax.numpy as jnp
  >>> s = jnp.log(jnp.array([[0.5, 0.5]])); t = jnp.log(jnp.array([[0.9, 0.1]]))
  >>> round(float(reverse_kl(s, t)[0]), 5)  # 0.5 ln(0.5/0.9) + 0.5 ln 5
  0.51083
  """
  student_logits, teacher_logits = slice_vocab(
      student_logits, teacher_logits, vocab_size)
  s, t, where = prepare_logits_pair(student_logits, teacher_logits,
                                    where=where, temperature=temperature)
  kl = kl_from_scaled_logits(t, s, inverse_temperature(temperature, s.dtype))
  return _common.apply_where(kl, where)


def _check_beta_unit(beta):
  if isinstance(beta, (int, float, np.number)) and not isinstance(beta, bool):
    if not 0.0 <= beta <= 1.0:
      raise ValueError(f"`beta` must be in [0, 1]; got {beta}.")


def js_divergence(student_logits, teacher_logits, *, beta=0.5,
                  temperature=1.0, where=None, vocab_size=None) -> Array:
  r"""Generalized Jensen-Shannon divergence of GKD (TRL convention).

  .. math::
    \mathrm{JSD}_\beta = \beta\,\mathrm{KL}(p \| m) + (1-\beta)\,
    \mathrm{KL}(q \| m), \quad m = \beta p + (1-\beta) q

  with `p` the teacher and `q` the student distribution at temperature `T`.
  `log m` is computed in log space (`logaddexp`, no `log(0)`). `beta=0.5` is
  the symmetric JSD (at most `ln 2`). No `T^2` factor.

  **The endpoints are special-cased, as in TRL's `GKDTrainer`:** `beta=0`
  returns `forward_kl` and `beta=1` returns `reverse_kl`. The mixture formula
  itself tends to 0 at both ends, so the function is *discontinuous* at 0
  and 1 (e.g. `beta=1e-6` gives ~`1e-6 KL`-sized values while `beta=0` gives
  the full forward KL). Libraries disagree here; kd_jax follows TRL because
  that is what GKD users compare against. A traced (non-Python) `beta` gets
  the same endpoint behaviour via `jnp.where`.

  For `0 < beta < 1` the derivative is a fused analytic custom JVP
  (`(1-beta) q (log q - log m - KL(q||m))` for the student; also in `beta`).

  Args:
    student_logits: `[..., K]` float array.
    teacher_logits: `[..., K]`, same shape; treated as a constant.
    beta: interpolation weight in `[0, 1]`.
    temperature: softmax temperature `T > 0`.
    where: optional bool mask `[...]`; masked entries give 0.
    vocab_size: optional true vocabulary size; only the first `vocab_size`
      classes of both logits are used (padded heads of unequal width).

  Returns:
    float32 array of shape `[...]`.

  References:
    Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist & Bachem, "On-Policy
    Distillation of Language Models: Learning from Self-Generated Mistakes"
    (GKD), ICLR 2024; HuggingFace TRL `GKDTrainer.generalized_jsd_loss`.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[10., -10.]]); t = jnp.array([[-10., 10.]])
  >>> round(float(js_divergence(s, t)[0]), 4)  # disjoint supports: ln 2
  0.6931
  >>> bool(js_divergence(s, t, beta=0.0)[0] == forward_kl(s, t)[0])
  True
  """
  _check_beta_unit(beta)
  student_logits, teacher_logits = slice_vocab(
      student_logits, teacher_logits, vocab_size)
  s, t, where = prepare_logits_pair(student_logits, teacher_logits,
                                    where=where, temperature=temperature)
  u = s / temperature
  v = t / temperature
  if isinstance(beta, (int, float, np.number)) and not isinstance(beta, bool):
    if beta == 0:
      out = kl_from_logits(u, v)
    elif beta == 1:
      out = kl_from_logits(v, u)
    else:
      out = _mixture_jsd(u, v, jnp.asarray(beta, s.dtype))
  else:
    beta = jnp.asarray(beta, s.dtype)
    tiny = jnp.finfo(s.dtype).tiny
    safe_beta = jnp.clip(beta, tiny, 1.0 - jnp.finfo(s.dtype).eps)
    mix = _mixture_jsd(u, v, safe_beta)
    out = jnp.where(beta == 0, kl_from_logits(u, v),
                    jnp.where(beta == 1, kl_from_logits(v, u), mix))
  return _common.apply_where(out, where)


def total_variation(student_logits, teacher_logits, *, temperature=1.0,
                    where=None, vocab_size=None) -> Array:
  r"""Total variation distance `1/2 ||p - q||_1` per example.

  .. math::
    \mathrm{TV}(p, q) = \tfrac12 \sum_c |p_c - q_c|, \quad
    p = \sigma(z^t / T), \; q = \sigma(z^s / T)

  Bounded in `[0, 1]`; no `T^2` factor. TV is not differentiable where
  `p_c = q_c`; the derivative of `|x|` is taken as `sign(x)` (0 at exact
  ties). Near `q = p` the gradient does not vanish (it is a kink, not a
  smooth minimum), so rounding decides its sign there.

  Args:
    student_logits: `[..., K]` float array.
    teacher_logits: `[..., K]`, same shape; treated as a constant.
    temperature: softmax temperature `T > 0`.
    where: optional bool mask `[...]`; masked entries give 0.
    vocab_size: optional true vocabulary size; only the first `vocab_size`
      classes of both logits are used (padded heads of unequal width).

  Returns:
    float32 array of shape `[...]`.

  References:
    Wen, Li, Du & Mou, "f-Divergence Minimization for Sequence-Level
    Knowledge Distillation", ACL 2023 (TVD for distillation).

  >>> import jax.numpy as jnp
  >>> s = jnp.log(jnp.array([[0.5, 0.5]])); t = jnp.log(jnp.array([[0.9, 0.1]]))
  >>> round(float(total_variation(s, t)[0]), 5)
  0.4
  """
  student_logits, teacher_logits = slice_vocab(
      student_logits, teacher_logits, vocab_size)
  s, t, where = prepare_logits_pair(student_logits, teacher_logits,
                                    where=where, temperature=temperature)
  # Plain autodiff of the two softmaxes: a fused-pass custom JVP (3 + 1
  # passes, like KL) measured 0.90-0.95x of this on the 2-core VM of
  # docs/performance.md, because TV needs four exp-heavy reductions.
  d = (jax.nn.softmax(t / temperature, axis=-1)
       - jax.nn.softmax(s / temperature, axis=-1))
  tv = 0.5 * jnp.sum(abs_sign_derivative(d), axis=-1)
  return _common.apply_where(tv, where)


@jax.custom_jvp
def abs_sign_derivative(x: Array) -> Array:
  """`|x|` whose derivative is `sign(x)`: 0 at exact ties (`jnp.abs`: 1).

  The same derivative as `x * stop_gradient(sign(x))`, but `sign` is only
  computed where the tangent needs it. With the product form XLA:CPU wrote
  `sign(d)` to memory in the forward pass, as a `[..., K]` kernel of its own
  that ran concurrently with the backward's (one pass more; total variation
  was ~18% more CPU time and had one more branch of concurrent kernels,
  docs/performance.md "Per-process modes"). Here `|x|` joins the reduction.
  """
  return jnp.abs(x)


@abs_sign_derivative.defjvp
def _abs_sign_derivative_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return jnp.abs(x), jnp.sign(x) * dx


# ---------------------------------------------------------------------------
# Generalized JSD (0 < beta < 1) with a fused analytic derivative.
# ---------------------------------------------------------------------------


def _log_mixture(log_p, log_q, beta):
  """`log(beta p + (1 - beta) q)`, clamped at the smallest normal float.

  No cancellation (both terms are >= 0); the clamp only matters where `p` and
  `q` both underflow, whose terms are then `0 * finite = 0`.
  """
  m = beta * jnp.exp(log_p) + (1.0 - beta) * jnp.exp(log_q)
  floor = (beta - beta) + jnp.finfo(m.dtype).tiny   # shaped like beta
  return jnp.log(jnp.maximum(m, floor))


def _jsd_fast(u, v, beta):
  """`(KL(p||m), KL(q||m))` per row with first-entry shifts (no select)."""
  cu, cv = _softmax.first_entry(u), _softmax.first_entry(v)
  lzu = _softmax.log_sum_exp_shifted(u, cu)
  lzv = _softmax.log_sum_exp_shifted(v, cv)
  kls = []
  for copy in (0, 1):   # two passes, each with its own broadcasts
    log_q = _softmax.log_probs(u, cu, lzu, copy)
    log_p = _softmax.log_probs(v, cv, lzv, copy)
    b = _softmax.per_row(beta, cu if copy == 0 else cv)
    log_m = _log_mixture(log_p, log_q, b)
    x = log_p if copy == 0 else log_q
    kls.append(jnp.sum(jnp.exp(x) * (x - log_m), axis=-1))
  return (kls[0], kls[1]), (cu, lzu, cv, lzv)


def _jsd_exact(u, v, beta):
  """The same with maximum shifts, `log m` by `logaddexp`, `0 log 0 = 0`."""
  mu, mv = _softmax.max_shift(u), _softmax.max_shift(v)
  lzu = _softmax.log_sum_exp_shifted(u, mu)
  lzv = _softmax.log_sum_exp_shifted(v, mv)
  log_q, log_p = (u - mu) - lzu, (v - mv) - lzv
  log_m = jnp.logaddexp(log_p + jnp.log(beta), log_q + jnp.log1p(-beta))
  p, q = jnp.exp(log_p), jnp.exp(log_q)
  kl_pm = jnp.sum(jnp.where(p > 0, p * (log_p - log_m), 0.0), axis=-1)
  kl_qm = jnp.sum(jnp.where(q > 0, q * (log_q - log_m), 0.0), axis=-1)
  return (kl_pm, kl_qm), (mu, lzu, mv, lzv)


@jax.custom_jvp
def _mixture_jsd(u, v, beta):
  r"""beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q, 0<beta<1.

  Custom JVP: with `JSD = beta sum p log p + (1-beta) sum q log q
  - sum m log m`,

  .. math::
    \partial_u = (1-\beta)\, q \odot (\log q - \log m - KL(q\|m)),\quad
    \partial_v = \beta\, p \odot (\log p - \log m - KL(p\|m)),\quad
    \partial_\beta = KL(p\|m) - KL(q\|m).
  """
  (kl_pm, kl_qm), _ = _softmax.fast_or_exact(_jsd_fast, _jsd_exact, u, v,
                                             beta)
  return beta * kl_pm + (1.0 - beta) * kl_qm


def _mixture_jsd_jvp(primals, tangents):
  u, v, beta = primals
  du, dv, dbeta = tangents
  (kl_pm, kl_qm), (cu, lzu, cv, lzv) = _softmax.fast_or_exact(
      _jsd_fast, _jsd_exact, u, v, beta)
  out = beta * kl_pm + (1.0 - beta) * kl_qm
  tangent = jnp.zeros_like(out)
  if not (_is_zero(du) and _is_zero(dv)):
    log_q, log_p = (u - cu) - lzu, (v - cv) - lzv
    log_m = _log_mixture(log_p, log_q, beta)
  if not _is_zero(du):
    q = jnp.exp(log_q)
    g = jnp.where(q > 0, q * (log_q - log_m - kl_qm[..., None]), 0.0)
    tangent = tangent + (1.0 - beta) * jnp.sum(g * du, axis=-1)
  if not _is_zero(dv):
    p = jnp.exp(log_p)
    g = jnp.where(p > 0, p * (log_p - log_m - kl_pm[..., None]), 0.0)
    tangent = tangent + beta * jnp.sum(g * dv, axis=-1)
  if not _is_zero(dbeta):
    tangent = tangent + (kl_pm - kl_qm) * dbeta
  return out, tangent


_mixture_jsd.defjvp(_mixture_jsd_jvp, symbolic_zeros=True)
