r"""Distillation across tokenizers: ULD, GOLD's extended ULD and hybrid loss.

When teacher and student have different vocabularies their distributions
live on different sets and no divergence compares them class by class. The
Universal Logit Distillation loss (ULD) compares them up to a permutation:
with :math:`p` the student's and :math:`q` the teacher's probabilities at
one position, each sorted in decreasing order and zero-padded to the larger
vocabulary,

.. math::
  \mathrm{ULD}(p, q) = \sum_{i=1}^{\max(|V_s|, |V_t|)}
  \bigl| p_{(i)} - q_{(i)} \bigr|,

the closed form of the Wasserstein-1 distance between the two distributions
when moving mass between *any* two different tokens costs 1 and the tokens
are matched by rank (Boizard et al., Sec. 3). Positions are paired by index
in the paper (`uld_loss`); TRL's GOLD trainer pairs them by text instead
(*extended ULD*): both tokenizations are grouped where their text coincides
(`kd_jax.data.align`) and each multi-token group's probabilities are merged
into one distribution (`merge_token_groups`), then ULD compares the merged
distributions (`extended_uld_loss`). GOLD's *hybrid* loss splits each
vocabulary into the tokens both hold (`kd_jax.data.align.vocab_mapping`),
compared directly with the generalized JSD (`matched_jsd`), and the rest,
compared with ULD (`hybrid_distance`).

Conventions (those of `kd_jax.losses`): per-position float32 outputs with
``where=`` masks (masked entries give 0), the teacher is a constant, no
:math:`T^2` factor. Reductions follow TRL (`sequence_mean`,
`uld_objective`): the distillation term is a mean over a sequence's aligned
groups, then over sequences; the CE term a mean over target tokens.

Where TRL's conventions are ambiguous and what kd_jax does (docs/lm.md has
the list with the tests that pin each one):

* merged group distributions are *not* renormalized (TRL neither); the
  scalar token probabilities are floored at ``min_prob = 1e-8`` (TRL's
  ``clamp_min(eps)``);
* the matched part of the hybrid loss is TRL's generalized JSD on
  *unnormalized* sub-vectors of probabilities floored at 1e-8
  (``logits_are_probs=True``); ``beta`` = 0 / 1 are forward / reverse KL;
* the unmatched part is ULD between the two vectors with the matched entries
  set to 0 -- identical to TRL's sort of the unmatched sub-vectors whenever
  both sides have an unmatched token; when one side has none, TRL returns 0
  while kd_jax returns the other side's unmatched mass (the distance to an
  empty distribution; for an all-matched student this is a constant of the
  teacher, so the gradients agree);
* the adaptive hybrid weights are ``M / V_t`` and ``1 - M / V_t`` with
  ``V_t`` the teacher's logit width (padded heads included), as in TRL.

References:
  Boizard, Haddad, Hudelot & Colombo, "Towards Cross-Tokenizer Distillation:
  the Universal Logit Distillation Loss for LLMs", TMLR 2025
  (arXiv:2402.12030), https://github.com/Nicolas-BZRD/llm-recipes
  (``models/distillation_model.py``); HuggingFace TRL, GOLD trainer
  (``trl/experimental/gold/gold_trainer.py``: ``ULDLoss``),
  https://github.com/huggingface/trl; Agarwal et al., "On-Policy
  Distillation of Language Models: Learning from Self-Generated Mistakes",
  ICLR 2024 (the generalized JSD).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.losses import _common

Array = jax.Array

MIN_PROB = 1e-8  # TRL GOLD's floor on merged / matched probabilities


class TokenAlignment(NamedTuple):
  """Index arrays of `kd_jax.data.align.Aligner.align_batch` (a pytree).

  ``G`` groups per sequence, ``Rs = Ls - 1`` student and ``Rt = Lt - 1``
  teacher logit rows (row ``r`` predicts token ``r + 1``).

  Attributes:
    student_base: int ``[B, G]``: the student row whose distribution is the
      group's base.
    student_group: int ``[B, Rs]``: per student row, the group its target
      token's probability multiplies into (``G`` or more: none).
    teacher_base, teacher_group: the same for the teacher (``[B, Rt]``).
    group_mask: bool ``[B, G]``: which groups are scored.
  """
  student_base: Array
  student_group: Array
  teacher_base: Array
  teacher_group: Array
  group_mask: Array

  @classmethod
  def from_batch(cls, batch) -> "TokenAlignment":
    """The alignment fields of a batch dict (extra keys are ignored)."""
    return cls(*(batch[k] for k in cls._fields))


# ---------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------


def _compute_dtype(*arrays):
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _check_pair(student, teacher, sname, tname):
  """Float arrays ``[..., V]`` with equal leading dims (any two widths)."""
  _common.check_float(student, sname)
  _common.check_float(teacher, tname)
  _common.check_rank(student, sname, min_ndim=1, what="([..., vocab])")
  _common.check_rank(teacher, tname, min_ndim=1, what="([..., vocab])")
  if jnp.shape(student)[:-1] != jnp.shape(teacher)[:-1]:
    raise ValueError(
        f"`{sname}` and `{tname}` must have the same leading dims (the "
        f"vocabularies may differ); got {tuple(jnp.shape(student))} and "
        f"{tuple(jnp.shape(teacher))}.")
  dtype = _compute_dtype(student, teacher)
  return (jnp.asarray(student, dtype),
          jax.lax.stop_gradient(jnp.asarray(teacher, dtype)))


def _check_int(x, name, shape=None, ndim=None):
  dt = jnp.result_type(x)
  if not jnp.issubdtype(dt, jnp.integer):
    raise TypeError(f"`{name}` must hold integer indices; got dtype {dt}.")
  if ndim is not None and jnp.ndim(x) != ndim:
    raise ValueError(f"`{name}` must have rank {ndim}; got shape "
                     f"{tuple(jnp.shape(x))}.")
  if shape is not None and tuple(jnp.shape(x)) != tuple(shape):
    raise ValueError(f"`{name}` must have shape {tuple(shape)}; got "
                     f"{tuple(jnp.shape(x))}.")
  return jnp.asarray(x, jnp.int32)


def _check_prob_floor(min_prob):
  if not isinstance(min_prob, (int, float)) or not 0 < min_prob < 1:
    raise ValueError(f"`min_prob` must be a number in (0, 1); got "
                     f"{min_prob!r}.")


def _log_probs(logits, temperature, name):
  _common.check_positive(temperature, name)
  return jax.nn.log_softmax(logits / temperature, axis=-1)


# ---------------------------------------------------------------------------
# ULD.
# ---------------------------------------------------------------------------


def _sort_descending(x):
  """Sorted copy (decreasing) of non-negative floats, along the last axis.

  Non-negative IEEE floats order as their bit patterns do, and XLA:CPU
  sorts one integer operand about 4x faster than floats (measured in
  experiments/benchmark_alignment.py); on accelerators it is the same sort.
  """
  itype = jnp.int64 if x.dtype == jnp.float64 else jnp.int32
  bits = jax.lax.bitcast_convert_type(x, itype)
  bits = -jax.lax.sort(-bits, dimension=x.ndim - 1, is_stable=False)
  return jax.lax.bitcast_convert_type(bits, x.dtype)


def _ranks(x, x_sorted):
  """Position of each entry of `x` in `x_sorted` (decreasing; tied entries
  share the first position of their run)."""
  lead = x.shape[:-1]
  a = -x_sorted.reshape(-1, x.shape[-1])
  v = -x.reshape(-1, x.shape[-1])
  r = jax.vmap(lambda a, v: jnp.searchsorted(a, v, side="left"))(a, v)
  return r.reshape(lead + (x.shape[-1],))


@jax.custom_jvp
def _sorted_l1(p, q):
  """``sum_i |sort(p)_i - sort(q)_i|`` (decreasing, zero-padded).

  `p`, `q` >= 0 (probabilities), last axes of any lengths. Custom JVP: the
  derivative with respect to ``p_j`` is the sign of ``sort(p)_i -
  sort(q)_i`` at the position ``i`` of ``p_j`` in its sorted order (found by
  binary search: no permutation is carried through the sort); entries
  beyond the shorter vector count with sign +1 (``|x - 0| = x``).
  """
  return _sorted_l1_value(p, q)[0]


def _sorted_l1_value(p, q):
  p = jnp.where(p > 0, p, 0.0)  # +0 for -0 (its bits sort wrong) and NaN
  q = jnp.where(q > 0, q, 0.0)
  ps, qs = _sort_descending(p), _sort_descending(q)
  n = min(ps.shape[-1], qs.shape[-1])
  # Padding entries are 0 and probabilities are >= 0: |x - 0| = x.
  value = (jnp.sum(jnp.abs(ps[..., :n] - qs[..., :n]), axis=-1)
           + jnp.sum(ps[..., n:], axis=-1) + jnp.sum(qs[..., n:], axis=-1))
  return value, (p, q, ps, qs, n)


def _sorted_l1_jvp(primals, tangents):
  value, (p, q, ps, qs, n) = _sorted_l1_value(*primals)
  sign = jnp.sign(ps[..., :n] - qs[..., :n])
  out = jnp.zeros_like(value)
  for x, xs, dx, s in ((p, ps, tangents[0], sign),
                       (q, qs, tangents[1], -sign)):
    if isinstance(dx, jax.custom_derivatives.SymbolicZero):
      continue
    ones = jnp.ones(xs.shape[:-1] + (xs.shape[-1] - n,), s.dtype)
    per_position = jnp.concatenate([s, ones], axis=-1)
    slope = jnp.take_along_axis(per_position, _ranks(x, xs), axis=-1)
    out = out + jnp.sum(jnp.where(x > 0, slope, 0.0) * dx, axis=-1)
  return value, out


_sorted_l1.defjvp(_sorted_l1_jvp, symbolic_zeros=True)


def uld_distance(student_logprobs, teacher_logprobs, *, where=None) -> Array:
  r"""ULD between two (possibly unnormalized) distributions given as logs.

  .. math::
    \sum_i \bigl|\mathrm{sort}(e^{a})_{(i)} - \mathrm{sort}(e^{b})_{(i)}
    \bigr|

  with both sorted in decreasing order and the shorter zero-padded. The
  inputs are log-probabilities: the `log_softmax` of logits, or the merged
  group distributions of `merge_token_groups` (which do not sum to 1).

  Args:
    student_logprobs: ``[..., Vs]`` float array.
    teacher_logprobs: ``[..., Vt]`` (same leading dims); a constant.
    where: optional bool mask ``[...]``; masked entries give 0.

  Returns:
    float32 ``[...]``.

  >>> import jax.numpy as jnp
  >>> p = jnp.log(jnp.array([[0.1, 0.9]])); q = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
  >>> round(float(uld_distance(p, q)[0]), 6)  # |.9-.5| + |.1-.3| + |0-.2|
  0.8
  """
  s, t = _check_pair(student_logprobs, teacher_logprobs, "student_logprobs",
                     "teacher_logprobs")
  where = _common.check_where(where, s.shape[:-1])
  s, t = _common.mask_inputs(where, s, t)
  return _common.apply_where(_sorted_l1(jnp.exp(s), jnp.exp(t)), where)


def uld_loss(student_logits, teacher_logits, *, student_temperature=1.0,
             teacher_temperature=1.0, where=None) -> Array:
  r"""Universal Logit Distillation per position (Boizard et al., 2024).

  .. math::
    \mathrm{ULD} = \sum_i \bigl| \mathrm{sort}(\sigma(z^s / T_s))_{(i)} -
    \mathrm{sort}(\sigma(z^t / T_t))_{(i)} \bigr|

  (decreasing order, the smaller vocabulary zero-padded). Positions are
  paired as given (the paper pairs the answer tokens of both sequences by
  index; `extended_uld_loss` pairs them by text). The paper's objective is
  ``ce_weight * CE + distillation_weight * mean(ULD)`` (`uld_objective`).

  Args:
    student_logits: ``[..., Vs]`` float array.
    teacher_logits: ``[..., Vt]`` (same leading dims); a constant.
    student_temperature, teacher_temperature: softmax temperatures (> 0).
    where: optional bool mask ``[...]``; masked entries give 0.

  Returns:
    float32 ``[...]``, in ``[0, 2]``.

  References:
    Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal
    Logit Distillation Loss for LLMs", TMLR 2025;
    https://github.com/Nicolas-BZRD/llm-recipes.

  >>> import jax.numpy as jnp
  >>> s = jnp.log(jnp.array([[0.1, 0.9]])); t = jnp.log(jnp.array([[0.2, 0.5, 0.3]]))
  >>> round(float(uld_loss(s, t)[0]), 6)  # same as sorted [.9,.1,0] vs [.5,.3,.2]
  0.8
  """
  s, t = _check_pair(student_logits, teacher_logits, "student_logits",
                     "teacher_logits")
  where = _common.check_where(where, s.shape[:-1])
  s, t = _common.mask_inputs(where, s, t)
  ls = _log_probs(s, student_temperature, "student_temperature")
  lt = _log_probs(t, teacher_temperature, "teacher_temperature")
  return _common.apply_where(_sorted_l1(jnp.exp(ls), jnp.exp(lt)), where)


# ---------------------------------------------------------------------------
# Merging token groups (extended ULD).
# ---------------------------------------------------------------------------


def merge_token_groups(logits, targets, base_rows, row_groups, *,
                       temperature=1.0, min_prob: float = MIN_PROB) -> Array:
  r"""Log of each token group's merged (unnormalized) distribution.

  With :math:`\log p_r = \log\mathrm{softmax}(z_r / T)` per logit row,

  .. math::
    \log m_g = \log p_{b_g} + \sum_{r:\, g_r = g}
    \log \max\bigl(p_r[y_r],\ \text{min\_prob}\bigr)

  where :math:`b_g` is the group's base row (`base_rows`), :math:`g_r` the
  group row :math:`r`'s target probability multiplies into (`row_groups`)
  and :math:`y_r` its target token. `kd_jax.data.align.Aligner` builds the
  indices for the chain rule (base = the row predicting the group's last
  token) or TRL's "observed" rule (base = the first); see
  `kd_jax.data.align` for the rule.

  Args:
    logits: ``[B, R, V]`` float array (row ``r`` predicts ``targets[:, r]``).
    targets: int ``[B, R]``: the token each row predicts.
    base_rows: int ``[B, G]`` in ``[0, R)``.
    row_groups: int ``[B, R]``; values ``>= G`` belong to no group.
    temperature: softmax temperature (> 0).
    min_prob: floor of the scalar token probabilities (TRL: 1e-8).

  Returns:
    ``[B, G, V]`` log-probabilities, float32 (gradients flow into `logits`).
  """
  _common.check_float(logits, "logits")
  _common.check_rank(logits, "logits", ndim=3, what="([B, R, vocab])")
  _check_prob_floor(min_prob)
  b, r, _ = jnp.shape(logits)
  targets = _check_int(targets, "targets", shape=(b, r))
  row_groups = _check_int(row_groups, "row_groups", shape=(b, r))
  base_rows = _check_int(base_rows, "base_rows", ndim=2)
  if jnp.shape(base_rows)[0] != b:
    raise ValueError(f"`base_rows` must have shape [{b}, G]; got "
                     f"{tuple(jnp.shape(base_rows))}.")
  g = jnp.shape(base_rows)[1]
  x = jnp.asarray(logits, _compute_dtype(logits))
  logp = _log_probs(x, temperature, "temperature")
  tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  tok = jnp.maximum(tok, math.log(min_prob))
  scalars = jax.vmap(lambda v, s: jax.ops.segment_sum(
      v, s, num_segments=g, mode="drop"))(tok, row_groups)
  base = jnp.take_along_axis(logp, base_rows[..., None], axis=1)
  return base + scalars[..., None]


def aligned_log_probs(student_logits, teacher_logits, student_targets,
                      teacher_targets, alignment: TokenAlignment, *,
                      student_temperature=1.0, teacher_temperature=1.0,
                      min_prob: float = MIN_PROB):
  """``(student [B, G, Vs], teacher [B, G, Vt])`` merged log-probabilities.

  `merge_token_groups` on both sides with the indices of `alignment`; the
  teacher's is a constant.
  """
  s = merge_token_groups(student_logits, student_targets,
                         alignment.student_base, alignment.student_group,
                         temperature=student_temperature, min_prob=min_prob)
  t = merge_token_groups(jax.lax.stop_gradient(teacher_logits),
                         teacher_targets, alignment.teacher_base,
                         alignment.teacher_group,
                         temperature=teacher_temperature, min_prob=min_prob)
  if s.shape[:2] != t.shape[:2]:
    raise ValueError(f"student and teacher groups differ: {s.shape[:2]} vs "
                     f"{t.shape[:2]} (both bases must be [B, G]).")
  return s, jax.lax.stop_gradient(t)


# ---------------------------------------------------------------------------
# Hybrid: matched tokens compared directly, the rest with ULD.
# ---------------------------------------------------------------------------


def _is_number(x) -> bool:
  return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


def matched_jsd(student_logprobs, teacher_logprobs, *, beta=0.5,
                min_prob: float = MIN_PROB, where=None) -> Array:
  r"""TRL GOLD's generalized JSD on (sub-)vectors of probabilities.

  With :math:`a = \log\max(p^s, \epsilon)`, :math:`b = \log\max(p^t,
  \epsilon)` (:math:`\epsilon` = `min_prob`) and
  :math:`\log m = \mathrm{logaddexp}(a + \log(1-\beta), b + \log\beta)`,

  .. math::
    \mathrm{JSD}_\beta = \beta \sum_i e^{b_i}(b_i - \log m_i) +
    (1-\beta) \sum_i e^{a_i}(a_i - \log m_i),

  and ``beta = 0`` / ``1`` give :math:`\sum e^{b}(b - a)` (forward KL) /
  :math:`\sum e^{a}(a - b)` (reverse KL), as TRL's ``generalized_jsd_loss``
  with ``logits_are_probs=True``. The vectors are *not* renormalized (they
  are the matched entries of full or merged distributions).

  Args:
    student_logprobs: ``[..., M]`` float (logs of probabilities).
    teacher_logprobs: ``[..., M]``, same shape; a constant.
    beta: in ``[0, 1]`` (a Python number: its endpoints are static).
    min_prob: probability floor before the log (TRL: 1e-8).
    where: optional bool mask ``[...]``.

  Returns:
    float32 ``[...]``.

  >>> import jax.numpy as jnp
  >>> a = jnp.log(jnp.array([[0.5, 0.5]])); b = jnp.log(jnp.array([[0.9, 0.1]]))
  >>> round(float(matched_jsd(a, b, beta=0.0)[0]), 5)  # KL(teacher || student)
  0.36806
  """
  if not _is_number(beta) or not 0 <= beta <= 1:
    raise ValueError(f"`beta` must be a number in [0, 1]; got {beta!r}.")
  _check_prob_floor(min_prob)
  _common.check_same_shape(student_logprobs, teacher_logprobs,
                           "student_logprobs", "teacher_logprobs")
  s, t = _check_pair(student_logprobs, teacher_logprobs, "student_logprobs",
                     "teacher_logprobs")
  where = _common.check_where(where, s.shape[:-1])
  s, t = _common.mask_inputs(where, s, t)
  floor = math.log(min_prob)
  a, b = jnp.maximum(s, floor), jnp.maximum(t, floor)
  if beta == 0:
    out = jnp.sum(jnp.exp(b) * (b - a), axis=-1)
  elif beta == 1:
    out = jnp.sum(jnp.exp(a) * (a - b), axis=-1)
  else:
    log_m = jnp.logaddexp(a + math.log1p(-beta), b + math.log(beta))
    out = (beta * jnp.sum(jnp.exp(b) * (b - log_m), axis=-1)
           + (1 - beta) * jnp.sum(jnp.exp(a) * (a - log_m), axis=-1))
  return _common.apply_where(out, where)


def _check_matched_ids(student_ids, teacher_ids, vs, vt):
  s = _check_int(student_ids, "student_ids", ndim=1)
  t = _check_int(teacher_ids, "teacher_ids", shape=jnp.shape(student_ids))
  for ids, name, v in ((student_ids, "student_ids", vs),
                       (teacher_ids, "teacher_ids", vt)):
    try:
      ids = np.asarray(ids)
    except (jax.errors.TracerArrayConversionError,
            jax.errors.ConcretizationTypeError):
      continue  # traced ids: checked by the caller
    if ids.size and (ids.min() < 0 or ids.max() >= v):
      raise ValueError(f"`{name}` must be in [0, {v}); got "
                       f"{ids.min()}..{ids.max()}.")
  return s, t


def _hybrid_weights(matched_weight, unmatched_weight, m, vt):
  if (matched_weight is None) != (unmatched_weight is None):
    raise ValueError("`matched_weight` and `unmatched_weight` must both be "
                     "None (adaptive: M / V_t) or both be numbers; got "
                     f"{matched_weight!r} and {unmatched_weight!r}.")
  if matched_weight is None:
    matched_weight = m / max(1, vt)
    return matched_weight, 1.0 - matched_weight
  _common.check_nonnegative(matched_weight, "matched_weight")
  _common.check_nonnegative(unmatched_weight, "unmatched_weight")
  return matched_weight, unmatched_weight


def hybrid_distance(student_logprobs, teacher_logprobs, student_ids,
                    teacher_ids, *, beta=0.5, matched_weight=None,
                    unmatched_weight=None, min_prob: float = MIN_PROB,
                    where=None) -> Array:
  r"""GOLD's hybrid loss between two distributions given as logs.

  With :math:`M` tokens both vocabularies hold (``student_ids[k]`` and
  ``teacher_ids[k]`` spell the same string,
  `kd_jax.data.align.vocab_mapping`),

  .. math::
    w_m\,\mathrm{JSD}_\beta\bigl(p^s[\text{student\_ids}],\
    p^t[\text{teacher\_ids}]\bigr) + w_u\,\mathrm{ULD}\bigl(p^s \odot
    \bar 1_{\text{matched}},\ p^t \odot \bar 1_{\text{matched}}\bigr)

  (`matched_jsd`; ULD of the vectors with their matched entries zeroed).
  ``matched_weight = unmatched_weight = None`` is TRL's adaptive weighting
  :math:`w_m = M / V_t`, :math:`w_u = 1 - w_m` (:math:`V_t` the teacher's
  last-axis width).

  Args:
    student_logprobs: ``[..., Vs]`` float (log-softmax or merged groups).
    teacher_logprobs: ``[..., Vt]`` (same leading dims); a constant.
    student_ids, teacher_ids: int ``[M]`` matched ids (equal lengths).
    beta: generalized JSD weight in ``[0, 1]`` (TRL ``GOLDConfig.beta``).
    matched_weight, unmatched_weight: both numbers, or both None.
    min_prob: probability floor of the JSD (TRL: 1e-8).
    where: optional bool mask ``[...]``.

  Returns:
    float32 ``[...]``.
  """
  s, t = _check_pair(student_logprobs, teacher_logprobs, "student_logprobs",
                     "teacher_logprobs")
  vs, vt = s.shape[-1], t.shape[-1]
  s_ids, t_ids = _check_matched_ids(student_ids, teacher_ids, vs, vt)
  w_m, w_u = _hybrid_weights(matched_weight, unmatched_weight,
                             int(s_ids.shape[0]), vt)
  where = _common.check_where(where, s.shape[:-1])
  s, t = _common.mask_inputs(where, s, t)
  matched = matched_jsd(jnp.take(s, s_ids, axis=-1),
                        jnp.take(t, t_ids, axis=-1), beta=beta,
                        min_prob=min_prob)
  ps = jnp.exp(s).at[..., s_ids].set(0.0)
  pt = jnp.exp(t).at[..., t_ids].set(0.0)
  out = w_m * matched + w_u * _sorted_l1(ps, pt)
  return _common.apply_where(out, where)


def hybrid_uld_loss(student_logits, teacher_logits, student_ids, teacher_ids,
                    *, student_temperature=1.0, teacher_temperature=1.0,
                    beta=0.5, matched_weight=None, unmatched_weight=None,
                    min_prob: float = MIN_PROB, where=None) -> Array:
  """`hybrid_distance` of the tempered softmaxes, positions paired as given.

  Args: as `uld_loss` and `hybrid_distance`. Returns float32 ``[...]``.
  """
  s, t = _check_pair(student_logits, teacher_logits, "student_logits",
                     "teacher_logits")
  where = _common.check_where(where, s.shape[:-1])
  s, t = _common.mask_inputs(where, s, t)  # before the softmax (NaN rows)
  ls = _log_probs(s, student_temperature, "student_temperature")
  lt = _log_probs(t, teacher_temperature, "teacher_temperature")
  return hybrid_distance(ls, lt, student_ids, teacher_ids, beta=beta,
                         matched_weight=matched_weight,
                         unmatched_weight=unmatched_weight, min_prob=min_prob,
                         where=where)


def extended_uld_loss(student_logits, teacher_logits, student_targets,
                      teacher_targets, alignment: TokenAlignment, *,
                      student_temperature=1.0, teacher_temperature=1.0,
                      min_prob: float = MIN_PROB, matched_ids=None,
                      beta=0.5, matched_weight=None,
                      unmatched_weight=None) -> Array:
  r"""TRL GOLD's extended ULD (and hybrid) per aligned token group.

  The two sequences are grouped where their text coincides
  (`kd_jax.data.align.Aligner.align_batch` gives `alignment`), each group's
  probabilities merged (`merge_token_groups`), and the merged distributions
  compared with `uld_distance` -- or with `hybrid_distance` when
  ``matched_ids = (student_ids, teacher_ids)`` is given (TRL's
  ``uld_use_hybrid_loss``).

  Args:
    student_logits: ``[B, Rs, Vs]`` (row ``r`` predicts token ``r + 1`` of
      the student sequence: the logits of ``tokens[:, :-1]``).
    teacher_logits: ``[B, Rt, Vt]``; a constant.
    student_targets, teacher_targets: int ``[B, Rs]`` / ``[B, Rt]``
      (``tokens[:, 1:]`` of each side).
    alignment: `TokenAlignment` (``[B, G]`` groups).
    student_temperature, teacher_temperature: softmax temperatures.
    min_prob: floor of merged scalar probabilities (and of the hybrid JSD).
    matched_ids: optional ``(student_ids [M], teacher_ids [M])``.
    beta, matched_weight, unmatched_weight: the hybrid's (`hybrid_distance`).

  Returns:
    float32 ``[B, G]``, 0 where ``alignment.group_mask`` is False. TRL's
    per-sequence value is `sequence_mean` of it.
  """
  s, t = aligned_log_probs(student_logits, teacher_logits, student_targets,
                           teacher_targets, alignment,
                           student_temperature=student_temperature,
                           teacher_temperature=teacher_temperature,
                           min_prob=min_prob)
  where = alignment.group_mask
  if matched_ids is None:
    return uld_distance(s, t, where=where)
  return hybrid_distance(s, t, *matched_ids, beta=beta,
                         matched_weight=matched_weight,
                         unmatched_weight=unmatched_weight, min_prob=min_prob,
                         where=where)


# ---------------------------------------------------------------------------
# Reductions (TRL's) and the tokenizer-free metric.
# ---------------------------------------------------------------------------


def sequence_mean(values, where) -> Array:
  """``[B]`` mean of ``values [B, G]`` over each row's ``where`` entries
  (0 for a row without any, as TRL's per-sequence distillation term)."""
  _common.check_rank(values, "values", ndim=2, what="([B, G])")
  where = _common.check_where(where, jnp.shape(values))
  total = jnp.sum(jnp.where(where, values, 0.0), axis=-1)
  return total / jnp.maximum(jnp.sum(where, axis=-1), 1)


def uld_objective(ce, ce_where, distill, distill_where, *,
                  crossentropy_weight=0.0, distillation_weight=1.0) -> Array:
  r"""TRL ``ULDLoss``'s total: CE token mean plus mean per-sequence ULD.

  .. math::
    w_{ce} \frac{\sum_{b,r} m_{br}\,\mathrm{ce}_{br}}{\sum m_{br}} +
    w_{d}\,\frac1B \sum_b \frac{\sum_g n_{bg} d_{bg}}{\max(1, \sum_g n_{bg})}

  (the authors' code and TRL: the CE of the student's targets averaged over
  the batch's target tokens, the distillation term over each sequence's
  aligned positions, then over sequences). Defaults as TRL's ``GOLDConfig``
  (``uld_crossentropy_weight=0``, ``uld_distillation_weight=1``).

  Args:
    ce: ``[B, R]`` per-token cross-entropy of the student.
    ce_where: bool ``[B, R]`` (the target tokens).
    distill: ``[B, G]`` per-group distance (`extended_uld_loss`,
      `uld_loss`, ...).
    distill_where: bool ``[B, G]``.
    crossentropy_weight, distillation_weight: non-negative weights.

  Returns:
    float32 scalar.
  """
  _common.check_nonnegative(crossentropy_weight, "crossentropy_weight")
  _common.check_nonnegative(distillation_weight, "distillation_weight")
  ce_where = _common.check_where(ce_where, jnp.shape(ce))
  ce_mean = (jnp.sum(jnp.where(ce_where, ce, 0.0))
             / jnp.maximum(jnp.sum(ce_where), 1))
  return (crossentropy_weight * ce_mean + distillation_weight
          * jnp.mean(sequence_mean(distill, distill_where)))


def target_bytes(targets, byte_lengths, *, where=None) -> Array:
  """int32 ``[...]``: the bytes each target token spells (0 where masked).

  `byte_lengths` is the tokenizer's table
  (`kd_jax.data.align.token_byte_lengths`, int ``[V]``).
  """
  targets = _check_int(targets, "targets")
  byte_lengths = _check_int(byte_lengths, "byte_lengths", ndim=1)
  where = _common.check_where(where, jnp.shape(targets))
  out = jnp.take(byte_lengths, targets, mode="fill", fill_value=0)
  return _common.apply_where(out, where).astype(jnp.int32)


def bits_per_byte(nll_sum, num_bytes) -> Array:
  r"""Bits per byte :math:`\sum \mathrm{nll} / (n_{bytes} \ln 2)`.

  The tokenizer-free measure of a language model (Gao et al., "The Pile",
  2020): the summed negative log-likelihood (nats) of the predicted tokens
  over the UTF-8 bytes they spell (`target_bytes`), so models with different
  tokenizers compare on the same text. Pass character counts for bits per
  character.

  >>> round(float(bits_per_byte(2 * 0.6931471805599453, 2)), 6)
  1.0
  """
  return jnp.asarray(nll_sum, jnp.float32) / (
      jnp.asarray(num_bytes, jnp.float32) * math.log(2.0))
