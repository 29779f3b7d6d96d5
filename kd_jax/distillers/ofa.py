r"""OFA-KD: per-stage projector branches to logit space + `ofa_loss`.

For every selected student stage, a projector branch maps the stage's
feature to class logits, and `kd_jax.losses.ofa_loss` (adaptive target
enhancement, exponent `eps`) compares it with the teacher's logits:

.. math:: \mathcal{L} = \sum_{s} \operatorname{mean}_b\,
   \mathrm{OFA}_{\epsilon_s}\big(g_s(f^s_s), z^t, y\big)

(OFAKD's `loss_ofa`, weight `--ofa-loss-weight` 1). The loss on the
student's own logits (`loss_kd`, eps of the last entry) is a plain logit
term: add `Term('ofa', weight, eps=...)` next to this distiller.

Branches (Hao840/OFAKD `distillers/ofa.py`):

* CNN students (`branch='cnn'`, NHWC stage maps): stage `s` of `S` gets
  `S - s` `SepConv` down-sampling blocks (channels doubled, the last to
  `max(D_s, D_t)`; a 1x1 conv for the last stage), global average pooling and
  a Linear (`D_s`, `D_t`: the student's / teacher's pooled feature sizes).
  OFAKD hard-codes `S = 4` (ImageNet CNNs); here `S` = the last selected
  stage (`num_stages`), so 3-stage CIFAR ResNets work the same way.
* ViT students (`branch='vit'`, tokens `[B, 1 + N, D]`): patch merging down
  to a 7x7 grid, `max(4 - s, 1)` transformer blocks (4 heads), the class
  token and a Linear.

Initialization as OFAKD's `init_weights` (conv Kaiming-normal fan-out, BN
1/0, Linear truncated normal 0.02, bias 0).

References:
  Hao, Guo, Han, Tang, Hu, Wang & Xu, "One-for-All: Bridge the Gap Between
  Heterogeneous Architectures in Knowledge Distillation", NeurIPS 2023.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distillers import adapters
from kd_jax.distillers.base import Distiller
from kd_jax.distillers.base import _apply_module
from kd_jax.distillers.base import _init_module


class OFADistiller(Distiller):
  """OFA projector branches (params: branches; state: their BN stats).

  Args:
    stages: 1-based stage numbers (OFAKD `--ofa-stage`), default `(1, 2, 3)`
      for 3-stage CIFAR CNNs (`(1, 2, 3, 4)` for ImageNet CNNs / ViTs).
    layers: index into `features[feature_key]` of each stage; default: the
      stage number itself (`stages[s]` of the zoo CNNs, whose entry 0 is the
      stem). For the zoo ViTs pass `kd_jax.models.vit.OFA_STAGE_BLOCKS`.
    branch: `'cnn'` or `'vit'`.
    num_stages: `S` (default: the largest stage number).
    eps: `ofa_loss` exponent, a number or one per stage (OFAKD: 1 on CIFAR,
      1.5 on ImageNet).
    temperature: `ofa_loss` temperature (1).
    vit_blocks: transformer blocks per ViT branch (default `max(4 - s, 1)`).
  """
  name = "ofa"

  def __init__(self, *, stages: Sequence[int] = (1, 2, 3),
               layers: Optional[Sequence[int]] = None,
               feature_key: str = "stages", branch: str = "cnn",
               num_stages: Optional[int] = None,
               eps: Union[float, Sequence[float]] = 1.0,
               temperature: float = 1.0, num_tokens: int = 1,
               vit_blocks: Optional[Sequence[int]] = None):
    if branch not in ("cnn", "vit"):
      raise ValueError(f"ofa: `branch` must be 'cnn' or 'vit'; got {branch!r}.")
    self.stages = tuple(int(s) for s in stages)
    if not self.stages or min(self.stages) < 1:
      raise ValueError(f"ofa: `stages` must be 1-based stage numbers; got "
                       f"{stages!r}.")
    self.layers = tuple(self.stages if layers is None else layers)
    if len(self.layers) != len(self.stages):
      raise ValueError(f"ofa: `layers` needs one index per stage; got "
                       f"{self.layers} for stages {self.stages}.")
    self.feature_key = feature_key
    self.branch = branch
    self.num_stages = num_stages or max(self.stages)
    if isinstance(eps, (int, float)):
      eps = (float(eps),) * len(self.stages)
    self.eps = tuple(float(e) for e in eps)
    if len(self.eps) != len(self.stages):
      raise ValueError(f"ofa: `eps` needs one value per stage; got {self.eps}.")
    self.temperature = temperature
    self.num_tokens = num_tokens
    self.vit_blocks = (None if vit_blocks is None
                       else tuple(int(b) for b in vit_blocks))

  def _feats(self, inputs):
    return self._student(inputs, self.feature_key, list(self.layers))

  def _dims(self, inputs):
    s = self._student(inputs, "pooled", None)[0]
    t = self._teacher(inputs, "pooled", None)[0]
    return s.shape[-1], t.shape[-1], inputs.student_logits.shape[-1]

  def _branches(self, inputs, axis_name):
    ds, dt, k = self._dims(inputs)
    out = []
    for i, st in enumerate(self.stages):
      if self.branch == "cnn":
        out.append(adapters.CNNBranch(self.num_stages - st, max(ds, dt), k,
                                      axis_name=axis_name))
      else:
        nb = (self.vit_blocks[i] if self.vit_blocks is not None
              else max(4 - st, 1))
        out.append(adapters.ViTBranch(nb, ds, k, num_tokens=self.num_tokens))
    return out

  def init(self, rng, inputs):
    feats = self._feats(inputs)
    params, state = {}, {}
    for i, (br, f) in enumerate(zip(self._branches(inputs, None), feats)):
      p, st = _init_module(br, jax.random.fold_in(rng, i), f)
      params[f"stage{self.stages[i]}"] = p
      state[f"stage{self.stages[i]}"] = st
    return params, state

  def __call__(self, params, state, inputs):
    if inputs.teacher_logits is None or isinstance(inputs.teacher_logits,
                                                   (list, tuple)):
      raise ValueError("ofa: needs the logits of a single teacher.")
    feats = self._feats(inputs)
    total = jnp.zeros((), jnp.float32)
    new_state = {}
    for i, (br, f) in enumerate(zip(self._branches(inputs, inputs.axis_name),
                                    feats)):
      key = f"stage{self.stages[i]}"
      logits, st = _apply_module(br, params[key], state[key], f,
                                 train=inputs.train)
      new_state[key] = st
      total = total + jnp.mean(losses.ofa_loss(
          logits, inputs.teacher_logits, inputs.labels, eps=self.eps[i],
          temperature=self.temperature))
    return total, new_state
