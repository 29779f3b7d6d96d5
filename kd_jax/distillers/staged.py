r"""Two-stage distillers of RepDistiller: AB, FSP and FT.

In RepDistiller these methods first run an *initialization stage*
(`helper/pretrain.py::init`, `--init_epochs 30`), then the usual training:

* **AB** (activation boundaries): the stage trains the student's feature
  layers and a connector per layer (`ConvReg` without ReLU where shapes
  differ, identity where channels and height match) with `ab_loss` on the
  pre-ReLU features `feat[1:-1]` (`features['preact_stages'][1:]`). Main
  training: `loss_kd = 0` (cross-entropy only, `-a 0 -b 1`).
* **FSP**: the stage trains the student's feature layers with `fsp_loss` on
  `feat[:-1]` (`features['stages']`, stem included); main training:
  `loss_kd = 0`.
* **FT** (factor transfer): the stage trains a `Paraphraser` (autoencoder,
  `use_bn=False`) to reconstruct the teacher's `feat[-2]` (MSE), the student
  untouched (lr 0.01 for ResNet/WRN students). Main training: a `Translator`
  (trainable) maps the student's `feat[-2]` to a factor; the paraphraser's
  encoder (frozen, kept in the distiller *state*) gives the teacher's factor;
  `ft_loss(p1=2, p2=1)` with weight 200.

`joint=True` (AB, FSP) also applies the loss during the main training (not
the reference's default). Each distiller's `pretrain` is a `PretrainStage`
(see `kd_jax.distillers.run_pretrain_stage`); until the stage has run, the
stage's adapters sit (untrained) in the main distiller's state.

References:
  Heo, Lee, Yun & Choi, "Knowledge Transfer via Distillation of Activation
  Boundaries Formed by Hidden Neurons", AAAI 2019.
  Yim, Joo, Bae & Kim, "A Gift from Knowledge Distillation: Fast
  Optimization, Network Minimization and Transfer Learning", CVPR 2017.
  Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via
  Factor Transfer", NeurIPS 2018.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distillers import adapters
from kd_jax.distillers.base import Distiller
from kd_jax.distillers.base import LayerSpec
from kd_jax.distillers.base import PretrainStage
from kd_jax.distillers.base import _apply_module
from kd_jax.distillers.base import _init_module


# ---------------------------------------------------------------------- AB --

class _ABLoss(Distiller):
  """AB loss through the connectors (params: connectors; state: BN stats)."""
  name = "ab"

  def __init__(self, owner: "ABDistiller"):
    self.owner = owner

  def init(self, rng, inputs):
    return self.owner._init_connectors(rng, inputs)

  def __call__(self, params, state, inputs):
    return self.owner._loss(params, state, inputs)


class ABDistiller(Distiller):
  """Activation-boundary distillation (RepDistiller `abound`).

  Args:
    margin: AB margin `m` (1.0).
    feature_key: pre-ReLU features (`'preact_stages'`).
    layers / teacher_layers: selection (`'1:'` = RepDistiller `feat[1:-1]`).
    joint: also apply the AB loss in the main training (default False: the
      reference uses it in the initialization stage only).
    pretrain_epochs: RepDistiller `--init_epochs` (30).
  """
  name = "ab"

  def __init__(self, *, margin: float = 1.0,
               feature_key: str = "preact_stages", layers: LayerSpec = "1:",
               teacher_layers: LayerSpec = None, joint: bool = False,
               pretrain_epochs: int = 30):
    self.margin = margin
    self.feature_key = feature_key
    self.layers = layers
    self.teacher_layers = layers if teacher_layers is None else teacher_layers
    self.joint = joint
    stage = _ABLoss(self)
    if joint:
      to_stage = lambda p, s: (p, s)  # noqa: E731
      to_main = lambda sp, ss, mp, ms: (sp, ss)  # noqa: E731
    else:
      to_stage = lambda p, s: (s["connectors"]["params"],  # noqa: E731
                               s["connectors"]["batch_stats"])
      to_main = lambda sp, ss, mp, ms: (  # noqa: E731
          {}, {"connectors": {"params": sp, "batch_stats": ss}})
    self.pretrain = PretrainStage(
        distiller=stage, train_student=True, epochs=pretrain_epochs,
        description="AB initialization: student feature layers + connectors "
                    "minimize the activation-boundary loss",
        to_stage=to_stage, to_main=to_main)

  def _pairs(self, inputs):
    s = self._student(inputs, self.feature_key, self.layers)
    t = self._teacher(inputs, self.feature_key, self.teacher_layers)
    self._check_pairs(s, t)
    return s, t

  @staticmethod
  def _needs_connector(s, t):
    # RepDistiller Connector: identity iff channels and height match.
    return not (s.shape[-1] == t.shape[-1] and s.shape[1] == t.shape[1])

  def _connector(self, t, axis_name):
    return adapters.ConvReg(t.shape[-1], tuple(t.shape[1:3]), use_relu=False,
                            axis_name=axis_name)

  def _init_connectors(self, rng, inputs):
    params, state = {}, {}
    for i, (s, t) in enumerate(zip(*self._pairs(inputs))):
      if s.ndim == 4 and self._needs_connector(s, t):
        p, st = _init_module(self._connector(t, None),
                             jax.random.fold_in(rng, i), s)
      elif s.shape != t.shape:
        raise ValueError(
            f"ab: layer {i} has student {tuple(s.shape)} and teacher "
            f"{tuple(t.shape)}; a connector needs NHWC maps.")
      else:
        p, st = {}, {}
      params[f"connector{i}"] = p
      state[f"connector{i}"] = st
    return params, state

  def _loss(self, params, state, inputs):
    s_list, t_list = self._pairs(inputs)
    outs, new_state = [], {}
    for i, (s, t) in enumerate(zip(s_list, t_list)):
      key = f"connector{i}"
      if params[key]:
        s, st = _apply_module(self._connector(t, inputs.axis_name),
                              params[key], state[key], s, train=inputs.train)
      else:
        st = state[key]
      outs.append(s)
      new_state[key] = st
    return losses.ab_loss(outs, t_list, margin=self.margin), new_state

  def init(self, rng, inputs):
    p, s = self._init_connectors(rng, inputs)
    if self.joint:
      return p, s
    return {}, {"connectors": {"params": p, "batch_stats": s}}

  def __call__(self, params, state, inputs):
    if self.joint:
      return self._loss(params, state, inputs)
    return jnp.zeros((), jnp.float32), state


# --------------------------------------------------------------------- FSP --

class FSPDistiller(Distiller):
  """FSP (RepDistiller `fsp`): `fsp_loss` on `features['stages']`.

  Args:
    feature_key / layers / teacher_layers: selection (all stages, stem
      included, = RepDistiller `feat[:-1]`).
    joint: also apply the loss in the main training (default False).
    pretrain_epochs: 30.
  """
  name = "fsp"

  def __init__(self, *, feature_key: str = "stages", layers: LayerSpec = None,
               teacher_layers: LayerSpec = None, joint: bool = False,
               pretrain_epochs: int = 30):
    self.feature_key = feature_key
    self.layers = layers
    self.teacher_layers = layers if teacher_layers is None else teacher_layers
    self.joint = joint
    stage = self if joint else FSPDistiller(
        feature_key=feature_key, layers=layers, teacher_layers=teacher_layers,
        joint=True, pretrain_epochs=0)
    self.pretrain = PretrainStage(
        distiller=stage, train_student=True, epochs=pretrain_epochs,
        description="FSP initialization: student feature layers minimize "
                    "the FSP-matrix loss",
        to_stage=lambda p, s: ({}, {}),
        to_main=lambda sp, ss, mp, ms: (mp, ms))

  def _pairs(self, inputs):
    s = self._student(inputs, self.feature_key, self.layers)
    t = self._teacher(inputs, self.feature_key, self.teacher_layers)
    self._check_pairs(s, t)
    return s, t

  def init(self, rng, inputs):
    del rng
    self._pairs(inputs)
    return {}, {}

  def __call__(self, params, state, inputs):
    if not self.joint:
      return jnp.zeros((), jnp.float32), state
    s, t = self._pairs(inputs)
    return losses.fsp_loss(s, t), state


# ---------------------------------------------------------------------- FT --

class _ParaphraserStage(Distiller):
  """FT stage loss: MSE between the paraphraser's reconstruction and f_t."""
  name = "ft_paraphraser"

  def __init__(self, owner: "FTDistiller"):
    self.owner = owner

  def init(self, rng, inputs):
    t = self.owner._teacher_feat(inputs)
    p, st = _init_module(self.owner._paraphraser(t, None), rng, t)
    return p, st

  def __call__(self, params, state, inputs):
    t = self.owner._teacher_feat(inputs)
    (_, rec), st = _apply_module(self.owner._paraphraser(t, inputs.axis_name),
                                 params, state, t, train=inputs.train)
    return jnp.mean((rec - t) ** 2), st


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
  name = "ft"

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
    return adapters.Paraphraser(t.shape[-1], k=self.k,
                                use_bn=self.paraphraser_bn,
                                axis_name=axis_name)

  def _translator(self, t, axis_name):
    return adapters.Translator(t.shape[-1], k=self.k,
                               use_bn=self.translator_bn, axis_name=axis_name)

  def init(self, rng, inputs):
    s, t = self._student_feat(inputs), self._teacher_feat(inputs)
    kp, kt = jax.random.split(rng)
    pp, ps = _init_module(self._paraphraser(t, None), kp, t)
    tp, ts = _init_module(self._translator(t, None), kt, s)
    return ({"translator": tp},
            {"translator": ts,
             "paraphraser": {"params": pp, "batch_stats": ps}})

  def __call__(self, params, state, inputs):
    s, t = self._student_feat(inputs), self._teacher_feat(inputs)
    factor_s, ts = _apply_module(self._translator(t, inputs.axis_name),
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
