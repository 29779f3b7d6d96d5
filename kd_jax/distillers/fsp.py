r"""FSP: flow-of-solution-procedure matrices as an initialization stage (`kd_jax.losses.fsp_loss`).

RepDistiller's initialization stage trains the student's feature layers with
`fsp_loss` on `feat[:-1]` (`features['stages']`, stem included); main
training: `loss_kd = 0` (`joint=True` keeps the loss on).

References:
  Yim, Joo, Bae & Kim, "A Gift from Knowledge Distillation: Fast
  Optimization, Network Minimization and Transfer Learning", CVPR 2017.
  Conventions from RepDistiller (github.com/HobbitLong/RepDistiller,
  `distiller_zoo/FSP.py`, `helper/pretrain.py`).
"""

from __future__ import annotations

import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distillers.base import LayerSpec
from kd_jax.distillers.base import LayerwiseDistiller
from kd_jax.distillers.base import PretrainStage
from kd_jax.distillers.base import register


@register("fsp")
class FSPDistiller(LayerwiseDistiller):
  """FSP (RepDistiller `fsp`): `fsp_loss` on `features['stages']`.

  Args:
    feature_key / layers / teacher_layers: selection (all stages, stem
      included, = RepDistiller `feat[:-1]`).
    joint: also apply the loss in the main training (default False).
    pretrain_epochs: 30.
  """

  def __init__(self, *, feature_key: str = "stages", layers: LayerSpec = None,
               teacher_layers: LayerSpec = None, joint: bool = False,
               pretrain_epochs: int = 30):
    super().__init__(feature_key=feature_key, layers=layers,
                     teacher_layers=teacher_layers)
    self.joint = joint
    stage = self if joint else FSPDistiller(
        feature_key=feature_key, layers=layers, teacher_layers=teacher_layers,
        joint=True, pretrain_epochs=0)
    self.pretrain = PretrainStage(
        distiller=stage, train_student=True, epochs=pretrain_epochs,
        description="FSP initialization: student feature layers minimize "
                    "the FSP-matrix loss",
        to_stage=lambda p, s: ({}, {}),
        to_main=lambda sp, ss, mp, ms: (mp, ms))

  def __call__(self, params, state, inputs):
    if not self.joint:
      return jnp.zeros((), jnp.float32), state
    s, t = self._pairs(inputs)
    return losses.fsp_loss(s, t), state
