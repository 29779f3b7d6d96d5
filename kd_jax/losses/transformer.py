r"""Intermediate-layer losses of transformers: hidden states and attention.

* `hidden_state_loss`: TinyBERT's hidden-state loss
  :math:`\mathrm{MSE}(H^S W_h, H^T)` per position (the projection
  :math:`W_h` is the caller's, e.g. `kd_jax.distillers.tinybert`), or the
  cosine distance :math:`1 - \cos(H^S W_h, H^T)` (DistillKit's
  ``hs_cosine``).
* `attention_relation_loss`: MiniLM's self-attention transfer. For
  per-position vectors :math:`a, b` ``[B, T, d]`` of one layer (queries,
  keys or values, all heads concatenated) split into :math:`R` relation
  heads of width :math:`d_r = d / R`, the relation of head :math:`r` is

  .. math::
    A_{r} = \mathrm{softmax}\Big(\frac{a_r b_r^\top}{\sqrt{d_r}}\Big)
    \in \mathbb{R}^{T \times T}

  (row-wise; causal: query :math:`i` sees keys :math:`j \le i`), and the
  loss is :math:`\mathrm{KL}(A^T_{r,i} \,\|\, A^S_{r,i})` averaged over the
  relation heads, per query position. With (queries, keys) and :math:`R` =
  the number of attention heads this is MiniLM's attention-distribution
  transfer, with (values, values) its value-relation transfer (Wang et al.,
  NeurIPS 2020); with (q, q), (k, k), (v, v) and any :math:`R` dividing
  both widths, MiniLMv2's multi-head self-attention relations (Wang et al.,
  Findings ACL 2021) -- teacher and student may differ in heads and width.

Both return per-position values ``[B, T]`` (0 where ``where`` is False);
the caller averages over the trained positions.

References:
  Jiao et al., "TinyBERT: Distilling BERT for Natural Language
  Understanding", Findings of EMNLP 2020 (huawei-noah/Pretrained-Language-
  Model, TinyBERT).
  Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic
  Compression of Pre-Trained Transformers", NeurIPS 2020.
  Wang et al., "MiniLMv2: Multi-Head Self-Attention Relation Distillation
  for Compressing Pretrained Transformers", Findings of ACL 2021
  (microsoft/unilm, minilm).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def _check(name_s, s, name_t, t, *, same_width: bool):
  if s.ndim != 3 or t.ndim != 3:
    raise ValueError(f"`{name_s}` and `{name_t}` must be [batch, time, "
                     f"width]; got {tuple(s.shape)} and {tuple(t.shape)}.")
  if s.shape[:2] != t.shape[:2]:
    raise ValueError(f"`{name_s}` {tuple(s.shape)} and `{name_t}` "
                     f"{tuple(t.shape)} must have the same batch and time.")
  if same_width and s.shape[-1] != t.shape[-1]:
    raise ValueError(f"`{name_s}` has width {s.shape[-1]} but `{name_t}` "
                     f"{t.shape[-1]}; project the student first.")


def _masked(values, where):
  return values if where is None else jnp.where(where, values, 0.0)


def hidden_state_loss(student_hidden, teacher_hidden, *, kind: str = "mse",
                      where: Optional[Array] = None) -> Array:
  r"""Per-position distance of (projected) hidden states ``[B, T]``.

  ``kind='mse'``: :math:`\frac{1}{d}\lVert h^S - h^T \rVert^2`;
  ``kind='cosine'``: :math:`1 - \frac{h^S \cdot h^T}{\lVert h^S \rVert
  \lVert h^T \rVert}`. Float32; the teacher is a constant.

  >>> import jax.numpy as jnp
  >>> h = jnp.ones((1, 2, 4))
  >>> hidden_state_loss(h, 2 * h).tolist(), hidden_state_loss(
  ...     h, 2 * h, kind="cosine").tolist()
  ([[1.0, 1.0]], [[0.0, 0.0]])
  """
  _check("student_hidden", student_hidden, "teacher_hidden", teacher_hidden,
         same_width=True)
  s = jnp.asarray(student_hidden, jnp.float32)
  t = jax.lax.stop_gradient(jnp.asarray(teacher_hidden, jnp.float32))
  if kind == "mse":
    out = jnp.mean(jnp.square(s - t), axis=-1)
  elif kind == "cosine":
    eps = 1e-8
    dot = jnp.sum(s * t, axis=-1)
    norms = jnp.sqrt(jnp.sum(s * s, -1)) * jnp.sqrt(jnp.sum(t * t, -1))
    out = 1.0 - dot / jnp.maximum(norms, eps)
  else:
    raise ValueError(f"`kind` must be 'mse' or 'cosine'; got {kind!r}.")
  return _masked(out, where)


def _relation_logprobs(a, b, heads: int, causal: bool):
  """log softmax(a_r b_r^T / sqrt(d_r)) ``[B, R, T, T]`` (float32)."""
  bsz, t, d = a.shape
  if d % heads or b.shape[-1] % heads:
    raise ValueError(f"widths {d} and {b.shape[-1]} must be divisible by the "
                     f"{heads} relation heads.")
  ar = a.reshape(bsz, t, heads, d // heads)
  br = b.reshape(bsz, t, heads, b.shape[-1] // heads)
  scores = jnp.einsum("bird,bjrd->brij", ar, br) * (d // heads) ** -0.5
  if causal:
    keep = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(keep, scores, -jnp.inf)
  return jax.nn.log_softmax(scores, axis=-1)


def attention_relation_loss(student_a, student_b, teacher_a, teacher_b, *,
                            num_relation_heads: int, causal: bool = True,
                            where: Optional[Array] = None) -> Array:
  r"""Per-query KL of the teacher's to the student's self-attention
  relations, averaged over relation heads, ``[B, T]`` (module docstring).

  Args:
    student_a, student_b: ``[B, T, d_s]`` (e.g. queries and keys of one
      layer, heads concatenated); `student_b` may be `student_a`.
    teacher_a, teacher_b: ``[B, T, d_t]`` (constants).
    num_relation_heads: :math:`R`, dividing both widths.
    causal: relations over keys :math:`j \le i` only (decoders).
    where: bool ``[B, T]``, the query positions that count.

  >>> import jax.numpy as jnp
  >>> x = jnp.arange(24.).reshape(1, 3, 8) / 10
  >>> attention_relation_loss(x, x, 2 * x, 2 * x, num_relation_heads=2,
  ...                         ).round(4).tolist()
  [[0.0, 0.1465, 0.0475]]
  """
  for n, s, m, t in (("student_a", student_a, "teacher_a", teacher_a),
                     ("student_b", student_b, "teacher_b", teacher_b)):
    _check(n, s, m, t, same_width=False)
  if not isinstance(num_relation_heads, int) or num_relation_heads < 1:
    raise ValueError(f"`num_relation_heads` must be an int >= 1; got "
                     f"{num_relation_heads!r}.")
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  ls = _relation_logprobs(f32(student_a), f32(student_b), num_relation_heads,
                          causal)
  lt = jax.lax.stop_gradient(_relation_logprobs(
      f32(teacher_a), f32(teacher_b), num_relation_heads, causal))
  pt = jnp.exp(lt)
  # 0 * log 0 = 0 for masked keys (both log-probs -inf there).
  kl = jnp.sum(jnp.where(pt > 0, pt * (lt - ls), 0.0), axis=-1)
  return _masked(jnp.mean(kl, axis=1), where)
