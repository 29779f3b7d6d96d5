r"""NST: neuron selectivity transfer (`kd_jax.losses.nst_loss`, polynomial MMD).

Summed over the selected layers (RepDistiller's `feat[1:-1]`), weight 50.

References:
  Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
  Transfer", arXiv 2017. Authors' code:
  github.com/TuSimple/neuron-selectivity-transfer (MXNet); conventions from
  RepDistiller (`distiller_zoo/NST.py`).
"""

from __future__ import annotations

import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distillers.base import LayerwiseDistiller
from kd_jax.distillers.base import register


@register("nst")
class NSTDistiller(LayerwiseDistiller):
  r"""Neural selectivity transfer: :math:`\sum_l` `nst_loss` (weight 50).

  Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
  Transfer", 2017; RepDistiller `--distill nst -b 50` on `feat[1:-1]`.
  """

  def __call__(self, params, state, inputs):
    s, t = self._pairs(inputs)
    loss = sum(losses.nst_loss(a, b) for a, b in zip(s, t))
    return jnp.asarray(loss, jnp.float32), state
