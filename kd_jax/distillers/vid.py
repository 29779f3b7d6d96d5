r"""VID: variational information distillation with a regressor per layer.

For each selected layer (RepDistiller `feat[1:-1]`, `features['stages'][1:]`):
the student map is average-pooled to the teacher's size when it is taller,
mapped by `VIDRegressor` (three bias-free 1x1 convs, mid width =
teacher channels) to the predicted mean :math:`\mu`, and scored by
`kd_jax.losses.vid_loss` with a per-channel raw scale :math:`s` initialized
to `vid_init_log_scale(init_pred_var)` (:math:`\sigma^2 = 5`). Layers are
summed; weight 1 (RepDistiller `--distill vid -b 1`).

`train_log_scale=True` (RepDistiller) makes :math:`s` a parameter; False
keeps it constant in the distiller state (mdistiller, whose `log_scales` are
never registered with the optimizer).

References:
  Ahn, Hu, Damianou, Lawrence & Dai, "Variational Information Distillation
  for Knowledge Transfer", CVPR 2019. Conventions from RepDistiller
  (github.com/HobbitLong/RepDistiller, `distiller_zoo/VID.py`) and mdistiller
  (`distillers/VID.py`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distillers.base import Distiller
from kd_jax.distillers.base import LayerSpec
from kd_jax.distillers.base import apply_module
from kd_jax.distillers.base import init_module
from kd_jax.distillers.base import register
from kd_jax.models import layers as L


class VIDRegressor(nn.Module):
  """VID's regressor: 1x1 conv -> ReLU -> 1x1 conv -> ReLU -> 1x1 conv.

  No biases; PyTorch default init (RepDistiller `VIDLoss.regressor`, with
  `num_mid_channel` = teacher channels in `train_student.py`).
  """
  mid_channels: int
  out_channels: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = jnp.asarray(x, jnp.float32)
    c_in = x.shape[-1]
    x = L.torch_conv(self.mid_channels, 1, use_bias=False, fan_in=c_in,
              name="conv1")(x)
    x = nn.relu(x)
    x = L.torch_conv(self.mid_channels, 1, use_bias=False, fan_in=self.mid_channels,
              name="conv2")(x)
    x = nn.relu(x)
    return L.torch_conv(self.out_channels, 1, use_bias=False,
                 fan_in=self.mid_channels, name="conv3")(x)


@register("vid")
class VIDDistiller(Distiller):
  """VID (params: regressors and, by default, the raw scales)."""

  def __init__(self, *, feature_key: str = "stages", layers: LayerSpec = "1:",
               teacher_layers: LayerSpec = None, init_pred_var: float = 5.0,
               eps: float = 1e-5, train_log_scale: bool = True):
    self.feature_key = feature_key
    self.layers = layers
    self.teacher_layers = layers if teacher_layers is None else teacher_layers
    self.init_pred_var = init_pred_var
    self.eps = eps
    self.train_log_scale = train_log_scale

  def _pairs(self, inputs):
    s = self._student(inputs, self.feature_key, self.layers)
    t = self._teacher(inputs, self.feature_key, self.teacher_layers)
    self._check_pairs(s, t)
    out = []
    for i, (a, b) in enumerate(zip(s, t)):
      if a.ndim != 4 or b.ndim != 4:
        raise ValueError(
            f"vid: layer {i} must be NHWC maps; got student {tuple(a.shape)} "
            f"and teacher {tuple(b.shape)}.")
      if a.shape[1] > b.shape[1]:  # the reference pools the regressor input
        a = losses.adaptive_avg_pool_to(jnp.asarray(a, jnp.float32),
                                         b.shape[1])
      out.append((a, b))
    return out

  def init(self, rng, inputs):
    params, state = {}, {}
    s0 = losses.vid_init_log_scale(self.init_pred_var, self.eps)
    for i, (s, t) in enumerate(self._pairs(inputs)):
      c = t.shape[-1]
      p, _ = init_module(VIDRegressor(c, c),
                          jax.random.fold_in(rng, i), s)
      scale = jnp.full((c,), s0, jnp.float32)
      params[f"layer{i}"] = {"regressor": p}
      if self.train_log_scale:
        params[f"layer{i}"]["log_scale"] = scale
      else:
        state[f"layer{i}"] = {"log_scale": scale}
    return params, state

  def __call__(self, params, state, inputs):
    total = jnp.zeros((), jnp.float32)
    for i, (s, t) in enumerate(self._pairs(inputs)):
      c = t.shape[-1]
      p = params[f"layer{i}"]
      mu, _ = apply_module(VIDRegressor(c, c), p["regressor"], {},
                            s, train=inputs.train)
      scale = (p["log_scale"] if self.train_log_scale
               else jax.lax.stop_gradient(state[f"layer{i}"]["log_scale"]))
      total = total + losses.vid_loss(mu, t, scale, eps=self.eps)
    return total, state
