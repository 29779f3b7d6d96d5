r"""CTKD: curriculum temperature, learned adversarially through a gradient reversal.

One learnable scalar :math:`\theta` (init 1, trained by the same optimizer as
the student) gives the KD temperature

.. math:: T = T_{start} + T_{end}\,\sigma(\mathrm{GRL}_\lambda(\theta)),
   \qquad \mathcal{L} = T^2 \operatorname{mean}_b
   \mathrm{KL}\big(\sigma(z^t_b / T) \,\|\, \sigma(z^s_b / T)\big)

(`kd_jax.losses.kd_loss` with a traced temperature), where the gradient
reversal layer is the identity forward and multiplies the gradient by
:math:`\lambda` backward. :math:`\lambda(e)` follows a cosine schedule over
the 1-based epoch :math:`e`,

.. math:: \lambda(e) = \lambda_{min} + (\lambda_{max} - \lambda_{min})
   \tfrac{1}{2}\big(1 + \cos(\pi \min(e, E) / E)\big),

with :math:`\lambda_{max} = 0`, :math:`\lambda_{min} = -1`, :math:`E = 10`
(the CIFAR script's `--decay_max 0 --decay_min -1 --decay_loops 10`), so the
temperature *maximizes* the KD loss with a strength growing from 0 to 1 over
the first 10 epochs (the curriculum) while the student minimizes it. The
authors' `GradientReversalFunction` multiplies by `lambda_` (no extra minus
sign): the negative schedule values do the reversal. Defaults
`T_start = 1`, `T_end = 20`.

The step must know the epoch (`make_distill_step(..., steps_per_epoch=...)`),
read from `TermInputs.epoch`; `temperature(params, epoch)` gives the current
temperature.

References:
  Li, Li, Yang, Cheng, Yang & Zhang (Zheng Li et al.), "Curriculum
  Temperature for Knowledge Distillation", AAAI 2023. Authors' code:
  github.com/zhengli97/CTKD (`models/temp_global.py::Global_T`,
  `train_student.py::CosineDecay`, `helper/loops.py`); also in
  sunshangquan/logit-standardization-KD (`CTKD/`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distillers.base import Distiller
from kd_jax.distillers.base import register


@jax.custom_vjp
def gradient_reversal(x, lambda_):
  """Identity forward; backward multiplies the cotangent by `lambda_`.

  `lambda_` gets no gradient (the authors' `GradientReversalFunction`).
  """
  del lambda_
  return x


def _grl_fwd(x, lambda_):
  return x, lambda_


def _grl_bwd(lambda_, g):
  return (lambda_ * g, jnp.zeros_like(lambda_))


gradient_reversal.defvjp(_grl_fwd, _grl_bwd)


def cosine_decay(epoch, *, max_value: float = 0.0, min_value: float = -1.0,
                 num_loops: float = 10.0):
  """CTKD's `CosineDecay.get_value(epoch)` (epoch clipped to `[0, E]`)."""
  e = jnp.clip(jnp.asarray(epoch, jnp.float32), 0.0, num_loops)
  value = (jnp.cos(e * math.pi / num_loops) + 1.0) * 0.5
  return value * (max_value - min_value) + min_value


@register("ctkd")
class CTKDDistiller(Distiller):
  """CTKD with the global learnable temperature (params: `{'theta': [1]}`).

  Args:
    t_start / t_end: `T = t_start + t_end * sigmoid(theta)` (1, 20).
    decay_max / decay_min / decay_loops: the cosine schedule of the reversal
      strength (0, -1, 10 epochs on CIFAR-100; 5 on ImageNet).
    init: initial `theta` (1, `torch.ones(1)`).
    standardize: logit standardization inside the KD loss.
  """

  def __init__(self, *, t_start: float = 1.0, t_end: float = 20.0,
               decay_max: float = 0.0, decay_min: float = -1.0,
               decay_loops: float = 10.0, init: float = 1.0,
               standardize: bool = False):
    if decay_loops <= 0:
      raise ValueError(f"ctkd: `decay_loops` must be > 0; got {decay_loops}.")
    self.t_start = float(t_start)
    self.t_end = float(t_end)
    self.decay_max = float(decay_max)
    self.decay_min = float(decay_min)
    self.decay_loops = float(decay_loops)
    self.init_value = float(init)
    self.standardize = bool(standardize)

  def init(self, rng, inputs):
    del rng, inputs
    return {"theta": jnp.full((1,), self.init_value, jnp.float32)}, {}

  def reversal_strength(self, epoch):
    """`lambda(epoch)`."""
    return cosine_decay(epoch, max_value=self.decay_max,
                        min_value=self.decay_min, num_loops=self.decay_loops)

  def temperature(self, params, epoch):
    """The temperature (a float32 scalar) at `epoch`."""
    lam = self.reversal_strength(epoch)
    theta = gradient_reversal(params["theta"], lam)
    return (self.t_start + self.t_end * jax.nn.sigmoid(theta))[0]

  def __call__(self, params, state, inputs):
    if inputs.epoch is None:
      raise ValueError(
          "ctkd: needs the epoch for its reversal schedule; build the step "
          "with `steps_per_epoch=...`.")
    if inputs.teacher_logits is None or isinstance(inputs.teacher_logits,
                                                   (list, tuple)):
      raise ValueError("ctkd: needs the logits of a single teacher.")
    temp = self.temperature(params, inputs.epoch)
    loss = losses.kd_loss(inputs.student_logits, inputs.teacher_logits,
                          temperature=temp, standardize=self.standardize)
    return jnp.mean(loss), state
