r"""OFA-KD: per-stage projector branches to logit space + `ofa_loss`.

For every selected student stage, a projector branch maps the stage's
feature to class logits, and `kd_jax.losses.ofa_loss` (adaptive target
enhancement, exponent `eps`) compares it with the teacher's logits:

.. math:: \mathcal{L} = \sum_{s} \operatorname{mean}_b\,
   \mathrm{OFA}_{\epsilon_s}\big(g_s(f^s_s), z^t, y\big)

(OFAKD's `loss_ofa`, weight `--ofa-loss-weight` 1). The loss on the
student's own logits (`loss_kd`, eps of the last entry) is a plain logit
term: add `Term('ofa', weight, eps=...)` next to this distiller.

Branches (Hao840/OFAKD `distillers/ofa.py`):

* CNN students (`branch='cnn'`, NHWC stage maps): stage `s` of `S` gets
  `S - s` `SepConv` down-sampling blocks (channels doubled, the last to
  `max(D_s, D_t)`; a 1x1 conv for the last stage), global average pooling and
  a Linear (`D_s`, `D_t`: the student's / teacher's pooled feature sizes).
  OFAKD hard-codes `S = 4` (ImageNet CNNs); here `S` = the last selected
  stage (`num_stages`), so 3-stage CIFAR ResNets work the same way.
* ViT students (`branch='vit'`, tokens `[B, 1 + N, D]`): patch merging down
  to a 7x7 grid, `max(4 - s, 1)` transformer blocks (4 heads), the class
  token and a Linear.

Initialization as OFAKD's `init_weights` (conv Kaiming-normal fan-out, BN
1/0, Linear truncated normal 0.02, bias 0).

References:
  Hao, Guo, Han, Tang, Hu, Wang & Xu, "One-for-All: Bridge the Gap Between
  Heterogeneous Architectures in Knowledge Distillation", NeurIPS 2023.
  Authors' code: github.com/Hao840/OFAKD.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distillers.base import Distiller
from kd_jax.distillers.base import apply_module
from kd_jax.distillers.base import init_module
from kd_jax.distillers.base import register
from kd_jax.models import layers as L


_trunc02 = nn.initializers.truncated_normal(0.02)


def _ofa_linear(features, name, use_bias=True):
  """OFA `init_weights`: Linear `trunc_normal_(std=.02)`, bias 0."""
  return nn.Dense(features, use_bias=use_bias, kernel_init=_trunc02,
                  bias_init=nn.initializers.zeros, param_dtype=jnp.float32,
                  name=name)


class SepConv(nn.Module):
  """OFA `SepConv`: depthwise 3x3 stride 2 + 1x1 + BN + ReLU, then depthwise
  3x3 + 1x1 to `out_channels` + BN + ReLU (halves H and W)."""
  out_channels: int
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    c = x.shape[-1]
    kin = L.kaiming_normal_fan_out
    x = L.torch_conv(c, 3, stride=2, padding=1, use_bias=False, groups=c,
              kernel_init=kin, name="dw1")(x)
    x = L.torch_conv(c, 1, use_bias=False, kernel_init=kin, name="pw1")(x)
    x = nn.relu(L.batch_norm(train, self.axis_name, name="bn1")(x))
    x = L.torch_conv(c, 3, padding=1, use_bias=False, groups=c, kernel_init=kin,
              name="dw2")(x)
    x = L.torch_conv(self.out_channels, 1, use_bias=False, kernel_init=kin,
              name="pw2")(x)
    return nn.relu(L.batch_norm(train, self.axis_name, name="bn2")(x))


class CNNBranch(nn.Module):
  """OFA projector for a CNN stage: down-sampling blocks, GAP, Linear.

  With `num_down` > 0: `num_down` `SepConv`s doubling the channels (the last
  one to `feature_dim`); with `num_down == 0` (the last stage): a 1x1 conv
  with bias to `feature_dim`. Then global average pooling and a Linear to
  `num_classes` (OFAKD: `4 - stage` blocks for 4-stage CNNs; `feature_dim =
  max(student, teacher final feature dims)`).
  """
  num_down: int
  feature_dim: int
  num_classes: int
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = jnp.asarray(x, jnp.float32)
    c = x.shape[-1]
    if self.num_down > 0:
      for i in range(self.num_down):
        out = self.feature_dim if i == self.num_down - 1 else c * 2
        x = SepConv(out, self.axis_name, name=f"down{i}")(x, train)
        c *= 2
    else:
      x = L.torch_conv(self.feature_dim, 1, use_bias=True,
                kernel_init=L.kaiming_normal_fan_out, name="proj")(x)
    x = jnp.mean(x, axis=(1, 2))
    return _ofa_linear(self.num_classes, "head")(x)


class PatchMerging(nn.Module):
  """Swin patch merging on `[B, H*W, C]` tokens: 2x2 neighbours concatenated
  (`x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]`), LayerNorm,
  Linear without bias to `out_dim`, activation."""
  resolution: Tuple[int, int]
  out_dim: int
  gelu: bool = True

  @nn.compact
  def __call__(self, x):
    h, w = self.resolution
    b, n, c = x.shape
    if n != h * w or h % 2 or w % 2:
      raise ValueError(
          f"PatchMerging: expected {h}x{w} (even) tokens; got {n} tokens.")
    x = x.reshape(b, h, w, c)
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2],
                         x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    x = x.reshape(b, -1, 4 * c)
    x = nn.LayerNorm(epsilon=1e-5, param_dtype=jnp.float32, name="norm")(x)
    x = _ofa_linear(self.out_dim, "reduction", use_bias=False)(x)
    return nn.gelu(x, approximate=False) if self.gelu else x


class TransformerBlock(nn.Module):
  """timm 0.6.5 `Block(dim, num_heads)` with its defaults (as in OFAKD's
  projector): pre-norm, LayerNorm eps 1e-5, `qkv_bias=False`, MLP ratio 4,
  exact GELU."""
  num_heads: int = 4

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    hd = d // self.num_heads
    h = nn.LayerNorm(epsilon=1e-5, param_dtype=jnp.float32, name="norm1")(x)
    qkv = _ofa_linear(3 * d, "qkv", use_bias=False)(h)
    qkv = qkv.reshape(b, n, 3, self.num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * hd ** -0.5,
                         axis=-1)
    h = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, n, d)
    x = x + _ofa_linear(d, "proj")(h)
    h = nn.LayerNorm(epsilon=1e-5, param_dtype=jnp.float32, name="norm2")(x)
    h = nn.gelu(_ofa_linear(4 * d, "fc1")(h), approximate=False)
    return x + _ofa_linear(d, "fc2")(h)


class ViTBranch(nn.Module):
  """OFA projector for a ViT stage (tokens `[B, T + N, D]`, `T` class tokens).

  Patch tokens are merged `merge_num` times (first to `feature_dim`, GELU on
  all but the last merge), class tokens pass through; then `num_blocks`
  transformer blocks (4 heads), the first class token (or the token mean when
  `num_tokens == 0`) and a Linear to `num_classes`. When merging changes the
  width (`feature_dim` != the token width) the class tokens get a linear
  projection (`token_proj`; OFAKD has no such case: its DeiT students keep
  the width).
  """
  num_blocks: int
  feature_dim: int
  num_classes: int
  num_tokens: int = 1
  final_grid: int = 7

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = jnp.asarray(x, jnp.float32)
    t = self.num_tokens
    tokens, patches = x[:, :t], x[:, t:]
    grid = int(round(patches.shape[1] ** 0.5))
    if grid * grid != patches.shape[1]:
      raise ValueError(
          f"ViTBranch: {patches.shape[1]} patch tokens do not form a square "
          "grid.")
    merge_num = max(int(math.log2(grid / self.final_grid)), 0)
    for i in range(merge_num):
      g = grid // 2 ** i
      patches = PatchMerging((g, g), self.feature_dim,
                             gelu=(i != merge_num - 1), name=f"merge{i}")(
                                 patches)
    if t and tokens.shape[-1] != patches.shape[-1]:
      # OFAKD passes class tokens through unchanged, which only works when
      # the merged width equals the token width (as for DeiT students);
      # otherwise they are projected linearly (kd_jax generalization).
      tokens = _ofa_linear(patches.shape[-1], "token_proj",
                           use_bias=False)(tokens)
    x = jnp.concatenate([tokens, patches], axis=1) if t else patches
    for i in range(self.num_blocks):
      x = TransformerBlock(4, name=f"block{i}")(x)
    feat = x[:, 0] if t else jnp.mean(x, axis=1)
    return _ofa_linear(self.num_classes, "head")(feat)


@register("ofa")
class OFADistiller(Distiller):
  """OFA projector branches (params: branches; state: their BN stats).

  Args:
    stages: 1-based stage numbers (OFAKD `--ofa-stage`), default `(1, 2, 3)`
      for 3-stage CIFAR CNNs (`(1, 2, 3, 4)` for ImageNet CNNs / ViTs).
    layers: index into `features[feature_key]` of each stage; default: the
      stage number itself (`stages[s]` of the zoo CNNs, whose entry 0 is the
      stem). For the zoo ViTs pass `kd_jax.models.vit.OFA_STAGE_BLOCKS`.
    branch: `'cnn'` or `'vit'`.
    num_stages: `S` (default: the largest stage number).
    eps: `ofa_loss` exponent, a number or one per stage (OFAKD: 1 on CIFAR,
      1.5 on ImageNet).
    temperature: `ofa_loss` temperature (1).
    vit_blocks: transformer blocks per ViT branch (default `max(4 - s, 1)`).
  """

  def __init__(self, *, stages: Sequence[int] = (1, 2, 3),
               layers: Optional[Sequence[int]] = None,
               feature_key: str = "stages", branch: str = "cnn",
               num_stages: Optional[int] = None,
               eps: Union[float, Sequence[float]] = 1.0,
               temperature: float = 1.0, num_tokens: int = 1,
               vit_blocks: Optional[Sequence[int]] = None):
    if branch not in ("cnn", "vit"):
      raise ValueError(f"ofa: `branch` must be 'cnn' or 'vit'; got {branch!r}.")
    self.stages = tuple(int(s) for s in stages)
    if not self.stages or min(self.stages) < 1:
      raise ValueError(f"ofa: `stages` must be 1-based stage numbers; got "
                       f"{stages!r}.")
    self.layers = tuple(self.stages if layers is None else layers)
    if len(self.layers) != len(self.stages):
      raise ValueError(f"ofa: `layers` needs one index per stage; got "
                       f"{self.layers} for stages {self.stages}.")
    self.feature_key = feature_key
    self.branch = branch
    self.num_stages = num_stages or max(self.stages)
    if isinstance(eps, (int, float)):
      eps = (float(eps),) * len(self.stages)
    self.eps = tuple(float(e) for e in eps)
    if len(self.eps) != len(self.stages):
      raise ValueError(f"ofa: `eps` needs one value per stage; got {self.eps}.")
    self.temperature = temperature
    self.num_tokens = num_tokens
    self.vit_blocks = (None if vit_blocks is None
                       else tuple(int(b) for b in vit_blocks))

  def _feats(self, inputs):
    return self._student(inputs, self.feature_key, list(self.layers))

  def _dims(self, inputs):
    s = self._student(inputs, "pooled", None)[0]
    t = self._teacher(inputs, "pooled", None)[0]
    return s.shape[-1], t.shape[-1], inputs.student_logits.shape[-1]

  def _branches(self, inputs, axis_name):
    ds, dt, k = self._dims(inputs)
    out = []
    for i, st in enumerate(self.stages):
      if self.branch == "cnn":
        out.append(CNNBranch(self.num_stages - st, max(ds, dt), k,
                                      axis_name=axis_name))
      else:
        nb = (self.vit_blocks[i] if self.vit_blocks is not None
              else max(4 - st, 1))
        out.append(ViTBranch(nb, ds, k, num_tokens=self.num_tokens))
    return out

  def init(self, rng, inputs):
    feats = self._feats(inputs)
    params, state = {}, {}
    for i, (br, f) in enumerate(zip(self._branches(inputs, None), feats)):
      p, st = init_module(br, jax.random.fold_in(rng, i), f)
      params[f"stage{self.stages[i]}"] = p
      state[f"stage{self.stages[i]}"] = st
    return params, state

  def __call__(self, params, state, inputs):
    if inputs.teacher_logits is None or isinstance(inputs.teacher_logits,
                                                   (list, tuple)):
      raise ValueError("ofa: needs the logits of a single teacher.")
    feats = self._feats(inputs)
    total = jnp.zeros((), jnp.float32)
    new_state = {}
    for i, (br, f) in enumerate(zip(self._branches(inputs, inputs.axis_name),
                                    feats)):
      key = f"stage{self.stages[i]}"
      logits, st = apply_module(br, params[key], state[key], f,
                                 train=inputs.train)
      new_state[key] = st
      total = total + jnp.mean(losses.ofa_loss(
          logits, inputs.teacher_logits, inputs.labels, eps=self.eps[i],
          temperature=self.temperature))
    return total, new_state
