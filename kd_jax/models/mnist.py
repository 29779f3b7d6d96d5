"""MNIST models of the seed experiment: MLP teacher/student and a small CNN."""

from __future__ import annotations

from typing import Any

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
  """Fully connected net 784-hidden...-num_classes, ReLU, optional dropout.

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

  @nn.compact
  def __call__(self, x, train: bool = False):
    _check_input(x, (28, 28), type(self).__name__)
    h = x.reshape((x.shape[0], -1)).astype(self.dtype)
    if self.input_dropout > 0:
      h = nn.Dropout(self.input_dropout, deterministic=not train)(h)
    stages, preacts = [], []
    for width in self.hidden:
      z = nn.Dense(width, dtype=self.dtype)(h)
      preacts.append(z)
      h = nn.relu(z)
      stages.append(h)
      if self.dropout > 0:
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
    logits = nn.Dense(self.num_classes, dtype=self.dtype)(h)
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
