r"""Token-level distillation losses for language models at full vocabulary size.

At V = 128k-152k classes and 8k-64k tokens per step, the student's and the
teacher's `[N, V]` logits alone are tens of GB in float32. This module avoids
them:

* `fused_head_divergence`: the divergences of `kd_jax.losses.divergences`
  (forward/reverse KL, generalized JSD, TVD) computed straight from the LM-head
  inputs (hidden states + kernel), `chunk_size` tokens at a time, value and
  gradient, optionally with the hard-label cross-entropy in the same pass.
* `topk_kd_loss`: KD against a teacher stored as its top-k log-probabilities
  per token (offline distillation), with three ways to treat the tail;
  `fused_head_topk_kd` is its chunked LM-head version.

Conventions as in `kd_jax.losses.divergences`: per-token float32 output of
shape `[...]`, `where=` masks (masked tokens give 0, finite gradients), the
teacher is a constant, no `T^2` factor, bfloat16 inputs computed in float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.losses import _chunked_head
from kd_jax.losses import _common
from kd_jax.losses import divergences

Array = jax.Array

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
TAILS = ("bucket", "renormalize", "ignore")


# ---------------------------------------------------------------------------
# Validation helpers.
# ---------------------------------------------------------------------------


def _is_number(x) -> bool:
  return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


def _check_static_positive(value, name):
  if not _is_number(value):
    raise TypeError(f"`{name}` must be a Python number here (it is static "
                    f"in the chunked computation); got {type(value).__name__}.")
  _common.check_positive(value, name)


def _check_chunk_size(chunk_size):
  if (not isinstance(chunk_size, (int, np.integer))
      or isinstance(chunk_size, bool) or chunk_size < 1):
    raise ValueError(
        f"`chunk_size` must be a positive int; got {chunk_size!r}.")


def _check_choice(value, name, choices):
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {choices}; got {value!r}.")


def _check_head(hidden, kernel, bias, who):
  """Checks `{who}_hidden [..., D]`, `{who}_kernel [D, V]`, `{who}_bias [V]`."""
  _common.check_float(hidden, f"{who}_hidden")
  _common.check_float(kernel, f"{who}_kernel")
  _common.check_rank(hidden, f"{who}_hidden", min_ndim=1, what="([..., D])")
  _common.check_rank(kernel, f"{who}_kernel", ndim=2, what="([D, V])")
  d, v = jnp.shape(kernel)
  if jnp.shape(hidden)[-1] != d:
    raise ValueError(
        f"`{who}_hidden` has {jnp.shape(hidden)[-1]} features but "
        f"`{who}_kernel` has shape {(d, v)}; expected [{jnp.shape(hidden)[-1]}"
        ", V].")
  if bias is not None:
    _common.check_float(bias, f"{who}_bias")
    if tuple(jnp.shape(bias)) != (v,):
      raise ValueError(f"`{who}_bias` must have shape ({v},) (the kernel's "
                       f"vocabulary); got {tuple(jnp.shape(bias))}.")


def _check_same_lead(a, b, name_a, name_b, what="tokens"):
  if tuple(jnp.shape(a)[:-1]) != tuple(jnp.shape(b)[:-1]):
    raise ValueError(
        f"`{name_a}` and `{name_b}` must have the same leading ({what}) "
        f"dims; got {tuple(jnp.shape(a))} and {tuple(jnp.shape(b))}.")


def _compute_dtype(*arrays):
  return jnp.promote_types(
      jnp.result_type(*[a for a in arrays if a is not None]), jnp.float32)


# ---------------------------------------------------------------------------
# Chunked driver shared by the fused losses.
# ---------------------------------------------------------------------------


def _run_chunked(loss_fn, hidden, kernel, bias, tokens_teacher, teacher_consts,
                 where, labels, chunk_size, dtype):
  """Flattens tokens, pads to chunks, runs the custom-VJP engine.

  `tokens_teacher`: pytree of per-token teacher arrays `[..., X]` (same
  leading dims as `hidden`); `teacher_consts`: pytree closed over.
  Returns `(loss, ce)`, both `[...]`.
  """
  lead = tuple(jnp.shape(hidden)[:-1])
  n = math.prod(lead)
  chunk = max(1, min(int(chunk_size), n))
  valid = (jnp.ones((n,), bool) if where is None else where.reshape(n))
  flat = lambda x: x.reshape((n,) + jnp.shape(x)[len(lead):])
  # Zero masked rows first: NaN/inf there must not reach value or gradient.
  hidden = jnp.where(valid[:, None], flat(hidden), 0)
  tokens_teacher = jax.tree.map(
      lambda x: jnp.where(valid.reshape((n,) + (1,) * (x.ndim - len(lead))),
                          flat(jax.lax.stop_gradient(x)), 0), tokens_teacher)
  with_ce = labels is not None
  labels = (jnp.zeros((n,), jnp.int32) if labels is None
            else jnp.where(valid, labels.reshape(n), 0))
  if bias is None:
    bias = jnp.zeros((kernel.shape[-1],), dtype)
  ck = functools.partial(_chunked_head.chunk_tokens, n_tokens=n, chunk=chunk)
  spec = _chunked_head.HeadLoss(loss_fn, with_ce=with_ce,
                                dtype=dtype)
  div, ce = _chunked_head.head_losses(
      spec, ck(hidden), kernel, bias, jax.tree.map(ck, tokens_teacher),
      jax.lax.stop_gradient(teacher_consts), ck(valid, fill=False), ck(labels))
  unchunk = lambda x: x.reshape(-1)[:n].reshape(lead)
  return unchunk(div), unchunk(ce)


def _divergence_chunk(name, beta, temperature, s, teacher_hidden,
                      teacher_consts, valid):
  kernel, bias = teacher_consts
  t = jnp.matmul(teacher_hidden, kernel, preferred_element_type=s.dtype)
  t = t + bias
  kw = dict(temperature=temperature, where=valid)
  if name == "forward_kl":
    return divergences.forward_kl(s, t, **kw)
  if name == "reverse_kl":
    return divergences.reverse_kl(s, t, **kw)
  if name == "jsd":
    return divergences.js_divergence(s, t, beta=beta, **kw)
  return divergences.total_variation(s, t, **kw)


# ---------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------


def _check_divergence_args(divergence, temperature, beta, chunk_size):
  _check_choice(divergence, "divergence", DIVERGENCES)
  _check_static_positive(temperature, "temperature")
  if divergence == "jsd":
    if not _is_number(beta):
      raise TypeError("`beta` must be a Python number here; got "
                      f"{type(beta).__name__}.")
    divergences._check_beta_unit(beta)  # pylint: disable=protected-access
  _check_chunk_size(chunk_size)


def fused_head_divergence(student_hidden, student_kernel, teacher_hidden,
                          teacher_kernel, *, divergence="forward_kl", beta=0.5,
                          temperature=1.0, where=None, labels=None,
                          chunk_size=1024, student_bias=None,
                          teacher_bias=None, vocab_size=None):
  r"""Per-token divergence of two LM heads without materializing `[N, V]`.

  Equals `div(student_hidden @ student_kernel + student_bias,
  teacher_hidden @ teacher_kernel + teacher_bias, ...)` with `div` one of
  `forward_kl`, `reverse_kl`, `js_divergence` (`beta`, TRL endpoints
  included) or `total_variation`, computed `chunk_size` tokens at a time:
  peak memory is `O(chunk_size · V)` instead of `O(N · V)`, in the value and
  in the gradient (custom VJP, see `kd_jax.losses._chunked_head`). Gradients
  flow to `student_hidden`, `student_kernel` and `student_bias`; the teacher
  is a constant. The matmuls accumulate in float32 (bfloat16 inputs stay
  bfloat16 in memory); the result is float32.

  With `labels`, also returns the temperature-1 cross-entropy
  `logsumexp(z^s) - z^s_y` per token, from the same student logits (what
  Liger-Kernel's `weight_hard_loss` saves).

  The gradient costs no extra matmul when the output cotangent is the same
  for every unmasked token (`jnp.mean(loss)`, `sum(loss * mask) / count`);
  any other reduction triggers a second chunked pass (still bounded memory).

  Args:
    student_hidden: `[..., Ds]` float (e.g. `[B, T, Ds]`).
    student_kernel: `[Ds, V]` (for tied embeddings, the embedding transposed).
    teacher_hidden: `[..., Dt]`, same leading dims.
    teacher_kernel: `[Dt, V']`; `V' != V` needs `vocab_size`.
    divergence: `"forward_kl"`, `"reverse_kl"`, `"jsd"` or `"tvd"`.
    beta: JSD interpolation weight in `[0, 1]` (Python number).
    temperature: softmax temperature `T > 0` (Python number), both sides.
    where: optional bool mask `[...]`; masked tokens give 0.
    labels: optional int `[...]` in `[0, V)` (any value where masked).
    chunk_size: tokens per chunk (the last chunk is padded and masked).
    student_bias, teacher_bias: optional `[V]`, `[V']`.
    vocab_size: true vocabulary size; only the first `vocab_size` columns of
      both heads are used (padded heads of unequal width).

  Returns:
    float32 `[...]`, or `(divergence, cross_entropy)` when `labels` is given.

  References:
    Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training",
    2024 (fused linear JSD); Agarwal et al., "On-Policy Distillation of
    Language Models" (GKD), ICLR 2024.

  >>> import jax, jax.numpy as jnp
  >>> from kd_jax import losses
  >>> ks = jax.random.split(jax.random.key(0), 4)
  >>> hs = jax.random.normal(ks[0], (2, 5, 8)); ws = jax.random.normal(ks[1], (8, 32))
  >>> ht = jax.random.normal(ks[2], (2, 5, 16)); wt = jax.random.normal(ks[3], (16, 32))
  >>> fused = fused_head_divergence(hs, ws, ht, wt, chunk_size=4)
  >>> fused.shape
  (2, 5)
  >>> bool(jnp.allclose(fused, losses.forward_kl(hs @ ws, ht @ wt), rtol=1e-5))
  True
  """
  _check_divergence_args(divergence, temperature, beta, chunk_size)
  _check_head(student_hidden, student_kernel, student_bias, "student")
  _check_head(teacher_hidden, teacher_kernel, teacher_bias, "teacher")
  _check_same_lead(student_hidden, teacher_hidden, "student_hidden",
                   "teacher_hidden")
  lead = tuple(jnp.shape(student_hidden)[:-1])
  ws, wt = divergences.slice_vocab(
      student_kernel, teacher_kernel, vocab_size,
      student_name="student_kernel", teacher_name="teacher_kernel")
  v = ws.shape[-1]
  bs = None if student_bias is None else student_bias[:v]
  bt = (jnp.zeros((v,)) if teacher_bias is None else teacher_bias[:v])
  where = _common.check_where(where, lead)
  if labels is not None:
    labels = _common.check_labels(labels, lead)
  dtype = _compute_dtype(student_hidden, ws, teacher_hidden, wt, bs, bt)
  loss_fn = functools.partial(_divergence_chunk, divergence, beta, temperature)
  div, ce = _run_chunked(loss_fn, student_hidden, ws, bs, teacher_hidden,
                         (wt, bt.astype(dtype)), where, labels, chunk_size,
                         dtype)
  return div if labels is None else (div, ce)


# ---------------------------------------------------------------------------
# Sparse (top-k) teacher.
# ---------------------------------------------------------------------------


def _log1mexp(x):
  """`log(1 - exp(x))` for `x <= 0` (clipped), `-inf` at 0; teacher side."""
  x = jnp.minimum(x, 0.0)
  return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)),
                   jnp.log1p(-jnp.exp(x)))


def _xlogy_sum(log_p, log_r):
  """`sum_k p_k (log p_k - log r_k)` with `0 log 0 = 0` (p from `log_p`)."""
  p = jnp.exp(log_p)
  return jnp.sum(jnp.where(p > 0, p * (log_p - log_r), 0.0), axis=-1)


def _student_log_tail(u, idx, lse_u):
  """`(log sum_{c not in idx} softmax(u)_c, the tail is non-empty)`.

  A logsumexp over the logits with the top-k classes set to -inf: exact,
  unlike `log(1 - sum_k q_k)` when the top-k hold almost all the mass.
  """
  in_topk = jnp.put_along_axis(jnp.zeros(u.shape, bool), idx, True, axis=-1,
                               inplace=False)
  tail = jnp.where(in_topk, -jnp.inf, u)
  m = jax.lax.stop_gradient(jnp.max(tail, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  z = jnp.sum(jnp.exp(tail - m), axis=-1)
  has_tail = z > 0
  log_tail = m[..., 0] + jnp.log(jnp.where(has_tail, z, 1.0)) - lse_u
  return log_tail, has_tail


def _topk_kl(u, lp, idx, tail):
  """Per-row top-k KD of student logits `u` (already divided by T)."""
  u_k = jnp.take_along_axis(u, idx, axis=-1)
  if tail == "renormalize":
    return _xlogy_sum(jax.nn.log_softmax(lp, axis=-1),
                      jax.nn.log_softmax(u_k, axis=-1))
  lse_u = jax.nn.logsumexp(u, axis=-1)
  log_q_k = u_k - lse_u[..., None]
  if tail == "ignore":
    return _xlogy_sum(jax.nn.log_softmax(lp, axis=-1), log_q_k)
  head = _xlogy_sum(lp, log_q_k)
  log_p_tail = _log1mexp(jax.nn.logsumexp(lp, axis=-1))
  p_tail = jnp.exp(log_p_tail)
  log_q_tail, has_tail = _student_log_tail(u, idx, lse_u)
  use = (p_tail > 0) & has_tail
  safe_log_p_tail = jnp.where(use, log_p_tail, 0.0)
  return head + jnp.where(use, p_tail * (safe_log_p_tail - log_q_tail), 0.0)


def _check_topk(student_logits, logprobs, indices, tail, temperature):
  _check_choice(tail, "tail", TAILS)
  _common.check_positive(temperature, "temperature")
  _common.check_float(logprobs, "teacher_topk_logprobs")
  dt = jnp.result_type(indices)
  if not jnp.issubdtype(dt, jnp.integer):
    raise TypeError("`teacher_topk_indices` must hold integer class indices; "
                    f"got dtype {dt}.")
  _common.check_rank(logprobs, "teacher_topk_logprobs", min_ndim=1,
                     what="([..., k])")
  _common.check_same_shape(logprobs, indices, "teacher_topk_logprobs",
                           "teacher_topk_indices")
  _check_same_lead(student_logits, logprobs, "student_logits",
                   "teacher_topk_logprobs")
  k, v = jnp.shape(logprobs)[-1], jnp.shape(student_logits)[-1]
  if not 1 <= k <= v:
    raise ValueError(f"top-k size k={k} must be in [1, {v}] (the student's "
                     "vocabulary).")


def topk_kd_loss(student_logits, teacher_topk_logprobs, teacher_topk_indices,
                 *, temperature=1.0, tail="bucket", where=None,
                 vocab_size=None) -> Array:
  r"""KD against a sparse teacher: its top-k log-probabilities per token.

  With `p_k = exp(teacher_topk_logprobs)` (log-softmax over the teacher's full
  vocabulary at the distillation temperature, as a cache stores it),
  `q = softmax(student_logits / T)` over the full vocabulary, `K` the k
  indices and `p̃ = p / sum_K p` (`q̃` likewise):

  * `tail="bucket"`: the exact KL between both distributions coarsened to the
    k classes plus one "everything else" class,
    :math:`\sum_K p_k \log(p_k/q_k) + p_R \log(p_R/q_R)`, with
    :math:`p_R = 1 - \sum_K p_k` and :math:`q_R = 1 - \sum_K q_k` (the
    student tail as a logsumexp over the classes outside `K`, exact). By the
    data-processing inequality it is a lower bound of the full KL.
  * `tail="renormalize"`: :math:`\mathrm{KL}(\tilde p \| \tilde q)`; depends
    only on the student's logits at `K` (truncate-and-renormalize).
  * `tail="ignore"`: :math:`\sum_K \tilde p_k (\log \tilde p_k - \log q_k)`;
    the student's mass outside `K` is not penalized. It differs from the
    cross-entropy :math:`-\sum_K \tilde p_k \log q_k` of MaxText's sparse KL
    only by the teacher's (constant) entropy: same gradient.

  With `k = V` all three equal `forward_kl` (up to rounding). No `T^2` factor.
  Indices must be distinct and in `[0, V)`; the log-probabilities must be
  `<= 0` with `logsumexp <= 0` (the tail mass is clipped at 0).

  Args:
    student_logits: `[..., V]` float.
    teacher_topk_logprobs: `[..., k]` float; a constant.
    teacher_topk_indices: `[..., k]` int, the classes of those log-probs.
    temperature: `T > 0`, divides the student's logits only.
    tail: `"bucket"`, `"renormalize"` or `"ignore"`.
    where: optional bool mask `[...]`; masked tokens give 0.
    vocab_size: optional true vocabulary size: the student's logits beyond it
      (a padded head) are dropped.

  Returns:
    float32 `[...]`.

  References:
    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
    2015; Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge
    Distillation in LLMs", ACL 2025 (top-k caching and its bias); MaxText
    (github.com/AI-Hypercomputer/maxtext) sparse-KL distillation.

  >>> import jax, jax.numpy as jnp
  >>> from kd_jax import losses
  >>> s, t = jax.random.normal(jax.random.key(0), (2, 3, 10))
  >>> lp = jax.nn.log_softmax(t)
  >>> top, idx = jax.lax.top_k(lp, 10)   # k = V: every tail mode is forward KL
  >>> fkl = losses.forward_kl(s, t)
  >>> all(bool(jnp.allclose(topk_kd_loss(s, top, idx, tail=m), fkl, atol=1e-6))
  ...     for m in ("bucket", "renormalize", "ignore"))
  True
  """
  if vocab_size is not None:
    student_logits, _ = divergences.slice_vocab(
        student_logits, student_logits, vocab_size)
  _common.check_float(student_logits, "student_logits")
  _common.check_rank(student_logits, "student_logits", min_ndim=1,
                     what="([..., V])")
  _check_topk(student_logits, teacher_topk_logprobs, teacher_topk_indices,
              tail, temperature)
  dtype = _compute_dtype(student_logits, teacher_topk_logprobs)
  s = jnp.asarray(student_logits, dtype)
  lp = jax.lax.stop_gradient(jnp.asarray(teacher_topk_logprobs, dtype))
  idx = jnp.asarray(teacher_topk_indices, jnp.int32)
  where = _common.check_where(where, s.shape[:-1])
  if where is not None:
    k = lp.shape[-1]
    w = where[..., None]
    s = jnp.where(w, s, 0.0)
    lp = jnp.where(w, lp, -math.log(k))  # a valid (uniform) stand-in
    idx = jnp.where(w, idx, jnp.arange(k, dtype=jnp.int32))
  out = _topk_kl(s / temperature, lp, idx, tail)
  return _common.apply_where(out, where)


def _topk_chunk(temperature, tail, s, teacher_chunk, teacher_consts, valid):
  del teacher_consts
  lp, idx = teacher_chunk
  return topk_kd_loss(s, lp, idx, temperature=temperature, tail=tail,
                      where=valid)


def fused_head_topk_kd(student_hidden, student_kernel, teacher_topk_logprobs,
                       teacher_topk_indices, *, temperature=1.0,
                       tail="bucket", where=None, labels=None,
                       chunk_size=1024, student_bias=None, vocab_size=None):
  r"""`topk_kd_loss` of the student logits `student_hidden @ student_kernel`.

  Chunked like `fused_head_divergence` (bounded memory in value and
  gradient; gradients w.r.t. the student hidden states, kernel and bias), for
  offline distillation from cached top-k teacher log-probabilities. With
  `labels`, returns `(kd, cross_entropy)` per token (cross-entropy at
  temperature 1, from the same student logits).

  Args:
    student_hidden: `[..., D]` float.
    student_kernel: `[D, V]`; `student_bias`: optional `[V]`.
    teacher_topk_logprobs, teacher_topk_indices: `[..., k]` (see
      `topk_kd_loss`).
    temperature: `T > 0` (Python number), divides the student's logits.
    tail: `"bucket"`, `"renormalize"` or `"ignore"` (see `topk_kd_loss`).
    where: optional bool mask `[...]`; labels: optional int `[...]`.
    chunk_size: tokens per chunk.
    vocab_size: optional true vocabulary size (drops padded head columns).

  Returns:
    float32 `[...]`, or `(kd, cross_entropy)` with `labels`.

  >>> import jax, jax.numpy as jnp
  >>> ks = jax.random.split(jax.random.key(1), 3)
  >>> h = jax.random.normal(ks[0], (6, 4)); w = jax.random.normal(ks[1], (4, 20))
  >>> top, idx = jax.lax.top_k(jax.nn.log_softmax(jax.random.normal(ks[2], (6, 20))), 5)
  >>> fused = fused_head_topk_kd(h, w, top, idx, chunk_size=4)
  >>> bool(jnp.allclose(fused, topk_kd_loss(h @ w, top, idx), rtol=1e-5))
  True
  """
  _check_static_positive(temperature, "temperature")
  _check_chunk_size(chunk_size)
  _check_head(student_hidden, student_kernel, student_bias, "student")
  kernel, bias = student_kernel, student_bias
  if vocab_size is not None:
    kernel, _ = divergences.slice_vocab(kernel, kernel, vocab_size,
                                        student_name="student_kernel")
    bias = None if bias is None else bias[:vocab_size]
  lead = tuple(jnp.shape(student_hidden)[:-1])
  probe = jax.ShapeDtypeStruct(lead + (kernel.shape[-1],), kernel.dtype)
  _check_topk(probe, teacher_topk_logprobs, teacher_topk_indices, tail,
              temperature)
  where = _common.check_where(where, lead)
  if labels is not None:
    labels = _common.check_labels(labels, lead)
  dtype = _compute_dtype(student_hidden, kernel, bias, teacher_topk_logprobs)
  loss_fn = functools.partial(_topk_chunk, temperature, tail)
  teacher = (jnp.asarray(teacher_topk_logprobs, dtype),
             jnp.asarray(teacher_topk_indices, jnp.int32))
  kd, ce = _run_chunked(loss_fn, student_hidden, kernel, bias, teacher, (),
                        where, labels, chunk_size, dtype)
  return kd if labels is None else (kd, ce)
