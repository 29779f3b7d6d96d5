"""Wide ResNets of the KD benchmarks: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

The pre-activation `WideResNet(depth, widen_factor)` of RepDistiller /
mdistiller (`models/wrn.py`, after Zagoruyko & Komodakis): a 3x3 stem conv
(no BN), three stages of $n = (\\text{depth} - 4) / 6$ blocks
(BN-ReLU-3x3 conv-BN-ReLU-3x3 conv + shortcut; 1x1 conv shortcut applied to
the pre-activated input when the width changes), widths
$[16, 16k, 32k, 64k]$, strides 1, 2, 2; then BN-ReLU, 8x8 average pooling and
a linear classifier (bias initialised to 0, weight with torch's default).
Dropout rate 0 as in the benchmarks.

Features (NHWC), exactly the reference's lists:

* `stages`: `[f0, f1, f2, f3]` = stem conv output and each stage's raw output
  (a pre-activation net has no ReLU at the end of a stage; the reference
  returns these un-activated tensors as its `feats`).
* `preact_stages`: `[f0, bn(f1), bn(f2), bn(f3)]`, each stage output passed
  through the BatchNorm that precedes the next ReLU (`block2.layer.0.bn1`,
  `block3.layer.0.bn1`, the final `bn1`): the reference's `preact_feats`.
  Here that BN is evaluated once (in the reference's `forward` a second call
  updates the running statistics again in train mode; the values are equal).
* `pooled`: the `[B, 64k]` embedding fed to the classifier.

Flax names follow torch with '.' -> '_' (`block1.layer.0.conv1` is
`block1_layer_0/conv1`).

References:
  Zagoruyko, Komodakis. "Wide Residual Networks", BMVC 2016.
  Tian, Krishnan, Isola. "Contrastive Representation Distillation", ICLR 2020.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models import layers as L
from kd_jax.models import convert as _convert

Dtype = Any


class WideBasicBlock(nn.Module):
  """Pre-activation block; returns (output, bn1(x)) (bn1 = pre-ReLU input)."""
  in_planes: int
  out_planes: int
  stride: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    d = self.dtype
    equal = self.in_planes == self.out_planes
    pre = L.batch_norm(train, dtype=d, name="bn1")(x)
    act = nn.relu(pre)
    out = L.conv(self.out_planes, 3, stride=self.stride, padding=1, dtype=d,
                 name="conv1")(act)
    out = nn.relu(L.batch_norm(train, dtype=d, name="bn2")(out))
    out = L.conv(self.out_planes, 3, padding=1, dtype=d, name="conv2")(out)
    if equal:
      shortcut = x
    else:  # the reference overwrites x with relu(bn1(x)) before the shortcut
      shortcut = L.conv(self.out_planes, 1, stride=self.stride, dtype=d,
                        name="convShortcut")(act)
    return shortcut + out, pre


class WideResNet(nn.Module):
  """RepDistiller/mdistiller WRN-depth-k, NHWC [B, 32, 32, 3].

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from kd_jax import models
    >>> model = models.create('wrn_16_1', num_classes=10)
    >>> x = jnp.zeros((2, 32, 32, 3))
    >>> variables = model.init(jax.random.key(0), x, train=False)
    >>> logits, feats = model.apply(variables, x, train=False)
    >>> logits.shape, feats['pooled'].shape
    ((2, 10), (2, 64))
  """
  depth: int
  widen_factor: int = 1
  num_classes: int = 100
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    name = f"wrn_{self.depth}_{self.widen_factor}"
    L.check_image_input(x, name, hw=(32, 32))
    if (self.depth - 4) % 6:
      raise ValueError(f"`depth` must be 6n+4; got {self.depth}")
    n = (self.depth - 4) // 6
    k = self.widen_factor
    widths = [16, 16 * k, 32 * k, 64 * k]
    d = self.dtype
    x = x.astype(d)
    x = L.conv(widths[0], 3, padding=1, dtype=d, name="conv1")(x)
    stages, preacts = [x], [x]
    for s, stride in enumerate((1, 2, 2), start=1):
      for i in range(n):
        in_planes = widths[s - 1] if i == 0 else widths[s]
        x, pre = WideBasicBlock(
            in_planes, widths[s], stride if i == 0 else 1, dtype=d,
            name=f"block{s}_layer_{i}")(x, train)
        if i == 0 and s > 1:
          preacts.append(pre)  # = reference block{s}.layer[0].bn1(f_{s-1})
      stages.append(x)
    pre = L.batch_norm(train, dtype=d, name="bn1")(x)
    preacts.append(pre)
    pooled = L.global_avg_pool(nn.relu(pre))
    logits = L.linear(self.num_classes, fan_in=pooled.shape[-1], dtype=d,
                      bias_init=nn.initializers.zeros, name="fc")(pooled)
    return logits.astype(jnp.float32), {
        "stages": stages, "preact_stages": preacts, "pooled": pooled}


def torch_key_map(shapes):
  """Key map for RepDistiller/mdistiller `wrn.py` state_dicts."""
  return _convert.standard_key_map(shapes)


def _make(depth, widen_factor):
  def fn(num_classes: int = 100, dtype=jnp.float32):
    return WideResNet(depth=depth, widen_factor=widen_factor,
                      num_classes=num_classes, dtype=dtype)
  return fn


wrn_16_1 = _make(16, 1)
wrn_16_2 = _make(16, 2)
wrn_40_1 = _make(40, 1)
wrn_40_2 = _make(40, 2)

MODELS = {"wrn_16_1": wrn_16_1, "wrn_16_2": wrn_16_2,
          "wrn_40_1": wrn_40_1, "wrn_40_2": wrn_40_2}
