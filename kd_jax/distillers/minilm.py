r"""MiniLM / MiniLMv2: self-attention (relation) distillation for LMs.

For a student block :math:`m` paired with teacher block :math:`n`
(``layers``: ``'last'`` -- MiniLM's choice --, ``'uniform'`` or explicit
pairs, `base.layer_pairs`), each relation in ``relations`` compares the
teacher's and the student's row-softmaxed scaled dot products of one
layer's vectors, split into :math:`R` relation heads
(`kd_jax.losses.attention_relation_loss`, KL(teacher || student), causal):

* ``'qk'``: the attention distributions :math:`\mathrm{softmax}(q k^\top /
  \sqrt{d_h})` -- MiniLM's attention transfer (keys of grouped-query
  attention repeated to the query heads, so the relation is the model's own
  attention); :math:`R` = the number of attention heads, which teacher and
  student must share;
* ``'vv'``: the value relation :math:`\mathrm{softmax}(v v^\top /
  \sqrt{d})` -- MiniLM's second term;
* ``'qq'``, ``'kk'``, ``'vv'`` with any ``num_relation_heads`` :math:`R`
  dividing both models' widths: MiniLMv2's multi-head self-attention
  relations (the heads concatenated, then split into :math:`R`), so teacher
  and student may differ in heads and width.

.. math::
  \mathcal L = \sum_{(m, n)} \sum_{rel} \frac{1}{|M|} \sum_{i \in M}
  \frac{1}{R} \sum_r \mathrm{KL}(A^T_{rel,r,i} \,\|\, A^S_{rel,r,i})

over the trained query positions :math:`M`. MiniLM = ``relations=('qk',
'vv')`` with :math:`R` = heads; MiniLMv2 = ``relations=('qq', 'kk',
'vv')`` with e.g. :math:`R` = 48 (base models). The features are the
models' per-block queries / keys / values (`kd_jax.models.lm.Transformer`
with ``capture=('attention',)``, q and k after RoPE, as the attention sees
them); the trainer turns the capture on from `lm_features`.

Config entry: ``{'distiller': 'minilm', 'weight': 1.0, 'relations': ('qq',
'kk', 'vv'), 'num_relation_heads': 4, 'layers': 'last'}``.

References:
  Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic
  Compression of Pre-Trained Transformers", NeurIPS 2020.
  Wang et al., "MiniLMv2: Multi-Head Self-Attention Relation Distillation
  for Compressing Pretrained Transformers", Findings of ACL 2021.
  (microsoft/unilm, ``minilm``: checkpoints; the losses follow the papers'
  equations.)
"""

from __future__ import annotations

import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distillers.base import Distiller
from kd_jax.distillers.base import layer_pairs
from kd_jax.distillers.base import register
from kd_jax.distillers.base import token_mean

RELATIONS = ("qk", "qq", "kk", "vv")


def _flat(x):
  """``[B, T, H, Dh]`` -> ``[B, T, H * Dh]`` (heads concatenated)."""
  return x.reshape(x.shape[:2] + (-1,))


def _vectors(att, rel: str):
  """(a, b, natural relation heads) of relation `rel` of one block."""
  q, k, v = att["q"], att["k"], att["v"]
  if rel == "qk":
    k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)  # GQA -> query heads
    return _flat(q), _flat(k), q.shape[2]
  x = {"qq": q, "kk": k, "vv": v}[rel]
  return _flat(x), _flat(x), x.shape[2]


@register("minilm")
class MiniLMDistiller(Distiller):
  """Self-attention (relation) distillation, MiniLM / MiniLMv2.

  Args:
    relations: subset of ``('qk', 'qq', 'kk', 'vv')``.
    num_relation_heads: :math:`R`; 0: each relation's own head count (the
      query heads for 'qk' / 'qq', the key-value heads for 'kk' / 'vv'),
      which must then be the same in teacher and student.
    layers: `base.layer_pairs` spec over the blocks (default ``'last'``).
  """
  lm_features = ("attention",)

  def __init__(self, *, relations=("qk", "vv"), num_relation_heads: int = 0,
               layers="last"):
    relations = tuple(relations)
    bad = [r for r in relations if r not in RELATIONS]
    if bad or not relations:
      raise ValueError(f"relations must be a non-empty subset of {RELATIONS};"
                       f" got {relations!r}.")
    if not isinstance(num_relation_heads, int) or num_relation_heads < 0:
      raise ValueError(f"num_relation_heads must be an int >= 0; got "
                       f"{num_relation_heads!r}.")
    self.relations = relations
    self.num_relation_heads = num_relation_heads
    self.layers = layers

  def _terms(self, inputs):
    """[(student a, student b, teacher a, teacher b, R)] of every pair and
    relation (checked on the real shapes)."""
    s = self._student(inputs, "attention", None)
    t = self._teacher(inputs, "attention", None)
    out = []
    for m, n in layer_pairs(self.layers, len(s), len(t)):
      for rel in self.relations:
        sa, sb, hs = _vectors(s[m - 1], rel)
        ta, tb, ht = _vectors(t[n - 1], rel)
        r = self.num_relation_heads
        if not r:
          if hs != ht:
            raise ValueError(
                f"minilm: relation {rel!r} has {hs} student and {ht} "
                "teacher heads; set num_relation_heads (MiniLMv2) to a "
                "number dividing both widths.")
          r = hs
        out.append((sa, sb, ta, tb, r))
    return out

  def init(self, rng, inputs):
    del rng
    for sa, _, ta, _, r in self._terms(inputs):
      if sa.shape[-1] % r or ta.shape[-1] % r:
        raise ValueError(f"minilm: {r} relation heads do not divide the "
                         f"widths {sa.shape[-1]} (student) and "
                         f"{ta.shape[-1]} (teacher).")
    return {}, {}

  def __call__(self, params, state, inputs):
    total = jnp.zeros((), jnp.float32)
    for sa, sb, ta, tb, r in self._terms(inputs):
      per_pos = losses.attention_relation_loss(
          sa, sb, ta, tb, num_relation_heads=r, where=inputs.where)
      total = total + token_mean(per_pos, inputs.where)
    return total, state
