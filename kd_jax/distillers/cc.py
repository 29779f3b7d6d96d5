r"""CC: correlation congruence through linear embeddings (`kd_jax.losses.cc_loss`).

Both pooled embeddings go through a trainable `LinearEmbed` (CRD's `Embed`
without normalization); weight 0.02 (RepDistiller `--distill correlation`).

References:
  Peng et al., "Correlation Congruence for Knowledge Distillation",
  ICCV 2019. Conventions from RepDistiller (github.com/HobbitLong/
  RepDistiller, `distiller_zoo/CC.py`, `models/util.py::LinearEmbed`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distillers.base import LayerSpec
from kd_jax.distillers.base import OneLayerDistiller
from kd_jax.distillers.base import register
from kd_jax.distillers.base import apply_module
from kd_jax.distillers.base import init_module
from kd_jax.distillers.crd import Embed


@register("cc")
class CCDistiller(OneLayerDistiller):
  r"""Correlation congruence (RepDistiller `Correlation`), weight 0.02.

  Both pooled embeddings go through a trainable `LinearEmbed` (Linear to
  `feat_dim` = 128, PyTorch init, no normalization), as RepDistiller
  `--distill correlation -b 0.02`, which trains *both* the student's and the
  teacher's embedding. `cc_loss` treats its second argument as a constant, so
  the distiller calls it as `cc_loss(e_s - e_t, 0)`: the loss only depends on
  :math:`|e_s - e_t|`, and this way the gradient reaches both embeddings.

  Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019.
  """

  def __init__(self, *, feat_dim: int = 128, feature_key: str = "pooled",
               layer: LayerSpec = None):
    super().__init__(feature_key=feature_key, layer=layer)
    self.feat_dim = feat_dim

  def init(self, rng, inputs):
    s, t = self._pair(inputs)
    ks, kt = jax.random.split(rng)
    emb = Embed(self.feat_dim, normalize=False)
    ps, _ = init_module(emb, ks, s)
    pt, _ = init_module(emb, kt, t)
    return {"embed_s": ps, "embed_t": pt}, {}

  def __call__(self, params, state, inputs):
    s, t = self._pair(inputs)
    emb = Embed(self.feat_dim, normalize=False)
    es, _ = apply_module(emb, params["embed_s"], {}, s, train=inputs.train)
    et, _ = apply_module(emb, params["embed_t"], {}, t, train=inputs.train)
    d = es - et
    return losses.cc_loss(d, jnp.zeros_like(d),
                          axis_name=inputs.axis_name), state
