r"""FitNets: hint loss through a convolutional regressor, with a hint stage.

.. math:: \mathcal{L} = \operatorname{mean}\big(r_\phi(f^s_h) - f^t_h\big)^2

where :math:`f_h` is the hint layer (`features['stages'][hint_layer]`, the
same index as RepDistiller's `feat[hint_layer]`, default 2) and
:math:`r_\phi` is `adapters.ConvReg` (conv / transposed conv / shrinking conv
by the spatial-size rule, BatchNorm with batch statistics, ReLU).

RepDistiller (`--distill hint -a 0 -b 100`) and mdistiller train the
regressor jointly with the student from the start. The paper's first stage --
training the student up to the hint layer and the regressor with the hint
loss alone -- is available as `FitNetDistiller(...).pretrain` (a
`PretrainStage`, off in the reference configs).

References:
  Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin
  Deep Nets", ICLR 2015.
"""

from __future__ import annotations

from kd_jax import losses
from kd_jax.distillers import adapters
from kd_jax.distillers.base import Distiller
from kd_jax.distillers.base import PretrainStage
from kd_jax.distillers.base import _apply_module
from kd_jax.distillers.base import _init_module


def _identity_to_stage(params, state):
  return params, state


def _identity_to_main(sp, ss, mp, ms):
  del mp, ms
  return sp, ss


class FitNetDistiller(Distiller):
  """FitNets hint distiller (params: the ConvReg; state: its BN statistics).

  Args:
    hint_layer: index into `features[feature_key]` (RepDistiller
      `--hint_layer`, default 2).
    feature_key: features dict key (`'stages'`).
    teacher_hint_layer: teacher index when different (default: `hint_layer`).
    pretrain_epochs: length of the optional hint stage (`self.pretrain`).
  """
  name = "fitnet"

  def __init__(self, *, hint_layer: int = 2, feature_key: str = "stages",
               teacher_hint_layer=None, pretrain_epochs: int = 30):
    self.hint_layer = hint_layer
    self.teacher_hint_layer = (hint_layer if teacher_hint_layer is None
                               else teacher_hint_layer)
    self.feature_key = feature_key
    self.pretrain = PretrainStage(
        distiller=self, train_student=True, epochs=pretrain_epochs,
        description="FitNets stage 1: the student (up to the hint layer) and "
                    "the regressor minimize the hint loss alone",
        to_stage=_identity_to_stage, to_main=_identity_to_main)

  def _pair(self, inputs):
    s = self._student(inputs, self.feature_key, self.hint_layer)[0]
    t = self._teacher(inputs, self.feature_key, self.teacher_hint_layer)[0]
    if s.ndim != 4 or t.ndim != 4:
      raise ValueError(
          f"fitnet: the hint features must be NHWC maps; got student "
          f"{tuple(s.shape)} and teacher {tuple(t.shape)} at hint layer "
          f"{self.hint_layer}.")
    return s, t

  def _module(self, t, axis_name):
    return adapters.ConvReg(t.shape[-1], tuple(t.shape[1:3]), use_relu=True,
                            axis_name=axis_name)

  def init(self, rng, inputs):
    s, t = self._pair(inputs)
    p, st = _init_module(self._module(t, None), rng, s)
    return {"regressor": p}, {"regressor": st}

  def __call__(self, params, state, inputs):
    s, t = self._pair(inputs)
    out, st = _apply_module(self._module(t, inputs.axis_name),
                            params["regressor"], state["regressor"], s,
                            train=inputs.train)
    return losses.fitnet_loss(out, t), {"regressor": st}
