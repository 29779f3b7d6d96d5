"""MNIST models: the seed experiment's MLPs and CNN, the LeNet-5 pair of DAFL,
a BatchNorm CNN (DeepInversion's MNIST teacher) and the small MLPs of
generalized distillation.

* `MLP`: the seed experiment's teacher / student; `hinton_teacher` /
  `hinton_student` (784-1200-1200-10 / 784-800-800-10, the "HintonNet" pair of
  DAFL's Table 1, after Hinton et al. 2015); `lopez_paz_mlp` (two hidden
  layers of 20 ReLUs, Keras' Glorot-uniform init, on any input size: the 28x28
  teacher and the 7x7 student of Lopez-Paz et al., ICLR 2016).
* `LeNet5`: the authors' `lenet.py` of DAFL (huawei-noah/Efficient-Computing,
  `Data-Efficient-Model-Compression/DAFL/lenet.py`): 32x32 input, valid 5x5
  convolutions 6-16-120 with 2x2 max-pooling, then 84 -> 10; `LeNet5(half=
  True)` is `LeNet5Half` (3-8-60, 42). 61,706 / 15,738 parameters (the
  paper's ~62K / ~16K). Features: `pooled` = the 120-d (60-d) `conv3` output
  after ReLU, DAFL's activation feature.
* `BNCNN`: two conv-BN-ReLU-pool blocks + Dense, a BatchNorm-equipped
  teacher for DeepInversion on MNIST.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models import _canonical_conv
from kd_jax.models import layers as L


def _check_input(x, expected_hw, name):
  if x.ndim != 4 or tuple(x.shape[1:3]) != expected_hw:
    raise ValueError(
        f"{name} expects NHWC input of shape [B, {expected_hw[0]}, "
        f"{expected_hw[1]}, C]; got {tuple(x.shape)}.")


class MLP(nn.Module):
  """Fully connected net (H*W*C)-hidden...-num_classes, ReLU, optional dropout.

  `input_hw` is the required input size (None: any NHWC size, flattened).
  `kernel_init` defaults to Flax's LeCun normal (Keras' Glorot uniform for
  `lopez_paz_mlp`); biases start at 0.

  `dropout` drops hidden units, `input_dropout` input pixels (Hinton et al.
  2012: 0.5 and 0.2), both only in training mode (inverted dropout: kept
  units are scaled by `1 / (1 - rate)`, so inference uses the weights as
  they are -- the same as the paper's halving of the outgoing weights).

  Features: `stages` = hidden activations, `preact_stages` = the same before
  ReLU, `pooled` = last hidden activation (the input when there is none).
  """
  hidden: tuple = (512, 256)
  num_classes: int = 10
  dropout: float = 0.5
  input_dropout: float = 0.0
  dtype: Any = jnp.float32
  input_hw: Optional[tuple] = (28, 28)
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.input_hw is not None:
      _check_input(x, tuple(self.input_hw), type(self).__name__)
    elif x.ndim != 4:
      raise ValueError(f"{type(self).__name__} expects NHWC input [B, H, W, "
                       f"C]; got {tuple(x.shape)}.")
    h = x.reshape((x.shape[0], -1)).astype(self.dtype)
    if self.input_dropout > 0:
      h = nn.Dropout(self.input_dropout, deterministic=not train)(h)
    stages, preacts = [], []
    for width in self.hidden:
      z = nn.Dense(width, dtype=self.dtype, kernel_init=self.kernel_init)(h)
      preacts.append(z)
      h = nn.relu(z)
      stages.append(h)
      if self.dropout > 0:
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      kernel_init=self.kernel_init)(h)
    feats = {"stages": stages, "preact_stages": preacts,
             "pooled": stages[-1] if stages else h}
    return logits, feats


class SmallCNN(nn.Module):
  """Two 5x5 conv layers (32, 64 ch) with max-pooling, then Dense 512 -> K.

  About 99.2% test accuracy on MNIST after a few epochs.
  """
  num_classes: int = 10
  dropout: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    _check_input(x, (28, 28), type(self).__name__)
    h = x.astype(self.dtype)
    stages, preacts = [], []
    for ch in (32, 64):
      z = nn.Conv(ch, (5, 5), padding="SAME", dtype=self.dtype,
                  conv_general_dilated=_canonical_conv.conv_general_dilated)(h)
      preacts.append(z)
      h = nn.relu(z)
      h = L.max_pool_nonoverlapping(h, 2)  # = nn.max_pool((2, 2), (2, 2))
      stages.append(h)
    h = h.reshape((h.shape[0], -1))
    z = nn.Dense(512, dtype=self.dtype)(h)
    pooled = nn.relu(z)
    h = nn.Dropout(self.dropout, deterministic=not train)(pooled)
    logits = nn.Dense(self.num_classes, dtype=self.dtype)(h)
    return logits, {"stages": stages, "preact_stages": preacts,
                    "pooled": pooled}


def mlp_teacher(num_classes: int = 10, dtype=jnp.float32):
  return MLP(hidden=(512, 256), num_classes=num_classes, dropout=0.5,
             dtype=dtype)


def mlp_student(num_classes: int = 10, dtype=jnp.float32):
  return MLP(hidden=(128,), num_classes=num_classes, dropout=0.0, dtype=dtype)


def cnn_teacher(num_classes: int = 10, dtype=jnp.float32):
  return SmallCNN(num_classes=num_classes, dtype=dtype)


class LeNet5(nn.Module):
  """DAFL's LeNet-5 (`half=True`: LeNet-5-half), NHWC [B, 32, 32, 1].

  PyTorch's default initialization (U(+-1/sqrt(fan_in)) for weights and
  biases), as the authors' `lenet.py`. Features: `stages` = the pooled
  outputs of conv1, conv2 and the conv3 output (after ReLU), `pooled` = the
  flattened conv3 output (DAFL's `feature`).
  """
  half: bool = False
  num_classes: int = 10
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    _check_input(x, (32, 32), type(self).__name__)
    c1, c2, c3, f1 = (3, 8, 60, 42) if self.half else (6, 16, 120, 84)
    h = x.astype(self.dtype)
    stages, preacts = [], []
    cin = h.shape[-1]
    for i, (ch, pool) in enumerate(((c1, True), (c2, True), (c3, False))):
      z = L.torch_conv(ch, 5, fan_in=cin * 25, canonical=True,
                       name=f"conv{i + 1}")(h)
      preacts.append(z)
      h = nn.relu(z)
      if pool:
        h = L.max_pool_nonoverlapping(h, 2)
      stages.append(h)
      cin = ch
    feature = h.reshape((h.shape[0], -1))
    h = nn.relu(L.linear(f1, fan_in=c3, dtype=self.dtype, name="fc1")(feature))
    logits = L.linear(self.num_classes, fan_in=f1, dtype=self.dtype,
                      name="fc2")(h)
    return logits.astype(jnp.float32), {
        "stages": stages, "preact_stages": preacts, "pooled": feature}


class BNCNN(nn.Module):
  """conv3x3(32)-BN-ReLU-pool, conv3x3(64)-BN-ReLU-pool, Dense 256-BN-ReLU, K.

  A BatchNorm-equipped MNIST teacher (28x28x1) whose BN running statistics
  DeepInversion matches (torch-equivalent BN settings, `layers.batch_norm`).
  """
  num_classes: int = 10
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    _check_input(x, (28, 28), type(self).__name__)
    d = self.dtype
    h = x.astype(d)
    stages, preacts = [], []
    for i, ch in enumerate((32, 64)):
      z = L.conv(ch, 3, padding=1, dtype=d, name=f"conv{i + 1}")(h)
      z = L.batch_norm(train, dtype=d, name=f"bn{i + 1}")(z)
      preacts.append(z)
      h = L.max_pool_nonoverlapping(nn.relu(z), 2)
      stages.append(h)
    h = h.reshape((h.shape[0], -1))
    z = L.linear(256, fan_in=h.shape[-1], dtype=d, name="fc1")(h)
    pooled = nn.relu(L.batch_norm(train, dtype=d, name="bn3")(z))
    logits = L.linear(self.num_classes, fan_in=256, dtype=d, name="fc2")(pooled)
    return logits.astype(jnp.float32), {
        "stages": stages, "preact_stages": preacts, "pooled": pooled}


def lenet5(num_classes: int = 10, dtype=jnp.float32):
  return LeNet5(half=False, num_classes=num_classes, dtype=dtype)


def lenet5_half(num_classes: int = 10, dtype=jnp.float32):
  return LeNet5(half=True, num_classes=num_classes, dtype=dtype)


def hinton_teacher(num_classes: int = 10, dtype=jnp.float32):
  return MLP(hidden=(1200, 1200), num_classes=num_classes, dropout=0.0,
             dtype=dtype)


def hinton_student(num_classes: int = 10, dtype=jnp.float32):
  return MLP(hidden=(800, 800), num_classes=num_classes, dropout=0.0,
             dtype=dtype)


def lopez_paz_mlp(num_classes: int = 10, dtype=jnp.float32):
  """Two hidden layers of 20 ReLUs (Keras `Dense`: Glorot uniform, zero bias),
  any input size."""
  return MLP(hidden=(20, 20), num_classes=num_classes, dropout=0.0,
             dtype=dtype, input_hw=None,
             kernel_init=nn.initializers.glorot_uniform())


def cnn_bn(num_classes: int = 10, dtype=jnp.float32):
  return BNCNN(num_classes=num_classes, dtype=dtype)


# Hinton, Vinyals & Dean 2015, Section 3 (MNIST): two hidden ReLU layers.
HINTON_WIDTHS = (30, 300, 800, 1200)


def hinton_mlp(width: int, *, num_classes: int = 10, dropout: float = 0.0,
               input_dropout: float = 0.0, dtype=jnp.float32):
  """784-width-width-num_classes ReLU MLP (Hinton, Vinyals & Dean 2015).

  The paper's teacher is `hinton_mlp(1200, dropout=0.5, input_dropout=0.2)`
  (dropout rates of Hinton et al. 2012), its students `hinton_mlp(800)` and,
  in the temperature sweep, widths 300 and 30 -- all without dropout.
  """
  if not isinstance(width, int) or width < 1:
    raise ValueError(f"`width` must be a positive int; got {width!r}.")
  return MLP(hidden=(width, width), num_classes=num_classes, dropout=dropout,
             input_dropout=input_dropout, dtype=dtype)


def mlp_1200x2(num_classes: int = 10, dtype=jnp.float32):
  """The 2015 paper's teacher: 784-1200-1200-10, dropout 0.2 in / 0.5 hidden."""
  return hinton_mlp(1200, num_classes=num_classes, dropout=0.5,
                    input_dropout=0.2, dtype=dtype)


def _plain_mlp(width):
  def fn(num_classes: int = 10, dtype=jnp.float32):
    return hinton_mlp(width, num_classes=num_classes, dtype=dtype)
  fn.__name__ = f"mlp_{width}x2"
  fn.__doc__ = (f"784-{width}-{width}-10 ReLU MLP without dropout (Hinton, "
                "Vinyals & Dean 2015).")
  return fn


# Registered as `mlp_<width>x2` (no dropout) for every width of the paper's
# temperature sweep; `mlp_1200x2` is the regularized teacher.
PLAIN_MLPS = {f"mlp_{w}x2": _plain_mlp(w) for w in HINTON_WIDTHS if w != 1200}
