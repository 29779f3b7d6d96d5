r"""TinyBERT's hidden-state distillation for language models, any layer map.

Student block :math:`m` is paired with teacher block :math:`g(m)` (``layers``:
``'uniform'`` -- TinyBERT's :math:`g(m) = m N / M` --, ``'last'`` or explicit
``[(student, teacher), ...]`` block numbers, `base.layer_pairs`), plus the
embeddings (block 0) with ``embeddings=True``. For every pair the student's
hidden state is projected by a learned linear map :math:`W_h` when the
widths differ (``projection='auto'``; ``'always'`` / ``'none'``), trained
with the student and saved in its checkpoints (`TrainState.
distiller_params`), and

.. math::
  \mathcal L = \sum_{(m, n)} \frac{1}{|M|} \sum_{i \in M}
  D\big(h^S_{m,i} W_{h,m},\; h^T_{n,i}\big)

with :math:`D` the mean squared error over the width (``loss='mse'``,
TinyBERT's :math:`\mathrm{MSE}(H^S W_h, H^T)`; DistillKit's ``hs_mse``) or
the cosine distance (``loss='cosine'``, DistillKit's ``hs_cosine``), over
the trained token positions :math:`M` (`kd_jax.losses.hidden_state_loss`).
TinyBERT sums the layers' losses (its ``rep_loss``), as here. The features
are the models' ``hidden_states`` (embeddings and every block's output,
before the final norm; `kd_jax.models.lm.Transformer` with
``capture=('hidden_states',)``, which the trainer turns on from
`lm_features`).

Config entry (`loss.terms.<label>`): ``{'distiller': 'tinybert', 'weight':
1.0, 'layers': 'uniform', 'loss': 'mse'}``.

References:
  Jiao et al., "TinyBERT: Distilling BERT for Natural Language
  Understanding", Findings of EMNLP 2020. Authors' code:
  github.com/huawei-noah/Pretrained-Language-Model (TinyBERT,
  ``general_distill.py``: ``rep_loss``, ``fit_dense``).
  arcee-ai/DistillKit (``hs_mse`` / ``hs_cosine``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distillers.base import Distiller
from kd_jax.distillers.base import layer_pairs
from kd_jax.distillers.base import register
from kd_jax.distillers.base import token_mean

PROJECTIONS = ("auto", "always", "none")


@register("tinybert")
class TinyBERTDistiller(Distiller):
  """Hidden-state distillation with a student -> teacher layer map.

  Args:
    layers: `base.layer_pairs` spec over the transformer blocks.
    embeddings: also pair the embeddings (block 0 of both).
    loss: ``'mse'`` or ``'cosine'``.
    projection: learned ``[D_s, D_t]`` maps: when the widths differ
      (``'auto'``), always, or never.
  """
  lm_features = ("hidden_states",)

  def __init__(self, *, layers="uniform", embeddings: bool = False,
               loss: str = "mse", projection: str = "auto"):
    if loss not in ("mse", "cosine"):
      raise ValueError(f"loss must be 'mse' or 'cosine'; got {loss!r}.")
    if projection not in PROJECTIONS:
      raise ValueError(f"projection must be one of {PROJECTIONS}; got "
                       f"{projection!r}.")
    self.layers = layers
    self.embeddings = bool(embeddings)
    self.loss = loss
    self.projection = projection

  def _pairs(self, inputs):
    """[(student array, teacher array)] of the mapped hidden states."""
    s = self._student(inputs, "hidden_states", None)
    t = self._teacher(inputs, "hidden_states", None)
    pairs = layer_pairs(self.layers, len(s) - 1, len(t) - 1)
    if self.embeddings:
      pairs = ((0, 0),) + pairs
    return [(s[a], t[b]) for a, b in pairs]

  def _project(self, s, t) -> bool:
    return self.projection == "always" or (
        self.projection == "auto" and s.shape[-1] != t.shape[-1])

  def init(self, rng, inputs):
    params = {}
    for i, (s, t) in enumerate(self._pairs(inputs)):
      if self._project(s, t):
        params[f"proj_{i}"] = nn.Dense(t.shape[-1], use_bias=False).init(
            jax.random.fold_in(rng, i), s[:1, :1])["params"]
      elif s.shape[-1] != t.shape[-1]:
        raise ValueError(f"tinybert: pair {i} has widths {s.shape[-1]} and "
                         f"{t.shape[-1]}; set projection='auto'.")
    return params, {}

  def __call__(self, params, state, inputs):
    total = jnp.zeros((), jnp.float32)
    for i, (s, t) in enumerate(self._pairs(inputs)):
      s = jnp.asarray(s, jnp.float32)
      if f"proj_{i}" in params:
        s = nn.Dense(t.shape[-1], use_bias=False).apply(
            {"params": params[f"proj_{i}"]}, s)
      per_pos = losses.hidden_state_loss(s, t, kind=self.loss,
                                         where=inputs.where)
      total = total + token_mean(per_pos, inputs.where)
    return total, state
