r"""Losses of the self-distillation methods: BYOT, Tf-KD_reg.

Pure functions of arrays in the style of the other `kd_jax.losses` modules:
per-example outputs `[...]` for logits `[..., K]` (reduce them yourself),
`where=` masks, shapes / dtypes checked at trace time, float32 compute
(float64 when `jax_enable_x64` is on and an input is float64), the target
side (teacher) wrapped in `stop_gradient`. The outer weights of the
references (BYOT's `alpha`, `beta`; Tf-KD's `reg_alpha`, `multiplier`) are
*not* included: the distillers (`kd_jax.distillers.byot`, `.tfkd`) apply
them.

* `soft_cross_entropy`: :math:`-T^2 \sum_c p_c \log q_c` -- the KD term of
  the BYOT reimplementation (luanyunteng/pytorch-be-your-own-teacher
  `kd_loss_function(...) * T**2`), a cross-entropy, i.e. `kd_loss` plus the
  teacher's entropy times :math:`T^2` (same gradient, different value).
* `byot_feature_loss`: that reimplementation's `feature_loss_function`,
  a squared difference counted where either side is positive, summed.
* `virtual_teacher` / `tf_kd_reg_loss`: the manually designed teacher of
  Tf-KD_reg (yuanli2333/Teacher-free-Knowledge-Distillation
  `my_loss_function.loss_kd_regularization`) and the KL divergence to it.

CS-KD's class-wise term is Hinton KD between two examples of a class
(`kd_jax.losses.kd_loss`), so it has no loss function of its own here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.losses import _common
from kd_jax.losses import divergences

Array = jax.Array

__all__ = ["soft_cross_entropy", "byot_feature_loss", "virtual_teacher",
           "tf_kd_reg_loss"]


def soft_cross_entropy(student_logits, teacher_logits, *, temperature=3.0,
                       where=None) -> Array:
  r"""Cross-entropy to softened teacher probabilities, times :math:`T^2`.

  .. math::
    \ell = -T^2 \sum_c p_c \log q_c, \quad p = \sigma(z^t / T),
    \; q = \sigma(z^s / T)

  per example, i.e. :math:`T^2 (\mathrm{KL}(p \| q) + H(p))`: `kd_loss` plus
  the teacher's entropy (a constant), so the gradient is `kd_loss`'s, the
  value is the reference's. `jnp.mean` over the batch equals the BYOT
  reimplementation's `kd_loss_function(output, softmax(target / T)) * T**2`.

  Args:
    student_logits: `[..., K]` float array.
    teacher_logits: `[..., K]`, same shape; a constant (no gradient).
    temperature: `T > 0` (the reimplementation's `--temperature`, 3).
    where: optional bool mask `[...]`; masked entries give 0.

  Returns:
    float32 (float64 under x64 with float64 inputs) array `[...]`.

  References:
    Zhang et al., "Be Your Own Teacher: Improve the Performance of
    Convolutional Neural Networks via Self Distillation", ICCV 2019;
    reimplementation github.com/luanyunteng/pytorch-be-your-own-teacher
    (`train.py::kd_loss_function`).

  >>> import jax.numpy as jnp
  >>> z = jnp.zeros((1, 4))
  >>> round(float(soft_cross_entropy(z, z, temperature=1.0)[0]), 4)  # ln 4
  1.3863
  """
  s, t, where = divergences.prepare_logits_pair(
      student_logits, teacher_logits, where=where, temperature=temperature)
  p = jax.nn.softmax(t / temperature, axis=-1)
  log_q = jax.nn.log_softmax(s / temperature, axis=-1)
  loss = -jnp.sum(p * log_q, axis=-1) * (temperature * temperature)
  return _common.apply_where(loss, where)


def byot_feature_loss(student_features, target_features, *,
                      where=None) -> Array:
  r"""BYOT reimplementation's feature loss, per example.

  .. math::
    \ell_b = \sum_j (f_{bj} - g_{bj})^2 \,
      [f_{bj} > 0 \lor g_{bj} > 0]

  over all non-batch entries `j` of an example; `g` (the deepest stage's
  feature) is a constant. The reference returns the *sum* over the batch as
  well (`torch.abs(loss).sum()`), so `jnp.sum` of this output is its value.
  On ReLU features (both sides >= 0) the mask changes nothing: entries where
  both are 0 have a zero difference.

  Args:
    student_features: `[B, ...]` float array (a shallow exit's pooled
      bottleneck output, `[B, C]` in the reference's `[B, C, 1, 1]` form).
    target_features: same shape; a constant.
    where: optional bool mask `[B]`.

  Returns:
    float array `[B]`.

  References:
    github.com/luanyunteng/pytorch-be-your-own-teacher
    (`train.py::feature_loss_function`).

  >>> import jax.numpy as jnp
  >>> f = jnp.array([[1., -1., 0.]]); g = jnp.array([[0., -2., 2.]])
  >>> float(byot_feature_loss(f, g)[0])  # (1-0)^2 + 0 (both <= 0) + 2^2
  5.0
  """
  _common.check_float(student_features, "student_features")
  _common.check_float(target_features, "target_features")
  _common.check_rank(student_features, "student_features", min_ndim=1,
                     what="([batch, ...])")
  _common.check_same_shape(student_features, target_features,
                           "student_features", "target_features")
  dtype = divergences._compute_dtype(  # pylint: disable=protected-access
      student_features, target_features)
  f = jnp.asarray(student_features, dtype)
  g = jax.lax.stop_gradient(jnp.asarray(target_features, dtype))
  where = _common.check_where(where, f.shape[:1])
  f, g = _common.mask_inputs(where, f, g)
  keep = (f > 0) | (g > 0)
  sq = jnp.where(keep, (f - g) ** 2, 0.0)
  loss = jnp.sum(sq.reshape(sq.shape[0], -1), axis=-1)
  return _common.apply_where(loss, where)


def _check_probability(value, name):
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    if not 0.0 < value < 1.0:
      raise ValueError(f"`{name}` must be in (0, 1); got {value}.")


def virtual_teacher(labels, num_classes: int, *, correct_prob=0.99,
                    temperature=20.0, dtype=jnp.float32) -> Array:
  r"""Tf-KD_reg's manually designed teacher distribution.

  .. math::
    p^d_k = \begin{cases} a & k = y \\ (1 - a)/(K - 1) & k \ne y
    \end{cases}, \qquad q = \sigma(p^d / T)

  with :math:`a` = `correct_prob` (0.99). The reference softmaxes the
  *probabilities* :math:`p^d` divided by :math:`T` (`F.softmax(teacher_soft
  / T)`), so for large `T` the teacher is close to uniform (K = 100, T = 20:
  0.0105 on the label, 0.00999 elsewhere) -- a label-smoothing-like target,
  transcribed as the code computes it.

  Args:
    labels: int `[...]`.
    num_classes: `K >= 2`.
    correct_prob: `a` in (0, 1).
    temperature: `T > 0` (`reg_temperature`).
    dtype: output dtype.

  Returns:
    `[..., K]` probabilities (rows sum to 1).

  >>> q = virtual_teacher(jnp.array([0]), 3, correct_prob=0.5, temperature=1.0)
  >>> [round(float(v), 4) for v in q[0]]
  [0.391, 0.3045, 0.3045]
  """
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or (
      num_classes < 2):
    raise ValueError(f"`num_classes` must be an int >= 2; got "
                     f"{num_classes!r}.")
  _check_probability(correct_prob, "correct_prob")
  _common.check_positive(temperature, "temperature")
  labels = _common.check_labels(labels, jnp.shape(labels))
  onehot = jax.nn.one_hot(labels, num_classes, dtype=dtype)
  other = (1.0 - correct_prob) / (num_classes - 1)
  p_d = onehot * correct_prob + (1.0 - onehot) * other
  return jax.nn.softmax(p_d / temperature, axis=-1)


def tf_kd_reg_loss(logits, labels, *, correct_prob=0.99, temperature=20.0,
                   where=None) -> Array:
  r"""Tf-KD_reg: KL divergence from the virtual teacher, per example.

  .. math::
    \ell = \sum_k q_k (\log q_k - \log \sigma(z)_k), \quad
    q = \text{`virtual_teacher`}(y)

  The student's logits are *not* divided by :math:`T` (as in the
  reference). The reference reduces with `nn.KLDivLoss()`'s default
  `'mean'`, the mean over all `B x K` entries, i.e. `jnp.mean` of this
  output divided by `K`, then multiplies by `multiplier`; the
  `kd_jax.distillers.tfkd` distiller applies both.

  Args:
    logits: `[..., K]` float array (the student's).
    labels: int `[...]`.
    correct_prob: probability of the label in `p^d` (0.99).
    temperature: `reg_temperature` (20 for ResNet18 on CIFAR-100).
    where: optional bool mask `[...]`.

  Returns:
    float array `[...]`.

  References:
    Yuan, Tay, Li, Wang & Feng, "Revisiting Knowledge Distillation via Label
    Smoothing Regularization", CVPR 2020. Authors' code:
    github.com/yuanli2333/Teacher-free-Knowledge-Distillation
    (`my_loss_function.py::loss_kd_regularization`).

  >>> import jax.numpy as jnp
  >>> float(tf_kd_reg_loss(jnp.zeros((1, 2)), jnp.array([0]),
  ...                      correct_prob=0.5)[0])  # teacher uniform too
  0.0
  """
  _common.check_float(logits, "logits")
  _common.check_rank(logits, "logits", min_ndim=1, what="([..., K])")
  num_classes = jnp.shape(logits)[-1]
  if num_classes < 2:
    raise ValueError(f"`logits` needs at least 2 classes; got shape "
                     f"{tuple(jnp.shape(logits))}.")
  dtype = divergences._compute_dtype(logits)  # pylint: disable=protected-access
  z = jnp.asarray(logits, dtype)
  labels = _common.check_labels(labels, z.shape[:-1])
  where = _common.check_where(where, z.shape[:-1])
  (z,) = _common.mask_inputs(where, z)
  q = virtual_teacher(labels, num_classes, correct_prob=correct_prob,
                      temperature=temperature, dtype=dtype)
  log_q = jnp.log(q)
  loss = jnp.sum(q * (log_q - jax.nn.log_softmax(z, axis=-1)), axis=-1)
  return _common.apply_where(loss, where)
