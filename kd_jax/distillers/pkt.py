r"""PKT: probabilistic knowledge transfer (`kd_jax.losses.pkt_loss`).

On the pooled embedding; batch-coupled (all-gathered under `pmap`); weight
30000 (RepDistiller `--distill pkt -b 30000`, on `feat[-1]` =
`features['pooled']`).

References:
  Passalis & Tefas, "Learning Deep Representations with Probabilistic
  Knowledge Transfer", ECCV 2018. Authors' code:
  github.com/passalis/probabilistic_kt; conventions from RepDistiller
  (`distiller_zoo/PKT.py`).
"""

from __future__ import annotations

from kd_jax import losses
from kd_jax.distillers.base import LayerSpec
from kd_jax.distillers.base import OneLayerDistiller
from kd_jax.distillers.base import register


@register("pkt")
class PKTDistiller(OneLayerDistiller):
  """Probabilistic KT, `pkt_loss` on the pooled embedding (weight 30000).

  Passalis & Tefas, ECCV 2018; RepDistiller `--distill pkt -b 30000`.
  """

  def __init__(self, *, feature_key: str = "pooled", layer: LayerSpec = None,
               eps: float = 1e-7):
    super().__init__(feature_key=feature_key, layer=layer)
    self.eps = eps

  def __call__(self, params, state, inputs):
    s, t = self._pair(inputs)
    return losses.pkt_loss(s, t, eps=self.eps,
                           axis_name=inputs.axis_name), state
