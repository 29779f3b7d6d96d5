r"""FitNets: hint loss through a convolutional regressor, with a hint stage.

.. math:: \mathcal{L} = \operatorname{mean}\big(r_\phi(f^s_h) - f^t_h\big)^2

where :math:`f_h` is the hint layer (`features['stages'][hint_layer]`, the
same index as RepDistiller's `feat[hint_layer]`, default 2) and
:math:`r_\phi` is `ConvReg` (conv / transposed conv / shrinking conv
by the spatial-size rule, BatchNorm with batch statistics, ReLU).

RepDistiller (`--distill hint -a 0 -b 100`) and mdistiller train the
regressor jointly with the student from the start. The paper's first stage --
training the student up to the hint layer and the regressor with the hint
loss alone -- is available as `FitNetDistiller(...).pretrain` (a
`PretrainStage`, off in the reference configs).

Loss: `kd_jax.losses.fitnet_loss`.

References:
  Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin
  Deep Nets", ICLR 2015.
  Authors' code (Theano): github.com/adri-romsor/FitNets; conventions here
  from RepDistiller (github.com/HobbitLong/RepDistiller, `models/util.py`,
  `distiller_zoo/FitNet.py`).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distillers.base import Distiller
from kd_jax.distillers.base import PretrainStage
from kd_jax.distillers.base import apply_module
from kd_jax.distillers.base import init_module
from kd_jax.distillers.base import register
from kd_jax.models import layers as L


def conv_reg_kind(student_hw: Sequence[int], teacher_hw: Sequence[int]):
  """RepDistiller's ConvReg rule for student/teacher spatial sizes `(H, W)`.

  Returns `('conv', (3, 3), 2, 1)` when `s_H == 2 t_H` (3x3 conv, stride 2,
  padding 1), `('conv_transpose', (4, 4), 2, 1)` when `2 s_H == t_H`, and
  `('conv', (1 + s_H - t_H, 1 + s_W - t_W), 1, 0)` when `s_H >= t_H`
  (tuples: kind, kernel, stride, padding). A teacher map that is taller but
  not exactly twice as tall is rejected, as in the reference.

  >>> conv_reg_kind((16, 16), (8, 8))
  ('conv', (3, 3), 2, 1)
  >>> conv_reg_kind((8, 8), (16, 16))
  ('conv_transpose', (4, 4), 2, 1)
  >>> conv_reg_kind((8, 8), (6, 6))
  ('conv', (3, 3), 1, 0)
  """
  s_h, s_w = int(student_hw[0]), int(student_hw[1])
  t_h, t_w = int(teacher_hw[0]), int(teacher_hw[1])
  if s_h == 2 * t_h:
    return ("conv", (3, 3), 2, 1)
  if 2 * s_h == t_h:
    return ("conv_transpose", (4, 4), 2, 1)
  if s_h >= t_h:
    if s_w < t_w:
      raise ValueError(
          f"ConvReg: student width {s_w} is smaller than the teacher's {t_w} "
          f"while the student height {s_h} >= {t_h}; unsupported shapes.")
    return ("conv", (1 + s_h - t_h, 1 + s_w - t_w), 1, 0)
  raise ValueError(
      f"ConvReg: student map {s_h}x{s_w} is smaller than the teacher map "
      f"{t_h}x{t_w} and not exactly half its size; the reference regressor "
      "(conv / transposed conv / shrinking conv) cannot map it.")


class ConvReg(nn.Module):
  """FitNets convolutional regressor: conv (rule above) + BN + ReLU.

  RepDistiller `ConvReg(s_shape, t_shape, use_relu)`; the conv has a bias,
  the BN normalizes with batch statistics in training. `use_relu=False` is
  AB's connector.

  Attributes:
    teacher_channels: output channels.
    teacher_hw: teacher `(H, W)`.
    use_relu: apply the final ReLU.
    axis_name: sync-BN axis (inside `pmap`).
  """
  teacher_channels: int
  teacher_hw: Tuple[int, int]
  use_relu: bool = True
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 4:
      raise ValueError(
          f"ConvReg expects an NHWC student map [B, H, W, C]; got shape "
          f"{tuple(x.shape)}.")
    kind, kernel, stride, pad = conv_reg_kind(x.shape[1:3], self.teacher_hw)
    c_in, c_out = x.shape[-1], self.teacher_channels
    if kind == "conv":
      x = L.torch_conv(c_out, kernel, stride=stride, padding=pad, use_bias=True,
                fan_in=c_in * kernel[0] * kernel[1], name="conv")(x)
    else:
      x = L.torch_conv_transpose(c_out, kernel[0], stride=stride, padding=pad,
                          fan_in=c_out * kernel[0] * kernel[1],
                          name="conv")(x)
    x = L.batch_norm(train, self.axis_name, name="bn")(x)
    return nn.relu(x) if self.use_relu else x


def _identity_to_stage(params, state):
  return params, state


def _identity_to_main(sp, ss, mp, ms):
  del mp, ms
  return sp, ss


@register("fitnet")
class FitNetDistiller(Distiller):
  """FitNets hint distiller (params: the ConvReg; state: its BN statistics).

  Args:
    hint_layer: index into `features[feature_key]` (RepDistiller
      `--hint_layer`, default 2).
    feature_key: features dict key (`'stages'`).
    teacher_hint_layer: teacher index when different (default: `hint_layer`).
    pretrain_epochs: length of the optional hint stage (`self.pretrain`).
  """

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
    return ConvReg(t.shape[-1], tuple(t.shape[1:3]), use_relu=True,
                            axis_name=axis_name)

  def init(self, rng, inputs):
    s, t = self._pair(inputs)
    p, st = init_module(self._module(t, None), rng, s)
    return {"regressor": p}, {"regressor": st}

  def __call__(self, params, state, inputs):
    s, t = self._pair(inputs)
    out, st = apply_module(self._module(t, inputs.axis_name),
                            params["regressor"], state["regressor"], s,
                            train=inputs.train)
    return losses.fitnet_loss(out, t), {"regressor": st}
