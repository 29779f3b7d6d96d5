r"""Vision Transformers for cross-architecture distillation (OFA-KD).

The definition is timm 0.6.5's ``VisionTransformer`` (the version OFA-KD,
Hao840/OFAKD, is built on) with a class token, learned absolute position
embeddings, pre-norm blocks ``x + Attn(LN(x))``, ``x + MLP(LN(x))`` (LayerNorm
eps 1e-6, ``qkv_bias=True``, exact GELU, MLP ratio 4), a final LayerNorm, and
the head on the class token (``global_pool='token'``).

* ``vit_tiny_patch16_224``: timm ``vit_tiny_patch16_224`` (= DeiT-Tiny's
  architecture ``deit_tiny_patch16_224``, OFA-KD's ImageNet ViT): 224x224
  input, patch 16 (196 patches + 1 class token), dim 192, depth 12, 3 heads.
  5.72M parameters with 1000 classes.
* ``vit_tiny_patch4_32``: the same network for 32x32 inputs with patch 4
  (64 patches + 1 class token), i.e. timm ``VisionTransformer(img_size=32,
  patch_size=4, embed_dim=192, depth=12, num_heads=3)``. 5.38M parameters with
  100 classes. (OFA-KD itself resizes CIFAR images to 224; this is the native
  32x32 variant.)

Init (timm's default ``weight_init=''``): Linear weights
:math:`\mathcal N(0, 0.02^2)` (timm's ``trunc_normal_(std=.02)`` truncates at
:math:`\pm 2` absolute, i.e. at 100 std, so it is a plain normal), Linear
biases 0, position embedding :math:`\mathcal N(0, 0.02^2)`, class token
:math:`\mathcal N(0, 10^{-12})`, LayerNorm 1/0, and the patch-embedding conv
keeps PyTorch's default (:math:`U(\pm 1/\sqrt{fan_{in}})` for weight and bias).

Features, as OFA-KD's ``forward_features(requires_feat=True)``:

* ``stages``: the token output of **every block**, ``depth`` arrays of shape
  ``[B, N + 1, D]`` (class token at index 0, before the final LayerNorm).
  OFA-KD's ``stage_info`` for DeiT-T / ViT taps blocks 1, 3, 9, 11 for its stages
  1-4 (`OFA_STAGE_BLOCKS`).
* ``preact_stages``: the same list (a ViT has no ReLU at block ends).
* ``pooled``: the class token after the final LayerNorm, ``[B, D]`` (the
  ``pre_logits`` vector OFA-KD appends to its feature list).
* ``embed``: the tokens entering block 0 (patch embedding + class token +
  position embedding), ``[B, N + 1, D]``.

Tensor parallelism: with ``logical_axes=True`` the Linear layers of every
block carry logical axis names (``nn.with_logical_partitioning``; ``init`` then
returns ``nn.LogicallyPartitioned`` boxes, unbox them with ``nn.meta.unbox``):
``fc1`` ``('embed', 'mlp')`` and ``fc2`` ``('mlp', 'embed')`` (Megatron column /
row split of the MLP hidden), ``proj`` ``('heads', 'embed')`` (row split by
heads; its input axis is ordered (head, head_dim)) and the fused ``qkv``
``('embed', 'qkv')``. The computation and the parameter paths are the same
either way; `kd_jax.train.sharding.logical_axis_names` reads the names and
the engine's rules map them to mesh axes.

There is no BatchNorm, so ``train`` only matters with ``drop_path_rate > 0``
(stochastic depth, needs a ``'dropout'`` rng). ``dtype`` is the compute dtype;
parameters are float32; LayerNorm statistics and the attention softmax are
computed in float32.

Example:

>>> import jax, jax.numpy as jnp
>>> from kd_jax.models.vit import vit_tiny_patch4_32
>>> model = vit_tiny_patch4_32(num_classes=100)
>>> x = jnp.zeros((2, 32, 32, 3))
>>> variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
>>> logits, feats = jax.eval_shape(
...     lambda v: model.apply(v, x, train=False), variables)
>>> logits.shape, len(feats["stages"]), feats["stages"][0].shape
((2, 100), 12, (2, 65, 192))

References:
  Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021; Touvron et
  al., "Training data-efficient image transformers & distillation through
  attention" (DeiT), ICML 2021; Hao et al., "One-for-All: Bridge the Gap
  Between Heterogeneous Architectures in Knowledge Distillation", NeurIPS 2023
  (Hao840/OFAKD).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models import layers as L
from kd_jax.models import convert as _convert

# OFA-KD `stage_info`: block indices of stages 1..4 for 12-block ViTs.
OFA_STAGE_BLOCKS = (1, 3, 9, 11)

_LN_EPS = 1e-6


def _dense(features, dtype, name, names=None):
  """timm Linear; `names` = logical axes `(in, out)` of the kernel, if any."""
  kinit, binit = nn.initializers.normal(0.02), nn.initializers.zeros
  if names is not None:
    kinit = nn.with_logical_partitioning(kinit, names)
    binit = nn.with_logical_partitioning(binit, names[1:])
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=kinit, bias_init=binit, name=name)


def _names(logical_axes, *names):
  return tuple(names) if logical_axes else None


def _layer_norm(dtype, name):
  return nn.LayerNorm(epsilon=_LN_EPS, dtype=dtype, param_dtype=jnp.float32,
                      name=name)


class Attention(nn.Module):
  """timm multi-head self-attention (fused ``qkv`` Linear, then ``proj``)."""
  num_heads: int
  dtype: Any = jnp.float32
  logical_axes: bool = False

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    hd = d // self.num_heads
    qkv = _dense(3 * d, self.dtype, "qkv",
                 _names(self.logical_axes, "embed", "qkv"))(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, hd]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (hd ** -0.5)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn.astype(self.dtype), v)
    return _dense(d, self.dtype, "proj",
                  _names(self.logical_axes, "heads", "embed"))(
                      out.reshape(b, n, d))


class Mlp(nn.Module):
  hidden: int
  dtype: Any = jnp.float32
  logical_axes: bool = False

  @nn.compact
  def __call__(self, x):
    h = _dense(self.hidden, self.dtype, "fc1",
               _names(self.logical_axes, "embed", "mlp"))(x)
    h = nn.gelu(h, approximate=False)
    return _dense(x.shape[-1], self.dtype, "fc2",
                  _names(self.logical_axes, "mlp", "embed"))(h)


def _drop_path(x, rate, deterministic, rng_fn):
  """Stochastic depth: drops the whole residual branch per sample."""
  if deterministic or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng_fn(), keep, (x.shape[0],) + (1,) *
                              (x.ndim - 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Block(nn.Module):
  """Pre-norm transformer block (timm ``Block``)."""
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  logical_axes: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    rng = lambda: self.make_rng("dropout")  # noqa: E731
    h = Attention(self.num_heads, self.dtype, self.logical_axes, name="attn")(
        _layer_norm(self.dtype, "norm1")(x))
    x = x + _drop_path(h, self.drop_path, not train, rng)
    h = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, self.logical_axes,
            name="mlp")(_layer_norm(self.dtype, "norm2")(x))
    return x + _drop_path(h, self.drop_path, not train, rng)


class VisionTransformer(nn.Module):
  """timm 0.6.5 ``VisionTransformer`` (class token); see module doc."""
  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  num_classes: int = 1000
  dtype: Any = jnp.float32
  logical_axes: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    L.check_image_input(
        x, f"vit (img_size={self.img_size}, patch_size={self.patch_size})",
        hw=(self.img_size, self.img_size))
    p, d = self.patch_size, self.embed_dim
    h = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=True,
                dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=L.torch_linear_kernel_init,  # torch Conv2d default
                bias_init=L.torch_linear_bias_init(3 * p * p),
                name="patch_embed_proj")(x.astype(self.dtype))
    b, gh, gw, _ = h.shape
    h = h.reshape(b, gh * gw, d)  # row-major, = torch flatten(2).transpose
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d),
                     jnp.float32)
    pos = self.param("pos_embed", nn.initializers.normal(0.02),
                     (1, gh * gw + 1, d), jnp.float32)
    h = jnp.concatenate(
        [jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), h], axis=1)
    h = h + pos.astype(self.dtype)
    embed = h
    stages = []
    for i in range(self.depth):
      dp = self.drop_path_rate * i / max(self.depth - 1, 1)  # linspace(0, r)
      h = Block(self.num_heads, self.mlp_ratio, dp, self.dtype,
                self.logical_axes, name=f"blocks_{i}")(h, train)
      stages.append(h)
    h = _layer_norm(self.dtype, "norm")(h)
    pooled = h[:, 0]
    logits = _dense(self.num_classes, self.dtype, "head")(pooled)
    return logits.astype(jnp.float32), {
        "stages": stages, "preact_stages": list(stages), "pooled": pooled,
        "embed": embed}


def vit_tiny_patch16_224(num_classes: int = 1000, dtype=jnp.float32,
                         drop_path_rate: float = 0.0) -> VisionTransformer:
  """ViT-Tiny/16 at 224x224 (timm ``vit_tiny_patch16_224`` / DeiT-Tiny)."""
  return VisionTransformer(img_size=224, patch_size=16, num_classes=num_classes,
                           drop_path_rate=drop_path_rate, dtype=dtype)


def vit_tiny_patch4_32(num_classes: int = 100, dtype=jnp.float32,
                       drop_path_rate: float = 0.0) -> VisionTransformer:
  """ViT-Tiny (dim 192, depth 12, 3 heads) with patch 4 for 32x32 inputs."""
  return VisionTransformer(img_size=32, patch_size=4, num_classes=num_classes,
                           drop_path_rate=drop_path_rate, dtype=dtype)


def _module_to_torch(module_path):
  """``('blocks_3', 'attn', 'qkv')`` -> ``blocks.3.attn.qkv``."""
  out = []
  for m in module_path:
    if m.startswith("blocks_"):
      m = "blocks." + m[len("blocks_"):]
    elif m == "patch_embed_proj":
      m = "patch_embed.proj"
    out.append(m)
  return ".".join(out)


def torch_key_map(shapes):
  """Key map for timm ``VisionTransformer`` state_dicts (class-token ViT).

  ``patch_embed.proj.weight`` (OIHW -> HWIO), ``cls_token``, ``pos_embed``
  (same layout), ``blocks.{i}.norm1.weight``, ``blocks.{i}.attn.qkv.weight``
  (fused ``[3*D, D]``, rows ordered (q|k|v, head, head_dim) in both),
  ``blocks.{i}.mlp.fc1.weight``, ``norm.weight``, ``head.weight`` (transposed)
  and the biases; see `kd_jax.models.convert`.
  """
  raw = ("cls_token", "pos_embed")
  params = {k: v for k, v in shapes["params"].items() if k not in raw}
  entries = _convert.standard_key_map({"params": params},
                                      module_to_torch=_module_to_torch)
  return entries + [
      _convert.KeyMapEntry(("params", k), (k,), _convert.identity)
      for k in raw if k in shapes["params"]]


CIFAR_MODELS = {"vit_tiny_patch4_32": vit_tiny_patch4_32}
IMAGENET_MODELS = {"vit_tiny_patch16_224": vit_tiny_patch16_224}
