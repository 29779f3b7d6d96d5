"""CIFAR ResNets of the KD benchmarks: resnet8 ... resnet110, resnet8x4, resnet32x4.

The `ResNet(depth, num_filters, 'basicblock')` of RepDistiller / mdistiller
(`models/resnet.py`, after He et al.'s CIFAR ResNet): a 3x3 stem conv + BN +
ReLU, then three stages of $n = (\\text{depth} - 2) / 6$ basic blocks
(3x3 conv-BN-ReLU-3x3 conv-BN, add shortcut, ReLU) with strides 1, 2, 2, a
projection shortcut (1x1 conv + BN) wherever the shape changes, 8x8 average
pooling and a linear classifier. Widths `[16, 16, 32, 64]` for resnetN,
`[32, 64, 128, 256]` for the x4 variants.

Features (NHWC; the reference's NCHW `[B, C, H, W]` is `[B, H, W, C]` here):

* `stages`: `[f0, f1, f2, f3]`, stem output (32x32) then each stage's output
  after its final ReLU (32x32, 16x16, 8x8) = the reference's `feats`.
* `preact_stages`: `[f0, f1_pre, f2_pre, f3_pre]`, the same before the last
  ReLU of each stage (block output before its ReLU); like the reference the
  first entry is the (post-ReLU) stem output.
* `pooled`: the `[B, C]` average-pooled embedding fed to the classifier.

Parameter names follow the torch modules with '.' -> '_' (`layer1.0.conv1` is
`layer1_0/conv1`), so checkpoints convert with `convert.standard_key_map`.

References:
  He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition", CVPR 2016.
  Tian, Krishnan, Isola. "Contrastive Representation Distillation", ICLR 2020
  (RepDistiller); Zhao et al. "Decoupled Knowledge Distillation", CVPR 2022
  (mdistiller).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models import layers as L
from kd_jax.models import convert as _convert

Dtype = Any

FUSION_BOUNDARY = True
"""Pass each block's input through `_layers.fusion_boundary` (read at trace
time): on CPU XLA then reads it once instead of recomputing the residual
chain of all earlier blocks inside each block's output fusion (10 % of the
resnet56->resnet20 step, docs/performance.md). `False` for A/B benchmarks."""


class BasicBlock(nn.Module):
  """3x3 conv-BN-ReLU-3x3 conv-BN + shortcut; returns (relu(out), out)."""
  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    d = self.dtype
    if FUSION_BOUNDARY:
      x = L.fusion_boundary(x)
    out = L.conv(self.planes, 3, stride=self.stride, padding=1, dtype=d,
                 name="conv1")(x)
    out = nn.relu(L.batch_norm(train, dtype=d, name="bn1")(out))
    out = L.conv(self.planes, 3, padding=1, dtype=d, name="conv2")(out)
    out = L.batch_norm(train, dtype=d, name="bn2")(out)
    residual = x
    if self.downsample:
      residual = L.conv(self.planes, 1, stride=self.stride, dtype=d,
                        name="downsample_0")(x)
      residual = L.batch_norm(train, dtype=d, name="downsample_1")(residual)
    preact = out + residual
    return nn.relu(preact), preact


class CifarResNet(nn.Module):
  """RepDistiller/mdistiller CIFAR ResNet (basic blocks), NHWC [B, 32, 32, 3].

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from kd_jax import models
    >>> model = models.create('resnet8', num_classes=100)
    >>> x = jnp.zeros((2, 32, 32, 3))
    >>> variables = model.init(jax.random.key(0), x, train=False)
    >>> logits, feats = model.apply(variables, x, train=False)
    >>> logits.shape, [f.shape[1:] for f in feats['stages']]
    ((2, 100), [(32, 32, 16), (32, 32, 16), (16, 16, 32), (8, 8, 64)])
  """
  depth: int
  num_filters: Sequence[int] = (16, 16, 32, 64)
  num_classes: int = 100
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    L.check_image_input(x, f"resnet (depth {self.depth})", hw=(32, 32))
    if (self.depth - 2) % 6:
      raise ValueError(f"`depth` must be 6n+2; got {self.depth}")
    n = (self.depth - 2) // 6
    d = self.dtype
    x = x.astype(d)
    x = L.conv(self.num_filters[0], 3, padding=1, dtype=d, name="conv1")(x)
    x = nn.relu(L.batch_norm(train, dtype=d, name="bn1")(x))
    stages, preacts = [x], [x]
    inplanes = self.num_filters[0]
    for s, (planes, stride) in enumerate(
        zip(self.num_filters[1:], (1, 2, 2)), start=1):
      for i in range(n):
        st = stride if i == 0 else 1
        x, pre = BasicBlock(
            planes, stride=st, downsample=(st != 1 or inplanes != planes),
            dtype=d, name=f"layer{s}_{i}")(x, train)
        inplanes = planes
      stages.append(x)
      preacts.append(pre)
    pooled = L.global_avg_pool(x)  # AvgPool2d(8) on the 8x8 map
    logits = L.linear(self.num_classes, fan_in=pooled.shape[-1], dtype=d,
                      name="fc")(pooled)
    return logits.astype(jnp.float32), {
        "stages": stages, "preact_stages": preacts, "pooled": pooled}


def torch_key_map(shapes):
  """Key map for RepDistiller/mdistiller `resnet.py` state_dicts."""
  return _convert.standard_key_map(shapes)


def _make(depth, num_filters):
  def fn(num_classes: int = 100, dtype=jnp.float32):
    return CifarResNet(depth=depth, num_filters=tuple(num_filters),
                       num_classes=num_classes, dtype=dtype)
  return fn


_SMALL = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)

resnet8 = _make(8, _SMALL)
resnet14 = _make(14, _SMALL)
resnet20 = _make(20, _SMALL)
resnet32 = _make(32, _SMALL)
resnet44 = _make(44, _SMALL)
resnet56 = _make(56, _SMALL)
resnet110 = _make(110, _SMALL)
resnet8x4 = _make(8, _X4)
resnet32x4 = _make(32, _X4)

MODELS = {
    "resnet8": resnet8, "resnet14": resnet14, "resnet20": resnet20,
    "resnet32": resnet32, "resnet44": resnet44, "resnet56": resnet56,
    "resnet110": resnet110, "resnet8x4": resnet8x4, "resnet32x4": resnet32x4,
}
