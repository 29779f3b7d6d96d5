r"""RKD: relational KD, distance + angle terms (`kd_jax.losses.rkd_loss`).

Batch-coupled (all-gathered under `pmap`); distance weight 25 and angle
weight 50 inside the loss, term weight 1 (RepDistiller `--distill rkd -b 1`,
on `features['pooled']`).

References:
  Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019.
  Authors' code: github.com/lenscloth/RKD; conventions from RepDistiller
  (`distiller_zoo/RKD.py`).
"""

from __future__ import annotations

from kd_jax import losses
from kd_jax.distillers.base import LayerSpec
from kd_jax.distillers.base import OneLayerDistiller
from kd_jax.distillers.base import register


@register("rkd")
class RKDDistiller(OneLayerDistiller):
  """Relational KD (distance 25 + angle 50 inside), weight 1.

  Park, Kim, Lu & Cho, CVPR 2019; RepDistiller `--distill rkd -b 1`.
  """

  def __init__(self, *, feature_key: str = "pooled", layer: LayerSpec = None,
               distance_weight: float = 25.0, angle_weight: float = 50.0,
               squared: bool = False):
    super().__init__(feature_key=feature_key, layer=layer)
    self.distance_weight = distance_weight
    self.angle_weight = angle_weight
    self.squared = squared

  def __call__(self, params, state, inputs):
    s, t = self._pair(inputs)
    return losses.rkd_loss(
        s, t, distance_weight=self.distance_weight,
        angle_weight=self.angle_weight, squared=self.squared,
        axis_name=inputs.axis_name), state
