"""Trainable adapters of the feature distillers, as Flax Linen modules (NHWC).

Each module mirrors the authors' PyTorch module (layers, kernel sizes,
padding, bias, BatchNorm placement and initialization); NCHW `[B, C, H, W]`
there is NHWC `[B, H, W, C]` here. BatchNorms use PyTorch's settings
(momentum 0.1, eps 1e-5, biased batch variance for normalization) and take an
`axis_name`: inside `pmap` the distillers pass theirs, so adapters normalize
with *global*-batch statistics (sync BN) and the running statistics stay
identical on every device.

* `ConvReg` -- FitNets regressor / AB connector (RepDistiller
  `models/util.py::ConvReg`), with `conv_reg_kind` exposing its rule.
* `VIDRegressor` -- VID's three bias-free 1x1 convs (RepDistiller `VIDLoss`).
* `Paraphraser`, `Translator` -- Factor Transfer (RepDistiller `util.py`).
* `OFDConnector` -- OFD's conv + BN (mdistiller `ConnectorConvBN`).
* `Embed` -- CRD (`Linear` + L2 normalization, no eps) and CC's
  `LinearEmbed` (`normalize=False`).
* `ABF` -- ReviewKD's attention-based fusion (mdistiller `ReviewKD.ABF`).
* `SepConv`, `CNNBranch`, `PatchMerging`, `TransformerBlock`, `ViTBranch`
  -- OFA-KD's per-stage projector branches (Hao840/OFAKD `distillers/ofa.py`,
  `utils.py`).

Initialization (PyTorch defaults unless the reference re-initializes):
`nn.Conv2d` / `nn.Linear` default weights and biases are
:math:`U(\\pm 1/\\sqrt{fan_{in}})`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "batch_norm", "conv_reg_kind", "ConvReg", "VIDRegressor", "Paraphraser",
    "Translator", "OFDConnector", "Embed", "ABF", "nearest_resize",
    "SepConv", "CNNBranch", "PatchMerging", "TransformerBlock", "ViTBranch",
]


# ------------------------------------------------------------- init / BN --

def uniform_init(bound: float) -> Callable:
  """U(-bound, bound)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def torch_default_init(fan_in: int) -> Callable:
  """PyTorch's default `Conv2d` / `Linear` init, U(+-1/sqrt(fan_in))."""
  return uniform_init(1.0 / math.sqrt(fan_in))


# kaiming_uniform_(a=1): gain 1, bound sqrt(3 / fan_in).
kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
# kaiming_normal_(mode='fan_out', nonlinearity='relu') (OFA init_weights).
kaiming_normal_fan_out = nn.initializers.variance_scaling(
    2.0, "fan_out", "normal")


def batch_norm(train: bool, axis_name: Optional[str], *, use_scale=True,
               use_bias=True, name: Optional[str] = None) -> nn.BatchNorm:
  """`nn.BatchNorm2d` (momentum 0.1, eps 1e-5), synchronized over `axis_name`."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, use_fast_variance=False,
                      use_scale=use_scale, use_bias=use_bias,
                      axis_name=axis_name if train else None,
                      param_dtype=jnp.float32, name=name)


def _conv(features, kernel, *, stride=1, padding=0, use_bias=True,
          groups=1, fan_in=None, kernel_init=None, name=None):
  """`nn.Conv2d` equivalent with explicit symmetric padding."""
  kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
  ph, pw = (padding, padding) if isinstance(padding, int) else padding
  init = kernel_init or (torch_default_init(fan_in) if fan_in else None)
  kwargs = {}
  if init is not None:
    kwargs["kernel_init"] = init
  if use_bias:
    kwargs["bias_init"] = (torch_default_init(fan_in) if fan_in
                           else nn.initializers.zeros)
  return nn.Conv(features, (kh, kw), strides=(stride, stride),
                 padding=((ph, ph), (pw, pw)), use_bias=use_bias,
                 feature_group_count=groups, param_dtype=jnp.float32,
                 name=name, **kwargs)


def _conv_transpose(features, kernel, *, stride, padding, fan_in, name=None):
  """`nn.ConvTranspose2d(kernel, stride, padding)` (output `(H-1)s - 2p + k`).

  Flax's explicit transposed-conv padding is `k - 1 - p` per side, and
  `transpose_kernel=True` gives PyTorch's gradient-of-conv semantics.
  PyTorch computes the default init's fan-in of a transposed conv from
  `weight.size(1) * k * k` = `out * k * k`.
  """
  q = kernel - 1 - padding
  return nn.ConvTranspose(
      features, (kernel, kernel), strides=(stride, stride),
      padding=((q, q), (q, q)), transpose_kernel=True, use_bias=True,
      kernel_init=torch_default_init(fan_in),
      bias_init=torch_default_init(fan_in), param_dtype=jnp.float32,
      name=name)


# ---------------------------------------------------------------- ConvReg --

def conv_reg_kind(student_hw: Sequence[int], teacher_hw: Sequence[int]):
  """RepDistiller's ConvReg rule for student/teacher spatial sizes `(H, W)`.

  Returns `('conv', (3, 3), 2, 1)` when `s_H == 2 t_H` (3x3 conv, stride 2,
  padding 1), `('conv_transpose', (4, 4), 2, 1)` when `2 s_H == t_H`, and
  `('conv', (1 + s_H - t_H, 1 + s_W - t_W), 1, 0)` when `s_H >= t_H`
  (tuples: kind, kernel, stride, padding). A teacher map that is taller but
  not exactly twice as tall is rejected, as in the reference.

  >>> conv_reg_kind((16, 16), (8, 8))
  ('conv', (3, 3), 2, 1)
  >>> conv_reg_kind((8, 8), (16, 16))
  ('conv_transpose', (4, 4), 2, 1)
  >>> conv_reg_kind((8, 8), (6, 6))
  ('conv', (3, 3), 1, 0)
  """
  s_h, s_w = int(student_hw[0]), int(student_hw[1])
  t_h, t_w = int(teacher_hw[0]), int(teacher_hw[1])
  if s_h == 2 * t_h:
    return ("conv", (3, 3), 2, 1)
  if 2 * s_h == t_h:
    return ("conv_transpose", (4, 4), 2, 1)
  if s_h >= t_h:
    if s_w < t_w:
      raise ValueError(
          f"ConvReg: student width {s_w} is smaller than the teacher's {t_w} "
          f"while the student height {s_h} >= {t_h}; unsupported shapes.")
    return ("conv", (1 + s_h - t_h, 1 + s_w - t_w), 1, 0)
  raise ValueError(
      f"ConvReg: student map {s_h}x{s_w} is smaller than the teacher map "
      f"{t_h}x{t_w} and not exactly half its size; the reference regressor "
      "(conv / transposed conv / shrinking conv) cannot map it.")


class ConvReg(nn.Module):
  """FitNets convolutional regressor: conv (rule above) + BN + ReLU.

  RepDistiller `ConvReg(s_shape, t_shape, use_relu)`; the conv has a bias,
  the BN normalizes with batch statistics in training. `use_relu=False` is
  AB's connector.

  Attributes:
    teacher_channels: output channels.
    teacher_hw: teacher `(H, W)`.
    use_relu: apply the final ReLU.
    axis_name: sync-BN axis (inside `pmap`).
  """
  teacher_channels: int
  teacher_hw: Tuple[int, int]
  use_relu: bool = True
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 4:
      raise ValueError(
          f"ConvReg expects an NHWC student map [B, H, W, C]; got shape "
          f"{tuple(x.shape)}.")
    kind, kernel, stride, pad = conv_reg_kind(x.shape[1:3], self.teacher_hw)
    c_in, c_out = x.shape[-1], self.teacher_channels
    if kind == "conv":
      x = _conv(c_out, kernel, stride=stride, padding=pad, use_bias=True,
                fan_in=c_in * kernel[0] * kernel[1], name="conv")(x)
    else:
      x = _conv_transpose(c_out, kernel[0], stride=stride, padding=pad,
                          fan_in=c_out * kernel[0] * kernel[1],
                          name="conv")(x)
    x = batch_norm(train, self.axis_name, name="bn")(x)
    return nn.relu(x) if self.use_relu else x


# -------------------------------------------------------------------- VID --

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
    x = _conv(self.mid_channels, 1, use_bias=False, fan_in=c_in,
              name="conv1")(x)
    x = nn.relu(x)
    x = _conv(self.mid_channels, 1, use_bias=False, fan_in=self.mid_channels,
              name="conv2")(x)
    x = nn.relu(x)
    return _conv(self.out_channels, 1, use_bias=False,
                 fan_in=self.mid_channels, name="conv3")(x)


# --------------------------------------------------------------------- FT --

def _leaky(x):
  return nn.leaky_relu(x, negative_slope=0.1)


class _FTEncoder(nn.Module):
  """conv3x3(in, in) [BN] LReLU, conv3x3(in, out) [BN] LReLU, conv3x3(out, out)."""
  out_channels: int
  use_bn: bool
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    c_in = x.shape[-1]
    widths = (c_in, self.out_channels, self.out_channels)
    prev = c_in
    for i, w in enumerate(widths):
      x = _conv(w, 3, padding=1, use_bias=True, fan_in=prev * 9,
                name=f"conv{i}")(x)
      if self.use_bn:
        x = batch_norm(train, self.axis_name, name=f"bn{i}")(x)
      x = _leaky(x)
      prev = w
    return x


class Paraphraser(nn.Module):
  """FT paraphraser (an autoencoder of the teacher feature), `k = 0.5`.

  Encoder: three 3x3 convs (`C -> C -> kC -> kC`), decoder: three 3x3
  transposed convs (`kC -> kC -> C -> C`), each followed by LeakyReLU(0.1)
  (and a BN with `use_bn`; RepDistiller's FT uses `use_bn=False`). Returns the
  factor with `is_factor=True`, else `(factor, reconstruction)`.
  """
  channels: int
  k: float = 0.5
  use_bn: bool = False
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = True, is_factor: bool = False):
    x = jnp.asarray(x, jnp.float32)
    out = int(self.channels * self.k)
    factor = _FTEncoder(out, self.use_bn, self.axis_name, name="encoder")(
        x, train)
    if is_factor:
      return factor
    h = factor
    prev = out
    for i, w in enumerate((out, self.channels, self.channels)):
      h = _conv_transpose(w, 3, stride=1, padding=1, fan_in=w * 9,
                          name=f"decoder_conv{i}")(h)
      if self.use_bn:
        h = batch_norm(train, self.axis_name, name=f"decoder_bn{i}")(h)
      h = _leaky(h)
      prev = w
    del prev
    return factor, h


class Translator(nn.Module):
  """FT translator: the paraphraser's encoder on the student feature (BN on)."""
  teacher_channels: int
  k: float = 0.5
  use_bn: bool = True
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = jnp.asarray(x, jnp.float32)
    return _FTEncoder(int(self.teacher_channels * self.k), self.use_bn,
                      self.axis_name, name="encoder")(x, train)


# -------------------------------------------------------------------- OFD --

class OFDConnector(nn.Module):
  """OFD connector: conv (no bias, `N(0, 2 / (k^2 C_out))`) + BN.

  mdistiller `ConnectorConvBN` / RepDistiller `ConnectorV2` (kernel 1).
  """
  teacher_channels: int
  kernel_size: int = 1
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = jnp.asarray(x, jnp.float32)
    k = self.kernel_size
    std = math.sqrt(2.0 / (k * k * self.teacher_channels))
    x = _conv(self.teacher_channels, k, padding=(k - 1) // 2, use_bias=False,
              kernel_init=nn.initializers.normal(std), name="conv")(x)
    return batch_norm(train, self.axis_name, name="bn")(x)


# --------------------------------------------------------------- CRD / CC --

class Embed(nn.Module):
  """Flatten + Linear (PyTorch init) [+ L2 normalization by the plain norm].

  CRD's `Embed` divides by `||x||_2` with no eps (RepDistiller `Normalize`);
  `normalize=False` is CC's `LinearEmbed`.
  """
  features: int = 128
  normalize: bool = True

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
    d = x.shape[-1]
    x = nn.Dense(self.features, kernel_init=torch_default_init(d),
                 bias_init=torch_default_init(d), param_dtype=jnp.float32,
                 name="linear")(x)
    if self.normalize:
      x = x / jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
    return x


# --------------------------------------------------------------- ReviewKD --

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
    x = _conv(self.mid_channels, 1, use_bias=False,
              kernel_init=kaiming_uniform_a1, name="conv1")(x)
    x = batch_norm(train, self.axis_name, name="bn1")(x)
    if self.fuse:
      if y is None or shape is None:
        raise ValueError("ABF with fuse=True needs the residual `y` and "
                         "`shape`.")
      y = nearest_resize(y, shape)
      z = jnp.concatenate([x, y], axis=-1)
      z = nn.sigmoid(_conv(2, 1, use_bias=True, fan_in=2 * self.mid_channels,
                           name="att_conv")(z))
      x = x * z[..., 0:1] + y * z[..., 1:2]
    if out_shape is not None and x.shape[1] != out_shape:
      x = nearest_resize(x, out_shape)
    out = _conv(self.out_channels, 3, padding=1, use_bias=False,
                kernel_init=kaiming_uniform_a1, name="conv2")(x)
    out = batch_norm(train, self.axis_name, name="bn2")(out)
    return out, x


# -------------------------------------------------------------------- OFA --

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
    kin = kaiming_normal_fan_out
    x = _conv(c, 3, stride=2, padding=1, use_bias=False, groups=c,
              kernel_init=kin, name="dw1")(x)
    x = _conv(c, 1, use_bias=False, kernel_init=kin, name="pw1")(x)
    x = nn.relu(batch_norm(train, self.axis_name, name="bn1")(x))
    x = _conv(c, 3, padding=1, use_bias=False, groups=c, kernel_init=kin,
              name="dw2")(x)
    x = _conv(self.out_channels, 1, use_bias=False, kernel_init=kin,
              name="pw2")(x)
    return nn.relu(batch_norm(train, self.axis_name, name="bn2")(x))


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
      x = _conv(self.feature_dim, 1, use_bias=True,
                kernel_init=kaiming_normal_fan_out, name="proj")(x)
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
