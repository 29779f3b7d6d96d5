"""Response-based (logit) distillation losses: Hinton KD, DKD, DIST, OFA.

All functions follow optax's per-example convention: logits `[..., K]` give a
loss of shape `[...]`; reduce it yourself (`jnp.mean` gives the references'
"batchmean" value). See `../shared/spec/kd_conventions.md` §1-5.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from kd_jax.losses import _common


def standardize_logits(logits, *, axis: int = -1, eps: float = 1e-7):
  r"""Z-scores logits along `axis` (Sun et al., CVPR 2024).

  .. math:: Z(z) = (z - \mathrm{mean}(z)) / (\mathrm{std}(z) + \epsilon)

  `std` is the unbiased (divide by K-1) estimator and `eps` is added to the
  std, not the variance -- as in the published code. Gradients flow through
  the mean and std.

  References:
    Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024.

  >>> import jax.numpy as jnp
  >>> z = standardize_logits(jnp.array([1., 2., 3.]))
  >>> [round(float(v), 4) for v in z]
  [-1.0, 0.0, 1.0]
  """
  _common.check_float(logits, "logits")
  x = jnp.asarray(logits, jnp.float32)
  n = x.shape[axis]
  if n < 2:
    raise ValueError(
        f"`logits` needs at least 2 entries along axis {axis} to standardize; "
        f"got shape {x.shape}.")
  mean = jnp.mean(x, axis=axis, keepdims=True)
  centered = x - mean
  var = jnp.sum(centered * centered, axis=axis, keepdims=True) / (n - 1)
  # sqrt has an infinite derivative at 0; guard constant rows.
  std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0)
  return centered / (std + eps)


def kd_loss(student_logits, teacher_logits, *, temperature: float = 4.0,
            standardize: bool = False, where=None):
  r"""Hinton knowledge-distillation loss, per example.

  .. math::
    \ell = T^2 \sum_c p_c (\log p_c - \log q_c), \quad
    p = \sigma(z^t / T), \; q = \sigma(z^s / T)

  `jnp.mean` over the batch equals the references' `batchmean` value
  (mdistiller `kd_loss`, RepDistiller `DistillKL`). With `standardize=True`
  both logits are z-scored first (`standardize_logits`), then divided by T.

  Args:
    student_logits: `[..., K]` float array.
    teacher_logits: `[..., K]`, same shape; treated as a constant.
    temperature: softmax temperature T > 0.
    standardize: apply logit standardization (Sun et al., 2024).
    where: optional bool mask of shape `[...]`; masked entries give 0.

  Returns:
    float32 array of shape `[...]`.

  References:
    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
    NeurIPS Deep Learning Workshop 2015.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[1., 2., 3.]]); t = jnp.array([[1., 2., 3.]])
  >>> kd_loss(s, t).shape
  (1,)
  >>> float(kd_loss(s, t)[0])
  0.0
  """
  s, t = _common.check_logits_pair(student_logits, teacher_logits)
  _common.check_positive(temperature, "temperature")
  where = _common.check_where(where, s.shape[:-1])
  s, t = _common.mask_inputs(where, s, t)
  if standardize:
    s = standardize_logits(s)
    t = standardize_logits(t)
  log_q = jax.nn.log_softmax(s / temperature, axis=-1)
  log_p = jax.nn.log_softmax(t / temperature, axis=-1)
  p = jnp.exp(log_p)
  kl = jnp.sum(p * (log_p - log_q), axis=-1)
  return _common.apply_where(kl * temperature**2, where)
