"""CIFAR ShuffleNetV1 / V2 of the KD benchmarks (RepDistiller / mdistiller).

``shufflenetv1``
  RepDistiller ``models/ShuffleNetv1.py::ShuffleV1`` (= mdistiller
  ``mdistiller/models/cifar/ShuffleNetv1.py``): 1x1 conv stem 3 -> 24 (no
  downsampling), three stages of 4 / 8 / 4 bottlenecks with out planes
  240 / 480 / 960 and 3 groups, a 4x4 average pool and a Linear head.
  Bottleneck: grouped 1x1 (1 group when the input has 24 channels) -BN-ReLU,
  channel shuffle, depthwise 3x3 -BN-ReLU, grouped 1x1 -BN, then ReLU of
  ``concat(out, avgpool3x3/2(x))`` for the first (stride-2) block of a stage and
  of ``out + x`` otherwise. The shortcut pool counts padding (PyTorch
  ``AvgPool2d(3, 2, 1)``). 0.95M parameters with 100 classes.

``shufflenetv2``
  RepDistiller ``models/ShuffleNetv2.py::ShuffleV2`` (net_size 1): 1x1 conv stem
  3 -> 24, stages (116, 232, 464) with a DownBlock and 3 / 7 / 3 BasicBlocks,
  1x1 conv to 1024 -BN-ReLU, 4x4 average pool, Linear.
  1.36M parameters with 100 classes.

Both use PyTorch's default init (the references set none): conv and Linear
weights :math:`U(\\pm 1/\\sqrt{fan_{in}})`, Linear bias likewise, BN 1/0.

Features (NHWC, batch first), matching the references' ``is_feat`` lists:

* ``stages`` = [stem 32x32x24, stage1 16x16x{240,116}, stage2 8x8x{480,232},
  stage3 4x4x{960,464}] (``f0..f3``).
* ``preact_stages`` = the references' ``preact=True`` list: the stem (after its
  ReLU, as there), then each stage's last block *before its final ReLU*. For
  ShuffleNetV2 that tensor is ``concat(x1, bn3(...))`` *before* the channel
  shuffle, exactly as the reference returns it, so its channel order differs
  from ``stages`` (the shuffle is a fixed permutation).
* ``pooled``: the pooled vector fed to the head (960 / 1024).

Input: float NHWC ``[B, 32, 32, 3]``; other shapes raise a ValueError saying
what is expected. ``dtype`` is the compute dtype; parameters and BatchNorm
statistics are float32; BatchNorm as PyTorch's (momentum 0.1 == Flax 0.9,
eps 1e-5; see `kd_jax.models.layers.batch_norm`). Logits are float32.

Parameter names follow the torch modules with '.' -> '_' (``layer2.0.bn3`` is
``layer2_0/bn3``), so reference checkpoints convert with
`kd_jax.models.from_torch_state_dict`.

Example:

>>> import jax, jax.numpy as jnp
>>> from kd_jax.models.shufflenet import shufflenetv2
>>> model = shufflenetv2(num_classes=100)
>>> x = jnp.zeros((2, 32, 32, 3))
>>> variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
>>> logits, feats = jax.eval_shape(
...     lambda v: model.apply(v, x, train=False), variables)
>>> logits.shape, feats["pooled"].shape
((2, 100), (2, 1024))
>>> [f.shape[1:] for f in feats["stages"]]
[(32, 32, 24), (16, 16, 116), (8, 8, 232), (4, 4, 464)]

References:
  Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural
  Network for Mobile Devices", CVPR 2018; Ma et al., "ShuffleNet V2: Practical
  Guidelines for Efficient CNN Architecture Design", ECCV 2018; Tian et al.,
  "Contrastive Representation Distillation", ICLR 2020 (HobbitLong/
  RepDistiller).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models import layers as L
from kd_jax.models import convert as _convert

# The references set no init: PyTorch's default for Conv2d is the same
# U(+-1/sqrt(fan_in)) as for Linear (fan_in = in/groups * kh * kw).
_conv = functools.partial(L.conv, kernel_init=L.torch_linear_kernel_init)


def channel_shuffle(x, groups: int):
  """ShuffleNet channel shuffle on NHWC: channel ``i*(C/g)+j`` -> ``j*g+i``.

  The NCHW reference does ``view(N, g, C/g, H, W).permute(0, 2, 1, 3, 4)``.
  """
  if groups == 1:
    return x
  *lead, c = x.shape
  x = x.reshape(*lead, groups, c // groups)
  return jnp.swapaxes(x, -1, -2).reshape(*lead, c)


def avg_pool_3x3_s2_p1(x):
  """``nn.AvgPool2d(3, stride=2, padding=1)`` (count_include_pad: always /9)."""
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return nn.avg_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class ShuffleV1Bottleneck(nn.Module):
  """ShuffleNetV1 unit; returns ``(out, preact)`` (see module doc)."""
  out_planes: int
  stride: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    in_planes = x.shape[-1]
    mid = int(self.out_planes / 4)
    g = 1 if in_planes == 24 else self.groups
    d = self.dtype
    h = _conv(mid, 1, groups=g, dtype=d, name="conv1")(x)
    h = nn.relu(L.batch_norm(train, dtype=d, name="bn1")(h))
    h = channel_shuffle(h, g)
    h = _conv(mid, 3, stride=self.stride, padding=1, groups=mid, dtype=d,
              name="conv2")(h)
    h = nn.relu(L.batch_norm(train, dtype=d, name="bn2")(h))
    h = _conv(self.out_planes, 1, groups=self.groups, dtype=d,
              name="conv3")(h)
    h = L.batch_norm(train, dtype=d, name="bn3")(h)
    if self.stride == 2:
      preact = jnp.concatenate([h, avg_pool_3x3_s2_p1(x).astype(h.dtype)], -1)
    else:
      preact = h + x
    return nn.relu(preact), preact


class ShuffleNetV1(nn.Module):
  """RepDistiller ``ShuffleNet(cfg)``; ``ShuffleV1`` by default."""
  out_planes: Sequence[int] = (240, 480, 960)
  num_blocks: Sequence[int] = (4, 8, 4)
  groups: int = 3
  num_classes: int = 100
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    L.check_image_input(x, "shufflenetv1", hw=(32, 32))
    d = self.dtype
    h = _conv(24, 1, dtype=d, name="conv1")(x.astype(d))
    h = nn.relu(L.batch_norm(train, dtype=d, name="bn1")(h))
    stages, preacts = [h], [h]
    for li, (planes, n) in enumerate(zip(self.out_planes, self.num_blocks), 1):
      for i in range(n):
        # The first block concatenates its input: it adds planes - in planes.
        out = planes - h.shape[-1] if i == 0 else planes
        h, pre = ShuffleV1Bottleneck(out, 2 if i == 0 else 1, self.groups,
                                     dtype=d, name=f"layer{li}_{i}")(h, train)
      stages.append(h)
      preacts.append(pre)
    pooled = L.global_avg_pool(h)  # avg_pool2d(4) on the 4x4 map
    logits = L.linear(self.num_classes, fan_in=pooled.shape[-1], dtype=d,
                      name="linear")(pooled)
    return logits.astype(jnp.float32), {
        "stages": stages, "preact_stages": preacts, "pooled": pooled}


class ShuffleV2BasicBlock(nn.Module):
  """ShuffleNetV2 basic unit (split 0.5); returns ``(out, preact)``."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = int(x.shape[-1] * 0.5)
    x1, x2 = x[..., :c], x[..., c:]
    d = self.dtype
    h = _conv(c, 1, dtype=d, name="conv1")(x2)
    h = nn.relu(L.batch_norm(train, dtype=d, name="bn1")(h))
    h = _conv(c, 3, padding=1, groups=c, dtype=d, name="conv2")(h)
    h = L.batch_norm(train, dtype=d, name="bn2")(h)
    h = _conv(c, 1, dtype=d, name="conv3")(h)
    pre = L.batch_norm(train, dtype=d, name="bn3")(h)
    out = jnp.concatenate([x1, nn.relu(pre)], axis=-1)
    preact = jnp.concatenate([x1, pre], axis=-1)  # before the shuffle
    return channel_shuffle(out, 2), preact


class ShuffleV2DownBlock(nn.Module):
  """ShuffleNetV2 spatial down-sampling unit (stride 2, two branches)."""
  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    inp = x.shape[-1]
    mid = self.out_channels // 2
    d = self.dtype
    bn = lambda name: L.batch_norm(train, dtype=d, name=name)  # noqa: E731
    # left: dw 3x3/2 -BN, 1x1 -BN-ReLU
    a = bn("bn1")(_conv(inp, 3, stride=2, padding=1, groups=inp, dtype=d,
                        name="conv1")(x))
    a = nn.relu(bn("bn2")(_conv(mid, 1, dtype=d, name="conv2")(a)))
    # right: 1x1 -BN-ReLU, dw 3x3/2 -BN, 1x1 -BN-ReLU
    b = nn.relu(bn("bn3")(_conv(mid, 1, dtype=d, name="conv3")(x)))
    b = bn("bn4")(_conv(mid, 3, stride=2, padding=1, groups=mid, dtype=d,
                        name="conv4")(b))
    b = nn.relu(bn("bn5")(_conv(mid, 1, dtype=d, name="conv5")(b)))
    return channel_shuffle(jnp.concatenate([a, b], axis=-1), 2)


class ShuffleNetV2(nn.Module):
  """RepDistiller ``ShuffleNetV2(net_size)``; ``ShuffleV2`` (size 1) by default."""
  out_channels: Sequence[int] = (116, 232, 464, 1024)
  num_blocks: Sequence[int] = (3, 7, 3)
  num_classes: int = 100
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    L.check_image_input(x, "shufflenetv2", hw=(32, 32))
    d = self.dtype
    h = _conv(24, 1, dtype=d, name="conv1")(x.astype(d))
    h = nn.relu(L.batch_norm(train, dtype=d, name="bn1")(h))
    stages, preacts = [h], [h]
    for li, (ch, n) in enumerate(zip(self.out_channels[:3], self.num_blocks),
                                 1):
      h = ShuffleV2DownBlock(ch, dtype=d, name=f"layer{li}_0")(h, train)
      for i in range(1, n + 1):
        h, pre = ShuffleV2BasicBlock(dtype=d, name=f"layer{li}_{i}")(h, train)
      stages.append(h)
      preacts.append(pre)
    h = _conv(self.out_channels[3], 1, dtype=d, name="conv2")(h)
    h = nn.relu(L.batch_norm(train, dtype=d, name="bn2")(h))
    pooled = L.global_avg_pool(h)  # avg_pool2d(4) on the 4x4 map
    logits = L.linear(self.num_classes, fan_in=pooled.shape[-1], dtype=d,
                      name="linear")(pooled)
    return logits.astype(jnp.float32), {
        "stages": stages, "preact_stages": preacts, "pooled": pooled}


def shufflenetv1(num_classes: int = 100, dtype=jnp.float32) -> ShuffleNetV1:
  """RepDistiller ``ShuffleV1`` (groups 3, planes 240/480/960)."""
  return ShuffleNetV1(num_classes=num_classes, dtype=dtype)


def shufflenetv2(num_classes: int = 100, dtype=jnp.float32) -> ShuffleNetV2:
  """RepDistiller ``ShuffleV2`` (net_size 1: 116/232/464, 1024)."""
  return ShuffleNetV2(num_classes=num_classes, dtype=dtype)


def torch_key_map(shapes):
  """Key map for RepDistiller / mdistiller ``ShuffleV1`` / ``ShuffleV2``.

  ``layer2.0.bn3.running_mean`` <-> ``layer2_0/bn3`` ``mean`` etc.
  """
  return _convert.standard_key_map(shapes)


CIFAR_MODELS = {"shufflenetv1": shufflenetv1, "shufflenetv2": shufflenetv2}
