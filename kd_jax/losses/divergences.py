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


def _kl_fast(u, v):
  """KL(softmax(v) || softmax(u)) per row, first-entry shifts (fast path).

  Three fused passes (`log z_u`, `log z_v`, the weighted sum), no `select`.
  Returns `(kl, (c_u, log z_u, c_v, log z_v))`.
  """
  cu, cv = _softmax.first_entry(u), _softmax.first_entry(v)
  lzu = _softmax.log_sum_exp_shifted(u, cu)
  lzv = _softmax.log_sum_exp_shifted(v, cv)
  du, dv = u - cu, v - cv
  # sum_c p_c (log p_c - log q_c) = sum_c p_c (dv_c - du_c) + log z_u - log z_v
  w = jnp.sum(jnp.exp(dv - lzv) * (dv - du), axis=-1)
  return w + (lzu - lzv)[..., 0], (cu, lzu, cv, lzv)


def _kl_exact(u, v):
  """The same with maximum shifts and `0 log 0 = 0` (any finite input).

  Entries with `p_c = 0` contribute 0, which also keeps positions where both
  logits are -inf finite.
  """
  mu, mv = _softmax.max_shift(u), _softmax.max_shift(v)
  lzu = _softmax.log_sum_exp_shifted(u, mu)
  lzv = _softmax.log_sum_exp_shifted(v, mv)
  du, dv = u - mu, v - mv
  p = jnp.exp(dv - lzv)
  diff = jnp.where(p > 0, dv - du, 0.0)
  kl = jnp.sum(p * diff, axis=-1) + (lzu - lzv)[..., 0]
  return kl, (mu, lzu, mv, lzv)


def _kl_stats(u, v):
  return _softmax.fast_or_exact(_kl_fast, _kl_exact, u, v)


@jax.custom_jvp
def kl_from_logits(u: Array, v: Array) -> Array:
  r"""`KL(softmax(v) || softmax(u))` over the last axis, in log space.

  No temperature, masking or validation: the building block of `kd_loss`,
  `forward_kl` and `reverse_kl`. Custom JVP with the analytic derivatives

  .. math::
    \partial_u KL = q - p, \qquad
    \partial_v KL = p \odot (\log p - \log q - KL),

  computed from the per-row statistics of the forward pass, so reverse mode
  is one more fused pass (two `exp` per entry) and no stored softmax.
  The forward pass is `_softmax.fast_or_exact`'s first-entry-shift fast path
  (three fused passes) with the maximum-shift formulation as fallback.
  """
  return _kl_stats(u, v)[0]


def _kl_jvp(primals, tangents):
  u, v = primals
  du, dv = tangents
  kl, (cu, lzu, cv, lzv) = _kl_stats(u, v)
  log_q = (u - cu) - lzu
  log_p = (v - cv) - lzv
  p = jnp.exp(log_p)
  out = jnp.zeros_like(kl)
  if not _is_zero(du):
    out = out + jnp.sum((jnp.exp(log_q) - p) * du, axis=-1)
  if not _is_zero(dv):
    # log p - log q (0 where p = 0, as in the value).
    log_ratio = jnp.where(p > 0, log_p - log_q, 0.0)
    out = out + jnp.sum(p * (log_ratio - kl[..., None]) * dv, axis=-1)
  return kl, out


kl_from_logits.defjvp(_kl_jvp, symbolic_zeros=True)


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
  kl = kl_from_logits(s / temperature, t / temperature)
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
  kl = kl_from_logits(t / temperature, s / temperature)
  return _common.apply_where(kl, where)


def _check_beta_unit(beta):
  if isinstance(beta, (int, float, np.number)) and not isinstance(beta, bool):
    if not 0.0 <= beta <= 1.0:
      raise ValueError(f"`beta` must be in [0, 1]; got {beta}.")


def _mixture_jsd(log_q, log_p, beta):
  """beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q, 0<beta<1."""
  log_m = jnp.logaddexp(log_p + jnp.log(beta), log_q + jnp.log1p(-beta))
  p = jnp.exp(log_p)
  q = jnp.exp(log_q)
  kl_pm = jnp.sum(jnp.where(p > 0, p * (log_p - log_m), 0.0), axis=-1)
  kl_qm = jnp.sum(jnp.where(q > 0, q * (log_q - log_m), 0.0), axis=-1)
  return beta * kl_pm + (1.0 - beta) * kl_qm


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
      log_q = jax.nn.log_softmax(u, axis=-1)
      log_p = jax.nn.log_softmax(v, axis=-1)
      out = _mixture_jsd(log_q, log_p, jnp.asarray(beta, s.dtype))
  else:
    beta = jnp.asarray(beta, s.dtype)
    log_q = jax.nn.log_softmax(u, axis=-1)
    log_p = jax.nn.log_softmax(v, axis=-1)
    tiny = jnp.finfo(s.dtype).tiny
    safe_beta = jnp.clip(beta, tiny, 1.0 - jnp.finfo(s.dtype).eps)
    mix = _mixture_jsd(log_q, log_p, safe_beta)
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
  q = jax.nn.softmax(s / temperature, axis=-1)
  p = jax.nn.softmax(t / temperature, axis=-1)
  d = p - q
  # |d| with derivative sign(d), i.e. 0 at exact ties (jnp.abs gives +-1).
  tv = 0.5 * jnp.sum(d * jax.lax.stop_gradient(jnp.sign(d)), axis=-1)
  return _common.apply_where(tv, where)
