r"""Tf-KD: teacher-free knowledge distillation (Tf-KD_reg and Tf-KD_self).

**Tf-KD_reg** (this distiller, `'tfkd'`): a manually designed "virtual
teacher" that puts probability :math:`a` = 0.99 on the label and spreads the
rest, softened by :math:`T` (`kd_jax.losses.virtual_teacher`), regularizes
the student:

.. math::
  \mathcal{L} = (1 - \alpha)\,\mathrm{CE}(z, y) + \alpha\, m\,
    \frac{1}{B K} \sum_{b,k} q_{bk} \big(\log q_{bk} - \log\sigma(z_b)_k\big),
  \qquad q_b = \sigma(p^d(y_b) / T)

the authors' `loss_kd_regularization`: `nn.KLDivLoss()` with its default
`'mean'` reduction averages over all :math:`B K` entries (so the batch mean
of `kd_jax.losses.tf_kd_reg_loss` is divided by :math:`K` here), then
multiplied by `multiplier` :math:`m`. The CE is the objective's
(`loss.ce_weight = 1 - reg_alpha`), the term weight is `reg_alpha`. Note the
reference's virtual teacher is the softmax of the *probabilities* over
:math:`T`; with :math:`T = 20`, :math:`K = 100` it is nearly uniform
(0.0105 on the label), and the student's logits are not divided by `T`. The
authors' per-model settings (`experiments/base_experiments/*/params.json`):
ResNet18 `reg_temperature` 20, `reg_alpha` 0.1, `multiplier` 100;
MobileNetV2 40 / 0.95 / 1; ShuffleNetV2 10 / 0.95 / 1; GoogLeNet 40 / 0.1 /
50.

**Tf-KD_self** is ordinary KD from a pretrained copy of the student
(`loss_kd_self`): :math:`(1-\alpha)\,\mathrm{CE} + \alpha\, m\, T^2\,
\mathrm{KL}_{mean}` with the same `'mean'` reduction, i.e. in kd_jax a
`kd` logit term with `temperature = T` and weight :math:`\alpha m / K` next
to `ce_weight = 1 - alpha`, the teacher being the same architecture trained
alone (`configs/cifar100_tfkd.py:self-<model>`). No distiller is needed.

Recipe of both (`main.py`, `train_kd.py`): SGD momentum 0.9, weight decay
5e-4, LR `0.1 * batch / 128`, 200 epochs, LR x0.2 at epochs 60 / 120 / 160,
a linear warm-up over the first epoch.

References:
  Yuan, Tay, Li, Wang & Feng, "Revisiting Knowledge Distillation via Label
  Smoothing Regularization", CVPR 2020. Authors' code:
  github.com/yuanli2333/Teacher-free-Knowledge-Distillation
  (`my_loss_function.py`, `experiments/*/params.json`).
"""

from __future__ import annotations

import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distillers.base import Distiller
from kd_jax.distillers.base import register


@register("tfkd")
class TfKDRegDistiller(Distiller):
  """Tf-KD_reg term: `multiplier / K * mean_b tf_kd_reg_loss` (no params).

  Args:
    temperature: `reg_temperature` (20 for ResNet18).
    correct_prob: the virtual teacher's probability of the label (0.99).
    multiplier: `multiplier` (100 for ResNet18).
  """
  needs_teacher = False

  def __init__(self, *, temperature: float = 20.0, correct_prob: float = 0.99,
               multiplier: float = 100.0):
    if not float(temperature) > 0:
      raise ValueError(f"tfkd: `temperature` must be > 0; got "
                       f"{temperature!r}.")
    if not 0.0 < float(correct_prob) < 1.0:
      raise ValueError(f"tfkd: `correct_prob` must be in (0, 1); got "
                       f"{correct_prob!r}.")
    if not float(multiplier) >= 0:
      raise ValueError(f"tfkd: `multiplier` must be >= 0; got "
                       f"{multiplier!r}.")
    self.temperature = float(temperature)
    self.correct_prob = float(correct_prob)
    self.multiplier = float(multiplier)

  def init(self, rng, inputs):
    del rng, inputs
    return {}, {}

  def __call__(self, params, state, inputs):
    z = jnp.asarray(inputs.student_logits, jnp.float32)
    kl = losses.tf_kd_reg_loss(z, inputs.labels,
                               correct_prob=self.correct_prob,
                               temperature=self.temperature)
    return jnp.mean(kl) * (self.multiplier / z.shape[-1]), state


def self_kd_weight(alpha: float, multiplier: float, num_classes: int) -> float:
  """Tf-KD_self's `kd` term weight in kd_jax: `alpha * multiplier / K`
  (the reference's elementwise-mean KL, see the module docstring)."""
  return float(alpha) * float(multiplier) / int(num_classes)
