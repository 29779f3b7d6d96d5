r"""AT: attention transfer on the stage outputs (`kd_jax.losses.at_loss`).

.. math:: \mathcal{L} = \sum_l \big\| \tfrac{Q^s_l}{\|Q^s_l\|_2} -
   \tfrac{Q^t_l}{\|Q^t_l\|_2} \big\|_p^p, \quad Q = \operatorname{mean}_c f^2

summed over the selected layers (RepDistiller's `feat[1:-1]`,
`features['stages'][1:]`), weight 1000.

References:
  Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the
  Performance of Convolutional Neural Networks via Attention Transfer",
  ICLR 2017. Authors' code: github.com/szagoruyko/attention-transfer;
  conventions from RepDistiller (`distiller_zoo/AT.py`).
"""

from __future__ import annotations

import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distillers.base import LayerwiseDistiller
from kd_jax.distillers.base import register


@register("at")
class ATDistiller(LayerwiseDistiller):
  r"""Attention transfer: :math:`\sum_l` `at_loss(s_l, t_l, p)` (weight 1000).

  Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017;
  RepDistiller `--distill attention -b 1000` on `feat[1:-1]`.

  >>> import jax, jax.numpy as jnp
  >>> from kd_jax.train import TermInputs
  >>> f = {'stages': [jnp.ones((2, 8, 8, 4)), jnp.ones((2, 4, 4, 8))]}
  >>> inp = TermInputs(jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32),
  ...                  student_features=f, teacher_features=f)
  >>> d = ATDistiller()
  >>> p, s = d.init(jax.random.PRNGKey(0), inp)
  >>> float(d(p, s, inp)[0])
  0.0
  """

  def __init__(self, *, p: float = 2, **kwargs):
    super().__init__(**kwargs)
    self.p = p

  def __call__(self, params, state, inputs):
    s, t = self._pairs(inputs)
    loss = sum(losses.at_loss(a, b, p=self.p) for a, b in zip(s, t))
    return jnp.asarray(loss, jnp.float32), state
