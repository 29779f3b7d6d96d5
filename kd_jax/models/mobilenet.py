"""MobileNets of the KD benchmarks: CIFAR MobileNetV2 (half width), ImageNet V1.

``mobilenetv2``
  The CIFAR-100 student of CRD / DKD ("MobileNetV2" in their tables):
  RepDistiller ``models/mobilenetv2.py::mobile_half`` (= mdistiller
  ``mdistiller/models/cifar/mobilenetv2.py``), i.e. ``MobileNetV2(T=6,
  width_mult=0.5)``, itself from "Knowledge Distillation via Route Constrained
  Optimization" (Jin et al., ICCV 2019). Stem 3x3 conv *stride 2* (32 -> 16),
  inverted residual blocks (t, c, n, s) = (1,16,1,1) (6,24,2,1) (6,32,3,2)
  (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1) with channels halved, a 1x1
  conv to 1280 channels (not halved), 2x2 average pool and a Linear head.
  0.81M parameters with 100 classes. Init: convs
  :math:`\\mathcal N(0, 2/(k^2 c_{out}))`, BN 1/0, Linear
  :math:`\\mathcal N(0, 0.01^2)` with zero bias.

``mobilenetv1``
  The ImageNet student of DKD / ReviewKD: mdistiller
  ``mdistiller/models/imagenet/mobilenetv1.py`` (Howard et al., 2017, width
  1.0): a 3x3 stride-2 conv-BN-ReLU then 13 depthwise-separable blocks, 7x7
  average pool, Linear. 4.23M parameters with 1000 classes. PyTorch default
  init (the reference sets none).

Features (NHWC; the reference's NCHW ``[B, C, H, W]`` is ``[B, H, W, C]`` here):

* ``mobilenetv2``: ``stages`` = [stem 16x16x16, after blocks[1] 16x16x12,
  after blocks[2] 8x8x16, after blocks[4] 4x4x48, after blocks[6] 2x2x160]
  (RepDistiller's ``f0..f4``). The block outputs are linear (no final ReLU), so
  ``preact_stages[1:] == stages[1:]``; ``preact_stages[0]`` is the stem
  *after* its ReLU, as in the reference (whose ``preact`` flag changes nothing).
  ``pooled`` is the 1280-d average-pooled vector.
* ``mobilenetv1``: ``stages`` = [stem (first conv-BN-ReLU, 112x112x32), then
  the outputs of model[3] 56x56x128, model[5] 28x28x256, model[11] 14x14x512,
  model[13] 7x7x1024]; mdistiller's ``feats`` / ``preact_feats`` are
  ``stages[1:]`` / ``preact_stages[1:]`` (it lists no stem; the stem is added
  here so that, as for every model of the zoo, entry 0 is the stem).
  ``preact_stages`` are the BN outputs before the final ReLU of each entry.
  ``pooled`` is the 1024-d pooled vector.

Both take float inputs NHWC ``[B, 32, 32, 3]`` / ``[B, 224, 224, 3]``; any other
shape raises a ValueError saying what is expected. ``dtype`` is the compute
dtype (e.g. ``jnp.bfloat16``); parameters and BatchNorm statistics are float32.
BatchNorm as PyTorch's (momentum 0.1 == Flax 0.9, eps 1e-5; see
`kd_jax.models.layers.batch_norm`). Logits are returned in float32.

Example:

>>> import jax, jax.numpy as jnp
>>> from kd_jax.models.mobilenet import mobilenetv2
>>> model = mobilenetv2(num_classes=100)
>>> x = jnp.zeros((2, 32, 32, 3))
>>> variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
>>> logits, feats = jax.eval_shape(
...     lambda v: model.apply(v, x, train=False), variables)
>>> logits.shape, feats["pooled"].shape
((2, 100), (2, 1280))
>>> [f.shape[1:] for f in feats["stages"]]
[(16, 16, 16), (16, 16, 12), (8, 8, 16), (4, 4, 48), (2, 2, 160)]

References:
  Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
  CVPR 2018; Howard et al., "MobileNets", arXiv:1704.04861, 2017; Tian et al.,
  "Contrastive Representation Distillation", ICLR 2020 (HobbitLong/
  RepDistiller); Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022
  (megvii-research/mdistiller).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models import layers as L
from kd_jax.models import convert as _convert


class InvertedResidual(nn.Module):
  """pw 1x1 (expand) -BN-ReLU, dw 3x3 -BN-ReLU, pw-linear 1x1 -BN, +identity.

  Submodule names mirror the reference ``conv`` Sequential (``conv_0`` <->
  ``conv.0`` ...). The residual is used when stride 1 and in == out channels.
  """
  out_channels: int
  stride: int
  expand_ratio: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    inp = x.shape[-1]
    hid = inp * self.expand_ratio
    d = self.dtype
    h = L.conv(hid, 1, dtype=d, name="conv_0")(x)
    h = nn.relu(L.batch_norm(train, dtype=d, name="conv_1")(h))
    h = L.conv(hid, 3, stride=self.stride, padding=1, groups=hid, dtype=d,
               name="conv_3")(h)
    h = nn.relu(L.batch_norm(train, dtype=d, name="conv_4")(h))
    h = L.conv(self.out_channels, 1, dtype=d, name="conv_6")(h)
    h = L.batch_norm(train, dtype=d, name="conv_7")(h)
    if self.stride == 1 and inp == self.out_channels:
      return x + h
    return h


def mobilenetv2_classifier(num_classes: int, fan_in: int, dtype=jnp.float32):
  """The reference's ``classifier[0]``: Linear with N(0, 0.01^2) weight, 0 bias."""
  return L.linear(num_classes, fan_in=fan_in, dtype=dtype,
                  kernel_init=nn.initializers.normal(0.01),
                  bias_init=nn.initializers.zeros, name="classifier_0")


class MobileNetV2(nn.Module):
  """RepDistiller / mdistiller CIFAR ``MobileNetV2(T, width_mult)``.

  See the module docstring. Convs use Kaiming-normal fan-out init (the
  reference's ``normal_(0, sqrt(2 / (k*k*out_channels)))``, depthwise
  included), BN 1/0, the classifier N(0, 0.01^2) with zero bias.
  """
  expand_ratio: int = 6
  width_mult: float = 0.5
  num_classes: int = 100
  dtype: Any = jnp.float32

  # (t, c, n, s); t None = the reference's T (`expand_ratio`).
  _SETTING = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2),
              (None, 64, 4, 2), (None, 96, 3, 1), (None, 160, 3, 2),
              (None, 320, 1, 1))
  _TAPS = (1, 2, 4, 6)  # features after blocks[1], [2], [4], [6]

  @nn.compact
  def __call__(self, x, train: bool = False):
    L.check_image_input(x, "mobilenetv2", hw=(32, 32))
    d = self.dtype
    h = x.astype(d)
    h = L.conv(int(32 * self.width_mult), 3, stride=2, padding=1, dtype=d,
               name="conv1_0")(h)
    h = nn.relu(L.batch_norm(train, dtype=d, name="conv1_1")(h))
    stages = [h]
    for i, (t, c, n, s) in enumerate(self._SETTING):
      t = self.expand_ratio if t is None else t
      out_ch = int(c * self.width_mult)
      for j in range(n):
        h = InvertedResidual(out_ch, s if j == 0 else 1, t, dtype=d,
                             name=f"blocks_{i}_{j}")(h, train)
      if i in self._TAPS:
        stages.append(h)
    last = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
    h = L.conv(last, 1, dtype=d, name="conv2_0")(h)
    h = nn.relu(L.batch_norm(train, dtype=d, name="conv2_1")(h))
    pooled = L.global_avg_pool(h)  # AvgPool2d(2, ceil_mode=True) on 2x2
    logits = mobilenetv2_classifier(self.num_classes, last, d)(pooled)
    return logits.astype(jnp.float32), {
        "stages": stages, "preact_stages": list(stages), "pooled": pooled}


class MobileNetV1(nn.Module):
  """mdistiller ImageNet ``MobileNetV1`` (PyTorch default init); see module doc."""
  num_classes: int = 1000
  dtype: Any = jnp.float32

  # (out_channels, stride) of model[1..13] (the conv_dw blocks).
  _DW = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1),
         (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
  _TAPS = (3, 5, 11, 13)

  @nn.compact
  def __call__(self, x, train: bool = False):
    L.check_image_input(x, "mobilenetv1", hw=(224, 224))
    d = self.dtype
    init = L.torch_linear_kernel_init  # = torch's default Conv2d init too
    h = x.astype(d)
    h = L.conv(32, 3, stride=2, padding=1, dtype=d, kernel_init=init,
               name="model_0_0")(h)
    pre = L.batch_norm(train, dtype=d, name="model_0_1")(h)
    h = nn.relu(pre)
    stages, preacts = [h], [pre]
    for k, (out_ch, stride) in enumerate(self._DW, start=1):
      inp = h.shape[-1]
      h = L.conv(inp, 3, stride=stride, padding=1, groups=inp, dtype=d,
                 kernel_init=init, name=f"model_{k}_0")(h)
      h = nn.relu(L.batch_norm(train, dtype=d, name=f"model_{k}_1")(h))
      h = L.conv(out_ch, 1, dtype=d, kernel_init=init, name=f"model_{k}_3")(h)
      pre = L.batch_norm(train, dtype=d, name=f"model_{k}_4")(h)
      h = nn.relu(pre)
      if k in self._TAPS:
        stages.append(h)
        preacts.append(pre)
    pooled = L.global_avg_pool(h)  # AvgPool2d(7) on the 7x7 map
    logits = L.linear(self.num_classes, fan_in=pooled.shape[-1], dtype=d,
                      name="fc")(pooled)
    return logits.astype(jnp.float32), {
        "stages": stages, "preact_stages": preacts, "pooled": pooled}


def mobilenetv2(num_classes: int = 100, dtype=jnp.float32) -> MobileNetV2:
  """CIFAR MobileNetV2, T=6, width 0.5 (RepDistiller ``mobile_half``)."""
  return MobileNetV2(expand_ratio=6, width_mult=0.5, num_classes=num_classes,
                     dtype=dtype)


def mobilenetv1(num_classes: int = 1000, dtype=jnp.float32) -> MobileNetV1:
  """ImageNet MobileNetV1 (mdistiller ``MobileNetV1``)."""
  return MobileNetV1(num_classes=num_classes, dtype=dtype)


def torch_key_map(shapes):
  """Key map for the reference state_dicts (see `kd_jax.models.convert`).

  Flax modules are named like the torch modules with '.' -> '_':
  ``blocks.1.0.conv.3.weight`` <-> ``blocks_1_0/conv_3/kernel``,
  ``classifier.0.weight`` <-> ``classifier_0/kernel`` (mobilenetv2);
  ``model.3.4.running_var`` <-> ``model_3_4`` ``var``, ``fc.weight`` <-> ``fc``
  (mobilenetv1).
  """
  return _convert.standard_key_map(shapes)


CIFAR_MODELS = {"mobilenetv2": mobilenetv2}
IMAGENET_MODELS = {"mobilenetv1": mobilenetv1}
