r"""SP: similarity-preserving KD on the last stage map (`kd_jax.losses.sp_loss`).

The loss couples the batch; under `pmap` it is computed on the all-gathered
global batch (`inputs.axis_name`). Weight 3000 (RepDistiller
`--distill similarity -b 3000`, on `feat[-2]` = `features['stages'][-1]`).

References:
  Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.
  Conventions from RepDistiller (github.com/HobbitLong/RepDistiller,
  `distiller_zoo/SP.py`).
"""

from __future__ import annotations

from kd_jax import losses
from kd_jax.distillers.base import LayerSpec
from kd_jax.distillers.base import OneLayerDistiller
from kd_jax.distillers.base import register


@register("sp")
class SPDistiller(OneLayerDistiller):
  """Similarity-preserving KD, `sp_loss` on the last stage (weight 3000).

  Tung & Mori, ICCV 2019; RepDistiller `--distill similarity -b 3000`.
  """

  def __init__(self, *, feature_key: str = "stages", layer: LayerSpec = -1):
    super().__init__(feature_key=feature_key, layer=layer)

  def __call__(self, params, state, inputs):
    s, t = self._pair(inputs)
    return losses.sp_loss(s, t, axis_name=inputs.axis_name), state
