"""Relation distillers: SP, PKT, RKD (parameter-free) and CC (two embeddings).

These losses couple the batch; the distillers pass `inputs.axis_name`, so
under `pmap` the loss is computed on the all-gathered global batch (value and
gradients equal the 1-device ones). Default layers as in RepDistiller's
`train_student.py`: SP on `feat[-2]` (the last stage map,
`features['stages'][-1]`), PKT / RKD / CC on `feat[-1]` (the pooled
embedding, `features['pooled']`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distillers import adapters
from kd_jax.distillers.base import Distiller
from kd_jax.distillers.base import LayerSpec
from kd_jax.distillers.base import _apply_module
from kd_jax.distillers.base import _init_module


class _OneLayer(Distiller):

  def __init__(self, *, feature_key: str, layer: LayerSpec):
    self.feature_key = feature_key
    self.layer = layer

  def _pair(self, inputs):
    s = self._student(inputs, self.feature_key, self.layer)
    t = self._teacher(inputs, self.feature_key, self.layer)
    if len(s) != 1:
      raise ValueError(f"{self.name}: select exactly one feature map; "
                       f"layer={self.layer!r} selects {len(s)}.")
    return s[0], t[0]

  def init(self, rng, inputs):
    del rng
    self._pair(inputs)
    return {}, {}


class SPDistiller(_OneLayer):
  """Similarity-preserving KD, `sp_loss` on the last stage (weight 3000).

  Tung & Mori, ICCV 2019; RepDistiller `--distill similarity -b 3000`.
  """
  name = "sp"

  def __init__(self, *, feature_key: str = "stages", layer: LayerSpec = -1):
    super().__init__(feature_key=feature_key, layer=layer)

  def __call__(self, params, state, inputs):
    s, t = self._pair(inputs)
    return losses.sp_loss(s, t, axis_name=inputs.axis_name), state


class PKTDistiller(_OneLayer):
  """Probabilistic KT, `pkt_loss` on the pooled embedding (weight 30000).

  Passalis & Tefas, ECCV 2018; RepDistiller `--distill pkt -b 30000`.
  """
  name = "pkt"

  def __init__(self, *, feature_key: str = "pooled", layer: LayerSpec = None,
               eps: float = 1e-7):
    super().__init__(feature_key=feature_key, layer=layer)
    self.eps = eps

  def __call__(self, params, state, inputs):
    s, t = self._pair(inputs)
    return losses.pkt_loss(s, t, eps=self.eps,
                           axis_name=inputs.axis_name), state


class RKDDistiller(_OneLayer):
  """Relational KD (distance 25 + angle 50 inside), weight 1.

  Park, Kim, Lu & Cho, CVPR 2019; RepDistiller `--distill rkd -b 1`.
  """
  name = "rkd"

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


class CCDistiller(_OneLayer):
  r"""Correlation congruence (RepDistiller `Correlation`), weight 0.02.

  Both pooled embeddings go through a trainable `LinearEmbed` (Linear to
  `feat_dim` = 128, PyTorch init, no normalization), as RepDistiller
  `--distill correlation -b 0.02`, which trains *both* the student's and the
  teacher's embedding. `cc_loss` treats its second argument as a constant, so
  the distiller calls it as `cc_loss(e_s - e_t, 0)`: the loss only depends on
  :math:`|e_s - e_t|`, and this way the gradient reaches both embeddings.

  Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019.
  """
  name = "cc"

  def __init__(self, *, feat_dim: int = 128, feature_key: str = "pooled",
               layer: LayerSpec = None):
    super().__init__(feature_key=feature_key, layer=layer)
    self.feat_dim = feat_dim

  def init(self, rng, inputs):
    s, t = self._pair(inputs)
    ks, kt = jax.random.split(rng)
    emb = adapters.Embed(self.feat_dim, normalize=False)
    ps, _ = _init_module(emb, ks, s)
    pt, _ = _init_module(emb, kt, t)
    return {"embed_s": ps, "embed_t": pt}, {}

  def __call__(self, params, state, inputs):
    s, t = self._pair(inputs)
    emb = adapters.Embed(self.feat_dim, normalize=False)
    es, _ = _apply_module(emb, params["embed_s"], {}, s, train=inputs.train)
    et, _ = _apply_module(emb, params["embed_t"], {}, t, train=inputs.train)
    d = es - et
    return losses.cc_loss(d, jnp.zeros_like(d),
                          axis_name=inputs.axis_name), state
