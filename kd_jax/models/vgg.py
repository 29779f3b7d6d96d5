"""CIFAR VGGs with BatchNorm of the KD benchmarks: vgg8, vgg11, vgg13, vgg16, vgg19.

The `VGG(cfg, batch_norm=True)` of RepDistiller / mdistiller (`models/vgg.py`;
the benchmark names `vggN` are their `vggN_bn`): five blocks of
3x3 conv (with bias)-BN-ReLU layers, widths
`S`: [64], [128], [256], [512], [512] (vgg8), `A` (vgg11), `B` (vgg13),
`D` (vgg16), `E` (vgg19); 2x2 max-pooling after blocks 0, 1, 2 (the pooling
after block 3 is only used for 64x64 inputs, not CIFAR), global average
pooling and one linear classifier 512 -> K (weight N(0, 0.01), bias 0).
The last ReLU of each block sits outside the block, so `preact` features are
the BN outputs.

Features (NHWC), the reference's lists:

* `stages`: `[f0, ..., f4]` = ReLU outputs of blocks 0..4
  (32x32x64, 16x16x128, 8x8x256, 4x4x512, 4x4x512);
* `preact_stages`: `[f0, f1_pre, ..., f4_pre]` (block BN outputs before
  their ReLU; the first entry is the post-ReLU `f0`, as in the reference);
* `pooled`: the `[B, 512]` embedding.

Flax names follow torch with '.' -> '_': conv `j` of block `b` is
`block{b}_{3j}`, its BN `block{b}_{3j+1}` (the torch `nn.Sequential` indices).

References:
  Simonyan, Zisserman. "Very Deep Convolutional Networks for Large-Scale Image
  Recognition", ICLR 2015. Tian et al., ICLR 2020 (RepDistiller).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models import layers as L
from kd_jax.models import convert as _convert

Dtype = Any

CFGS = {
    "S": ((64,), (128,), (256,), (512,), (512,)),
    "A": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "B": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "D": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
          (512, 512, 512)),
    "E": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512),
          (512, 512, 512, 512)),
}

_VGG_LINEAR_INIT = nn.initializers.normal(stddev=0.01)


class VGG(nn.Module):
  """RepDistiller/mdistiller CIFAR VGG with BatchNorm, NHWC [B, 32, 32, 3].

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from kd_jax import models
    >>> model = models.create('vgg8', num_classes=100)
    >>> x = jnp.zeros((2, 32, 32, 3))
    >>> variables = jax.eval_shape(  # shapes only; model.init for arrays
    ...     lambda: model.init(jax.random.key(0), x, train=False))
    >>> logits, feats = jax.eval_shape(
    ...     lambda v: model.apply(v, x, train=False), variables)
    >>> logits.shape, [f.shape[1] for f in feats['stages']]
    ((2, 100), [32, 16, 8, 4, 4])
  """
  cfg: Sequence[Sequence[int]]
  num_classes: int = 100
  dtype: Dtype = jnp.float32
  arch: str = "vgg"

  @nn.compact
  def __call__(self, x, train: bool = False):
    L.check_image_input(x, self.arch, hw=(32, 32))
    d = self.dtype
    x = x.astype(d)
    stages, preacts = [], []
    for b, widths in enumerate(self.cfg):
      if b in (1, 2, 3):  # pool0, pool1, pool2 (pool3 only for 64x64 input)
        x = L.max_pool_nonoverlapping(x, 2)  # = nn.max_pool((2, 2), (2, 2))
      for j, width in enumerate(widths):
        if j > 0:
          x = nn.relu(x)
        x = L.conv(width, 3, padding=1, use_bias=True, dtype=d,
                   name=f"block{b}_{3 * j}")(x)
        x = L.batch_norm(train, dtype=d, name=f"block{b}_{3 * j + 1}")(x)
      pre = x
      x = nn.relu(x)
      stages.append(x)
      preacts.append(x if b == 0 else pre)
    pooled = L.global_avg_pool(x)
    logits = L.linear(self.num_classes, fan_in=pooled.shape[-1], dtype=d,
                      kernel_init=_VGG_LINEAR_INIT,
                      bias_init=nn.initializers.zeros,
                      name="classifier")(pooled)
    return logits.astype(jnp.float32), {
        "stages": stages, "preact_stages": preacts, "pooled": pooled}


def torch_key_map(shapes):
  """Key map for RepDistiller/mdistiller `vgg.py` (`vggN_bn`) state_dicts."""
  return _convert.standard_key_map(shapes)


def _make(cfg_name, arch):
  def fn(num_classes: int = 100, dtype=jnp.float32):
    return VGG(cfg=CFGS[cfg_name], num_classes=num_classes, dtype=dtype,
               arch=arch)
  return fn


vgg8 = _make("S", "vgg8")
vgg11 = _make("A", "vgg11")
vgg13 = _make("B", "vgg13")
vgg16 = _make("D", "vgg16")
vgg19 = _make("E", "vgg19")

MODELS = {"vgg8": vgg8, "vgg11": vgg11, "vgg13": vgg13, "vgg16": vgg16,
          "vgg19": vgg19}
