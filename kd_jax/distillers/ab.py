r"""AB: activation-boundary distillation as an initialization stage (`kd_jax.losses.ab_loss`).

RepDistiller's initialization stage (`helper/pretrain.py::init`,
`--init_epochs 30`) trains the student's feature layers and a connector per
layer (`ConvReg` without ReLU where shapes differ, identity where channels
and height match) with `ab_loss` on the pre-ReLU features `feat[1:-1]`
(`features['preact_stages'][1:]`). Main training: `loss_kd = 0`
(cross-entropy only, `-a 0 -b 1`); `joint=True` also applies the loss then.
`ABDistiller(...).pretrain` is the stage (a `PretrainStage`, see
`kd_jax.distillers.run_pretrain_stage`).

References:
  Heo, Lee, Yun & Choi, "Knowledge Transfer via Distillation of Activation
  Boundaries Formed by Hidden Neurons", AAAI 2019. Authors' code:
  github.com/bhheo/AB_distillation; conventions from RepDistiller
  (`distiller_zoo/AB.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distillers.base import Distiller
from kd_jax.distillers.base import LayerSpec
from kd_jax.distillers.base import PretrainStage
from kd_jax.distillers.base import apply_module
from kd_jax.distillers.base import init_module
from kd_jax.distillers.base import register
from kd_jax.distillers.fitnet import ConvReg


class _ABLoss(Distiller):
  """AB loss through the connectors (params: connectors; state: BN stats)."""
  name = "ab"

  def __init__(self, owner: "ABDistiller"):
    self.owner = owner

  def init(self, rng, inputs):
    return self.owner._init_connectors(rng, inputs)

  def __call__(self, params, state, inputs):
    return self.owner._loss(params, state, inputs)


@register("ab")
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
    return ConvReg(t.shape[-1], tuple(t.shape[1:3]), use_relu=False,
                            axis_name=axis_name)

  def _init_connectors(self, rng, inputs):
    params, state = {}, {}
    for i, (s, t) in enumerate(zip(*self._pairs(inputs))):
      if s.ndim == 4 and self._needs_connector(s, t):
        p, st = init_module(self._connector(t, None),
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
        s, st = apply_module(self._connector(t, inputs.axis_name),
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
