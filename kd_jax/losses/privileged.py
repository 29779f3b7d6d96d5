r"""Generalized distillation (distillation + learning using privileged information).

Lopez-Paz, Bottou, Schölkopf & Vapnik, "Unifying distillation and privileged
information", ICLR 2016 (authors' code: github.com/lopezpaz/
distillation_privileged_information, `code/mnist.py`). The teacher is trained
on privileged features :math:`x^\star` (e.g. full-resolution images), the
student on the regular features :math:`x` (the same images downscaled) with

.. math::
  \mathcal{L} = (1 - \lambda)\, \ell(y, \sigma(f_s(x)))
      + \lambda\, \ell(s, \sigma(f_s(x))), \qquad
  s = \sigma(f_t(x^\star) / T)

(the paper's Eq. 2): the *student* softmax is not tempered. The authors'
code additionally multiplies the imitation term by :math:`T^2`
(`weighted_loss(categorical_crossentropy, t*t*l)`); `scale_by_t2=True`
(default) follows the code. In a kd_jax `Objective` the recipe is
`Objective(ce_weight=1 - lam, terms=(Term('generalized_distillation', lam,
temperature=T),))`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.losses import _common
from kd_jax.losses import divergences

Array = jax.Array


def generalized_distillation_loss(student_logits, teacher_logits, *,
                                  temperature=1.0, scale_by_t2: bool = True,
                                  where=None) -> Array:
  r"""Imitation term of generalized distillation, per example.

  .. math::
    \ell = T^2 \cdot \Big(-\sum_c s_c \log \sigma(z^s)_c\Big), \qquad
    s = \sigma(z^t / T)

  -- the cross-entropy of the teacher's tempered soft labels and the
  student's *untempered* softmax, times :math:`T^2` (the authors' Keras
  `categorical_crossentropy` on the student's plain softmax output, weighted
  by `t*t*l`; `scale_by_t2=False` gives the paper's Eq. 2 term). Keras
  additionally clips the student probabilities to `[1e-7, 1 - 1e-7]`,
  which only matters where a student probability is below 1e-7; kd_jax
  computes the exact log-softmax. Being a cross-entropy (not a KL) its
  value includes the teacher's entropy; the gradient is
  :math:`T^2 (\sigma(z^s) - s)`.

  Args:
    student_logits: `[..., K]`.
    teacher_logits: `[..., K]` (a constant: `stop_gradient`), computed from
      the teacher's (privileged) view of the same examples.
    temperature: `T > 0` of the teacher's soft labels only.
    scale_by_t2: multiply by `T^2` (the authors' code).
    where: optional bool mask `[...]`.

  Returns:
    `[...]` float32 per-example loss.

  References:
    Lopez-Paz, Bottou, Schölkopf & Vapnik, "Unifying distillation and
    privileged information", ICLR 2016.

  >>> import jax.numpy as jnp
  >>> s = jnp.zeros((1, 4)); t = jnp.zeros((1, 4))
  >>> round(float(generalized_distillation_loss(s, t, temperature=2.0)[0]), 4)
  5.5452
  """
  s, t, where = divergences.prepare_logits_pair(
      student_logits, teacher_logits, where=where)
  _common.check_positive(temperature, "temperature")
  soft = jax.nn.softmax(t / temperature, axis=-1)
  ce = -jnp.sum(soft * jax.nn.log_softmax(s, axis=-1), axis=-1)
  if scale_by_t2:
    ce = ce * (temperature * temperature)
  return _common.apply_where(ce, where)
