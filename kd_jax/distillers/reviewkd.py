r"""ReviewKD: knowledge review with attention-based fusion (ABF) + HCL.

The student's features, deepest first (mdistiller `ReviewKD`: `feats[1:]`
plus the pooled vector as a `1x1` map), go through one `ABF` per
level; each level fuses its own (1x1-conv'd) feature with the residual from
the deeper level (nearest upsampling, per-pixel sigmoid attention), and a 3x3
conv maps the result to the teacher's channels at the teacher's size. The
outputs are compared with the teacher's *pre-ReLU* features
(`preact_feats[1:]` + pooled) by `kd_jax.losses.hcl_loss` (MSE at full
resolution and pooled to 4, 2, 1).

Channel and size configuration is read from the feature shapes at `init`
(mdistiller's `IN_CHANNELS` = student channels, `OUT_CHANNELS` = teacher
channels, `SHAPES` / `OUT_SHAPES` = student / teacher heights, mid channels
`min(512, student channels of the deepest level)`). Weights: 5.0 with a
20-epoch linear warm-up for CIFAR-100 resnet32x4 -> resnet8x4 (mdistiller
`configs/cifar100/reviewkd.yaml`; warm-up `min(epoch / 20, 1)` from the
`Objective`).

References:
  Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review",
  CVPR 2021. Authors' code: github.com/dvlab-research/ReviewKD;
  conventions from mdistiller (`distillers/ReviewKD.py`).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distillers.base import Distiller
from kd_jax.distillers.base import LayerSpec
from kd_jax.distillers.base import register
from kd_jax.models import layers as L


def nearest_resize(x, size: int):
  """`F.interpolate(x, (size, size), mode='nearest')` for NHWC `x`.

  Source index `floor(i * in / out)` per axis (PyTorch's legacy 'nearest').

  >>> import jax.numpy as jnp
  >>> nearest_resize(jnp.arange(4.).reshape(1, 2, 2, 1), 4)[0, :, :, 0]
  Array([[0., 0., 1., 1.],
         [0., 0., 1., 1.],
         [2., 2., 3., 3.],
         [2., 2., 3., 3.]], dtype=float32)
  """
  h, w = x.shape[1], x.shape[2]
  if h == size and w == size:
    return x
  ih = (jnp.arange(size) * h) // size
  iw = (jnp.arange(size) * w) // size
  return x[:, ih][:, :, iw]


class ABF(nn.Module):
  """ReviewKD attention-based fusion block.

  `conv1` (1x1, no bias) + BN maps the student feature to `mid` channels; with
  `fuse`, the residual from the deeper level is nearest-upsampled to `shape`
  and mixed with the per-pixel weights `sigmoid(att_conv([x, y]))`; the
  result is resized to `out_shape` and `conv2` (3x3, no bias) + BN maps it to
  the teacher's channels. Returns `(output, residual)`. Convs use
  `kaiming_uniform_(a=1)`; `att_conv` (1x1 with bias) PyTorch's default.
  """
  mid_channels: int
  out_channels: int
  fuse: bool
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, y=None, shape=None, out_shape=None, train=True):
    x = jnp.asarray(x, jnp.float32)
    x = L.torch_conv(self.mid_channels, 1, use_bias=False,
              kernel_init=L.kaiming_uniform_a1, name="conv1")(x)
    x = L.batch_norm(train, self.axis_name, name="bn1")(x)
    if self.fuse:
      if y is None or shape is None:
        raise ValueError("ABF with fuse=True needs the residual `y` and "
                         "`shape`.")
      y = nearest_resize(y, shape)
      z = jnp.concatenate([x, y], axis=-1)
      z = nn.sigmoid(L.torch_conv(2, 1, use_bias=True, fan_in=2 * self.mid_channels,
                           name="att_conv")(z))
      x = x * z[..., 0:1] + y * z[..., 1:2]
    if out_shape is not None and x.shape[1] != out_shape:
      x = nearest_resize(x, out_shape)
    out = L.torch_conv(self.out_channels, 3, padding=1, use_bias=False,
                kernel_init=L.kaiming_uniform_a1, name="conv2")(x)
    out = L.batch_norm(train, self.axis_name, name="bn2")(out)
    return out, x


def _as_map(x):
  x = jnp.asarray(x)
  if x.ndim == 2:
    return x[:, None, None, :]
  if x.ndim != 4:
    raise ValueError(f"reviewkd: features must be NHWC maps or [B, C] "
                     f"vectors; got shape {tuple(x.shape)}.")
  return x


@register("reviewkd")
class ReviewKDDistiller(Distiller):
  """ReviewKD (params: the ABF modules; state: their BN statistics).

  Args:
    student_key: student features (`'stages'`; `'preact_stages'` =
      mdistiller `STU_PREACT=True`).
    teacher_key: teacher features (`'preact_stages'`).
    layers / teacher_layers: selection (`'1:'`).
    include_pooled: append `features['pooled']` as a `1x1` level (True).
    max_mid_channels: 512.
    levels: `hcl_loss` pooling sizes (4, 2, 1).
  """

  def __init__(self, *, student_key: str = "stages",
               teacher_key: str = "preact_stages", layers: LayerSpec = "1:",
               teacher_layers: LayerSpec = None, include_pooled: bool = True,
               max_mid_channels: int = 512, levels=(4, 2, 1)):
    self.student_key = student_key
    self.teacher_key = teacher_key
    self.layers = layers
    self.teacher_layers = layers if teacher_layers is None else teacher_layers
    self.include_pooled = include_pooled
    self.max_mid_channels = max_mid_channels
    self.levels = tuple(levels)

  def _lists(self, inputs):
    s = self._student(inputs, self.student_key, self.layers)
    t = self._teacher(inputs, self.teacher_key, self.teacher_layers)
    if self.include_pooled:
      s = s + self._student(inputs, "pooled", None)
      t = t + self._teacher(inputs, "pooled", None)
    self._check_pairs(s, t)
    return [_as_map(x) for x in s], [_as_map(x) for x in t]

  def _abfs(self, s_list, t_list, axis_name):
    mid = min(self.max_mid_channels, s_list[-1].shape[-1])
    n = len(s_list)
    # mdistiller builds abfs in student order and reverses them; the deepest
    # level (last in student order) has no fusion.
    return [ABF(mid, t.shape[-1], fuse=(i < n - 1),
                         axis_name=axis_name)
            for i, t in enumerate(t_list)]

  def _forward(self, s_list, t_list, call):
    """Runs the review path; `call(i, x, y, shape, out_shape)` applies ABF i."""
    n = len(s_list)
    order = list(range(n))[::-1]                  # deepest first
    results = [None] * n
    i0 = order[0]
    out, res = call(i0, s_list[i0], None, None, t_list[i0].shape[1])
    results[i0] = out
    for i in order[1:]:
      out, res = call(i, s_list[i], res, s_list[i].shape[1],
                      t_list[i].shape[1])
      results[i] = out
    return results

  def init(self, rng, inputs):
    s_list, t_list = self._lists(inputs)
    abfs = self._abfs(s_list, t_list, None)
    params, state = {}, {}

    def call(i, x, y, shape, out_shape):
      mod = abfs[i]
      variables = mod.init(jax.random.fold_in(rng, i), x, y, shape,
                           out_shape, train=False)
      params[f"abf{i}"] = variables["params"]
      state[f"abf{i}"] = variables["batch_stats"]
      return mod.apply(variables, x, y, shape, out_shape, train=False)

    self._forward(s_list, t_list, call)
    return params, state

  def __call__(self, params, state, inputs):
    s_list, t_list = self._lists(inputs)
    abfs = self._abfs(s_list, t_list, inputs.axis_name)
    new_state = {}

    def call(i, x, y, shape, out_shape):
      key = f"abf{i}"
      variables = {"params": params[key], "batch_stats": state[key]}
      if inputs.train:
        out, upd = abfs[i].apply(variables, x, y, shape, out_shape,
                                 train=True, mutable=["batch_stats"])
        new_state[key] = upd["batch_stats"]
      else:
        out = abfs[i].apply(variables, x, y, shape, out_shape, train=False)
        new_state[key] = state[key]
      return out

    results = self._forward(s_list, t_list, call)
    return losses.hcl_loss(results, t_list, levels=self.levels), new_state
