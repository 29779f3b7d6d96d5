r"""FT: factor transfer through a paraphraser and a translator (`kd_jax.losses.ft_loss`).

Initialization stage (RepDistiller `helper/pretrain.py`, 30 epochs): a
`Paraphraser` (autoencoder, `use_bn=False`) learns to reconstruct the
teacher's `feat[-2]` (MSE), the student untouched (lr 0.01 for ResNet/WRN
students). Main training: a `Translator` (trainable) maps the student's
`feat[-2]` to a factor; the paraphraser's encoder (frozen, kept in the
distiller *state*) gives the teacher's factor; `ft_loss(p1=2, p2=1)`,
weight 200.

References:
  Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via
  Factor Transfer", NeurIPS 2018. Conventions from RepDistiller
  (github.com/HobbitLong/RepDistiller, `distiller_zoo/FT.py`,
  `models/util.py::Paraphraser/Translator`).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distillers.base import Distiller
from kd_jax.distillers.base import LayerSpec
from kd_jax.distillers.base import PretrainStage
from kd_jax.distillers.base import apply_module
from kd_jax.distillers.base import init_module
from kd_jax.distillers.base import register
from kd_jax.models import layers as L


def _leaky(x):
  return nn.leaky_relu(x, negative_slope=0.1)


class _FTEncoder(nn.Module):
  """conv3x3(in, in) [BN] LReLU, conv3x3(in, out) [BN] LReLU, conv3x3(out, out)."""
  out_channels: int
  use_bn: bool
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    c_in = x.shape[-1]
    widths = (c_in, self.out_channels, self.out_channels)
    prev = c_in
    for i, w in enumerate(widths):
      x = L.torch_conv(w, 3, padding=1, use_bias=True, fan_in=prev * 9,
                name=f"conv{i}")(x)
      if self.use_bn:
        x = L.batch_norm(train, self.axis_name, name=f"bn{i}")(x)
      x = _leaky(x)
      prev = w
    return x


class Paraphraser(nn.Module):
  """FT paraphraser (an autoencoder of the teacher feature), `k = 0.5`.

  Encoder: three 3x3 convs (`C -> C -> kC -> kC`), decoder: three 3x3
  transposed convs (`kC -> kC -> C -> C`), each followed by LeakyReLU(0.1)
  (and a BN with `use_bn`; RepDistiller's FT uses `use_bn=False`). Returns the
  factor with `is_factor=True`, else `(factor, reconstruction)`.
  """
  channels: int
  k: float = 0.5
  use_bn: bool = False
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = True, is_factor: bool = False):
    x = jnp.asarray(x, jnp.float32)
    out = int(self.channels * self.k)
    factor = _FTEncoder(out, self.use_bn, self.axis_name, name="encoder")(
        x, train)
    if is_factor:
      return factor
    h = factor
    prev = out
    for i, w in enumerate((out, self.channels, self.channels)):
      h = L.torch_conv_transpose(w, 3, stride=1, padding=1, fan_in=w * 9,
                          name=f"decoder_conv{i}")(h)
      if self.use_bn:
        h = L.batch_norm(train, self.axis_name, name=f"decoder_bn{i}")(h)
      h = _leaky(h)
      prev = w
    del prev
    return factor, h


class Translator(nn.Module):
  """FT translator: the paraphraser's encoder on the student feature (BN on)."""
  teacher_channels: int
  k: float = 0.5
  use_bn: bool = True
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = jnp.asarray(x, jnp.float32)
    return _FTEncoder(int(self.teacher_channels * self.k), self.use_bn,
                      self.axis_name, name="encoder")(x, train)


class _ParaphraserStage(Distiller):
  """FT stage loss: MSE between the paraphraser's reconstruction and f_t."""
  name = "ft_paraphraser"

  def __init__(self, owner: "FTDistiller"):
    self.owner = owner

  def init(self, rng, inputs):
    t = self.owner._teacher_feat(inputs)
    p, st = init_module(self.owner._paraphraser(t, None), rng, t)
    return p, st

  def __call__(self, params, state, inputs):
    t = self.owner._teacher_feat(inputs)
    (_, rec), st = apply_module(self.owner._paraphraser(t, inputs.axis_name),
                                 params, state, t, train=inputs.train)
    return jnp.mean((rec - t) ** 2), st


@register("ft")
class FTDistiller(Distiller):
  """Factor transfer (RepDistiller `factor`, weight 200).

  Params: the translator; state: its BN statistics and the paraphraser
  (params + stats), which is frozen during the main training.

  Args:
    feature_key / layer: the feature map (`'stages'`, -1 = RepDistiller
      `feat[-2]`).
    k: factor rate (0.5).
    p1 / p2: `ft_loss` powers (2, 1).
    pretrain_epochs: 30; `pretrain_lr`: RepDistiller uses 0.01 for
      ResNet/WRN students, the main learning rate otherwise.
  """

  def __init__(self, *, feature_key: str = "stages", layer: LayerSpec = -1,
               k: float = 0.5, p1: float = 2, p2: float = 1,
               paraphraser_bn: bool = False, translator_bn: bool = True,
               pretrain_epochs: int = 30, pretrain_lr=None):
    self.feature_key = feature_key
    self.layer = layer
    self.k = k
    self.p1 = p1
    self.p2 = p2
    self.paraphraser_bn = paraphraser_bn
    self.translator_bn = translator_bn
    self.pretrain = PretrainStage(
        distiller=_ParaphraserStage(self), train_student=False,
        epochs=pretrain_epochs, learning_rate=pretrain_lr,
        description="FT paraphraser: an autoencoder of the teacher feature "
                    "(student frozen)",
        to_stage=lambda p, s: (s["paraphraser"]["params"],
                               s["paraphraser"]["batch_stats"]),
        to_main=lambda sp, ss, mp, ms: (
            mp, {**ms, "paraphraser": {"params": sp, "batch_stats": ss}}))

  def _teacher_feat(self, inputs):
    t = self._teacher(inputs, self.feature_key, self.layer)
    if len(t) != 1 or t[0].ndim != 4:
      raise ValueError(f"ft: select one NHWC teacher map; got "
                       f"{[tuple(x.shape) for x in t]}.")
    return jnp.asarray(t[0], jnp.float32)

  def _student_feat(self, inputs):
    s = self._student(inputs, self.feature_key, self.layer)
    if len(s) != 1 or s[0].ndim != 4:
      raise ValueError(f"ft: select one NHWC student map; got "
                       f"{[tuple(x.shape) for x in s]}.")
    return s[0]

  def _paraphraser(self, t, axis_name):
    return Paraphraser(t.shape[-1], k=self.k,
                                use_bn=self.paraphraser_bn,
                                axis_name=axis_name)

  def _translator(self, t, axis_name):
    return Translator(t.shape[-1], k=self.k,
                               use_bn=self.translator_bn, axis_name=axis_name)

  def init(self, rng, inputs):
    s, t = self._student_feat(inputs), self._teacher_feat(inputs)
    kp, kt = jax.random.split(rng)
    pp, ps = init_module(self._paraphraser(t, None), kp, t)
    tp, ts = init_module(self._translator(t, None), kt, s)
    return ({"translator": tp},
            {"translator": ts,
             "paraphraser": {"params": pp, "batch_stats": ps}})

  def __call__(self, params, state, inputs):
    s, t = self._student_feat(inputs), self._teacher_feat(inputs)
    factor_s, ts = apply_module(self._translator(t, inputs.axis_name),
                                 params["translator"], state["translator"], s,
                                 train=inputs.train)
    para = jax.lax.stop_gradient(state["paraphraser"])
    # RepDistiller puts the paraphraser in eval mode for the main training.
    factor_t = self._paraphraser(t, None).apply(
        {"params": para["params"], **({"batch_stats": para["batch_stats"]}
                                      if para["batch_stats"] else {})},
        t, train=False, is_factor=True)
    loss = losses.ft_loss(factor_s, factor_t, p1=self.p1, p2=self.p2)
    return loss, {**state, "translator": ts}
