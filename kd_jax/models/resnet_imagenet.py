"""ImageNet ResNets (torchvision) and their CIFAR variants.

* `resnet18`, `resnet34`, `resnet50`: torchvision's `resnet.py` (v1.5:
  the stride of a bottleneck is on its 3x3 conv): 7x7/2 stem conv (padding 3)
  + BN + ReLU + 3x3/2 max-pool (padding 1), four stages (64, 128, 256, 512
  planes; expansion 1 for basic, 4 for bottleneck blocks; strides 1, 2, 2, 2;
  projection shortcut `downsample` = 1x1 conv + BN), global average pooling
  and a linear classifier. Any input with H, W >= 32 works; 224x224 is the
  standard. ImageNet teachers of the KD benchmarks are torchvision's weights.
* `resnet18_cifar`, `resnet50_cifar`: RepDistiller/mdistiller `resnetv2.py`
  `ResNet18` / `ResNet50` (the CIFAR teachers/students): 3x3/1 stem conv +
  BN + ReLU (no max-pool), the same four stages (shortcut named `shortcut`),
  global average pooling, classifier named `linear`; input [B, 32, 32, 3].

Init: Kaiming-normal fan-out convs, BN weight 1 / bias 0, torch-default
linear (no zero-init of the last BN of a residual branch, the default of both).

Features (NHWC):

* ImageNet (as in mdistiller's `imagenet/resnet.py`):
  `stages` = `[relu(stem), f1, f2, f3, f4]` with the stem taken *before* the
  max-pool (112x112 for 224 input), `preact_stages` = the same before the
  ReLU (the stem BN output and each stage's last block before its ReLU);
* CIFAR variants (RepDistiller `resnetv2.py`): `stages` = `[f0, ..., f4]`
  (32, 32, 16, 8, 4 pixels), `preact_stages` = `[f0, f1_pre, ..., f4_pre]`
  (first entry = post-ReLU stem, as in the reference);
* `pooled`: the `[B, 512 * expansion]` embedding.

Flax names follow torch with '.' -> '_' (`layer1.0.downsample.0` is
`layer1_0/downsample_0`).

References:
  He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition", CVPR 2016.
  torchvision `models/resnet.py`; Tian et al., ICLR 2020 (RepDistiller).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models import layers as L
from kd_jax.models import convert as _convert

Dtype = Any


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN, shortcut, ReLU; returns (relu(out), out)."""
  planes: int
  stride: int = 1
  project: bool = False
  shortcut_name: str = "downsample"
  dtype: Dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    d = self.dtype
    out = L.conv(self.planes, 3, stride=self.stride, padding=1, dtype=d,
                 name="conv1")(x)
    out = nn.relu(L.batch_norm(train, dtype=d, name="bn1")(out))
    out = L.conv(self.planes, 3, padding=1, dtype=d, name="conv2")(out)
    out = L.batch_norm(train, dtype=d, name="bn2")(out)
    residual = _shortcut(self, x, self.planes, train)
    preact = out + residual
    return nn.relu(preact), preact


class Bottleneck(nn.Module):
  """1x1-3x3(stride)-1x1(x4) conv-BN, shortcut, ReLU; (relu(out), out)."""
  planes: int
  stride: int = 1
  project: bool = False
  shortcut_name: str = "downsample"
  dtype: Dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    d = self.dtype
    out = L.conv(self.planes, 1, dtype=d, name="conv1")(x)
    out = nn.relu(L.batch_norm(train, dtype=d, name="bn1")(out))
    out = L.conv(self.planes, 3, stride=self.stride, padding=1, dtype=d,
                 name="conv2")(out)
    out = nn.relu(L.batch_norm(train, dtype=d, name="bn2")(out))
    out = L.conv(self.planes * 4, 1, dtype=d, name="conv3")(out)
    out = L.batch_norm(train, dtype=d, name="bn3")(out)
    residual = _shortcut(self, x, self.planes * 4, train)
    preact = out + residual
    return nn.relu(preact), preact


def _shortcut(block, x, features, train):
  if not block.project:
    return x
  r = L.conv(features, 1, stride=block.stride, dtype=block.dtype,
             name=f"{block.shortcut_name}_0")(x)
  return L.batch_norm(train, dtype=block.dtype,
                      name=f"{block.shortcut_name}_1")(r)


class ResNet(nn.Module):
  """torchvision ResNet (`cifar_stem=False`) or RepDistiller `resnetv2`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from kd_jax import models
    >>> model = models.create('resnet18', num_classes=1000)
    >>> x = jnp.zeros((1, 224, 224, 3))
    >>> variables = jax.eval_shape(
    ...     lambda: model.init(jax.random.key(0), x, train=False))
    >>> out = jax.eval_shape(
    ...     lambda v: model.apply(v, x, train=False), variables)
    >>> out[0].shape, [f.shape[1] for f in out[1]['stages']]
    ((1, 1000), [112, 56, 28, 14, 7])
  """
  block: str  # "basic" | "bottleneck"
  layers: Sequence[int]
  num_classes: int = 1000
  cifar_stem: bool = False
  dtype: Dtype = jnp.float32
  arch: str = "resnet"

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.cifar_stem:
      L.check_image_input(x, self.arch, hw=(32, 32))
    else:
      L.check_image_input(x, self.arch, min_hw=32)
    block_cls = BasicBlock if self.block == "basic" else Bottleneck
    shortcut_name = "shortcut" if self.cifar_stem else "downsample"
    d = self.dtype
    x = x.astype(d)
    if self.cifar_stem:
      x = L.conv(64, 3, padding=1, dtype=d, name="conv1")(x)
      x = nn.relu(L.batch_norm(train, dtype=d, name="bn1")(x))
      stages, preacts = [x], [x]
    else:
      x = L.conv(64, 7, stride=2, padding=3, dtype=d, name="conv1")(x)
      pre = L.batch_norm(train, dtype=d, name="bn1")(x)
      x = nn.relu(pre)
      stages, preacts = [x], [pre]
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    inplanes = 64
    for s, (planes, n) in enumerate(zip((64, 128, 256, 512), self.layers),
                                    start=1):
      stride = 1 if s == 1 else 2
      for i in range(n):
        st = stride if i == 0 else 1
        x, pre = block_cls(
            planes, stride=st,
            project=(st != 1 or inplanes != planes * block_cls.expansion),
            shortcut_name=shortcut_name, dtype=d, name=f"layer{s}_{i}")(
                x, train)
        inplanes = planes * block_cls.expansion
      stages.append(x)
      preacts.append(pre)
    pooled = L.global_avg_pool(x)
    logits = L.linear(self.num_classes, fan_in=pooled.shape[-1], dtype=d,
                      name="linear" if self.cifar_stem else "fc")(pooled)
    return logits.astype(jnp.float32), {
        "stages": stages, "preact_stages": preacts, "pooled": pooled}


def torch_key_map(shapes):
  """Key map for torchvision `resnet.py` / RepDistiller `resnetv2.py`."""
  return _convert.standard_key_map(shapes)


def _make(block, layers, cifar_stem, arch):
  def fn(num_classes: int = 100 if cifar_stem else 1000, dtype=jnp.float32):
    return ResNet(block=block, layers=tuple(layers), num_classes=num_classes,
                  cifar_stem=cifar_stem, dtype=dtype, arch=arch)
  return fn


resnet18 = _make("basic", (2, 2, 2, 2), False, "resnet18")
resnet34 = _make("basic", (3, 4, 6, 3), False, "resnet34")
resnet50 = _make("bottleneck", (3, 4, 6, 3), False, "resnet50")
resnet18_cifar = _make("basic", (2, 2, 2, 2), True, "resnet18_cifar")
resnet50_cifar = _make("bottleneck", (3, 4, 6, 3), True, "resnet50_cifar")

IMAGENET_MODELS = {"resnet18": resnet18, "resnet34": resnet34,
                   "resnet50": resnet50}
CIFAR_MODELS = {"resnet18_cifar": resnet18_cifar,
                "resnet50_cifar": resnet50_cifar}
