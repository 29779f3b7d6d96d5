r"""OFD: overhaul of feature distillation (pre-ReLU features, partial L2).

For each aligned layer (mdistiller `OFD`: `preact_feats[1:]` of both nets,
aligned by keeping the last `min(n_s, n_t)`), the student's pre-ReLU map goes
through an `OFDConnector` (1x1 conv + BN) and
`kd_jax.losses.ofd_loss` compares it with the teacher's pre-ReLU map,
clipped from below at a per-channel margin. The weight is 1e-3 (mdistiller
`FEAT_WEIGHT`; clovaai divides by 1000).

Margins (constants, kept in the distiller state so a resumed run uses the
same ones):

* `margins=[...]`: given directly, one `[C]` array per layer;
* `teacher_bn=[(gamma, beta), ...]`: the teacher's BatchNorm before each
  ReLU, as the reference (`ofd_margin(gamma, beta)`); `bn_before_relu`
  extracts them from the zoo's CIFAR ResNets, WRNs and VGGs;
* neither: estimated at `init` from the teacher's pre-ReLU features on the
  init batch, with the per-channel mean and standard deviation in place of
  the BN's `beta` and `|gamma|` (a kd_jax extension for teachers without
  BatchNorm; the reference assumes BN).

References:
  Heo, Kim, Yun, Park, Kwak & Choi, "A Comprehensive Overhaul of Feature
  Distillation", ICCV 2019. Authors' code:
  github.com/clovaai/overhaul-distillation; conventions from mdistiller
  (`distillers/OFD.py`).
"""

from __future__ import annotations

import math
import re
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import losses
from kd_jax.distillers.base import Distiller
from kd_jax.distillers.base import LayerSpec
from kd_jax.distillers.base import apply_module
from kd_jax.distillers.base import init_module
from kd_jax.distillers.base import register
from kd_jax.models import layers as L


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
    x = L.torch_conv(self.teacher_channels, k, padding=(k - 1) // 2, use_bias=False,
              kernel_init=nn.initializers.normal(std), name="conv")(x)
    return L.batch_norm(train, self.axis_name, name="bn")(x)


def bn_before_relu(teacher_variables: Mapping[str, Any]
                   ) -> List[Tuple[np.ndarray, np.ndarray]]:
  """`(scale, bias)` of the teacher BNs before the ReLUs OFD distills at.

  mdistiller's `get_bn_before_relu` for the zoo's CIFAR families, found by
  parameter names: ResNets (`layer{s}_{last}/bn2`, s = 1..3), WRNs
  (`block2_layer_0/bn1`, `block3_layer_0/bn1`, `bn1`) and VGGs (the last BN
  of blocks 1..4). Raises for other architectures (pass `margins` or
  `teacher_bn` instead).
  """
  params = teacher_variables.get("params", teacher_variables)
  names = set(params)

  def get(*path):
    node = params
    for p in path:
      node = node[p]
    return np.asarray(node["scale"]), np.asarray(node["bias"])

  if "layer1_0" in names:
    out = []
    for s in (1, 2, 3):
      idx = [int(m.group(1)) for n in names
             for m in [re.fullmatch(rf"layer{s}_(\d+)", n)] if m]
      out.append(get(f"layer{s}_{max(idx)}", "bn2"))
    if "layer4_0" in names:
      raise ValueError("bn_before_relu: ImageNet ResNets are not supported; "
                       "pass `teacher_bn` or `margins`.")
    return out
  if "block1_layer_0" in names:
    return [get("block2_layer_0", "bn1"), get("block3_layer_0", "bn1"),
            get("bn1")]
  if "block0_0" in names:
    out = []
    for b in (1, 2, 3, 4):
      bns = [int(m.group(1)) for n in names
             for m in [re.fullmatch(rf"block{b}_(\d+)", n)] if m
             and "scale" in params[n]]
      out.append(get(f"block{b}_{max(bns)}"))
    return out
  raise ValueError(
      "bn_before_relu: unknown teacher architecture (top-level params "
      f"{sorted(names)[:8]}...); pass `teacher_bn` or `margins` to "
      "OFDDistiller.")


def _align(*lists):
  n = min(len(l) for l in lists)
  return [list(l[-n:]) for l in lists]


@register("ofd")
class OFDDistiller(Distiller):
  """OFD (params: connectors; state: their BN stats and the margins).

  Args:
    margins: optional list of `[C_l]` margins.
    teacher_bn: optional list of `(gamma, beta)` pairs (see module doc).
    feature_key: `'preact_stages'`; `layers` / `teacher_layers`: `'1:'`.
    kernel_size: connector kernel (mdistiller `CONNECTOR.KERNEL_SIZE` = 1).
  """

  def __init__(self, *, margins: Optional[Sequence[Any]] = None,
               teacher_bn: Optional[Sequence[Tuple[Any, Any]]] = None,
               feature_key: str = "preact_stages", layers: LayerSpec = "1:",
               teacher_layers: LayerSpec = None, kernel_size: int = 1):
    if margins is not None and teacher_bn is not None:
      raise ValueError("ofd: give `margins` or `teacher_bn`, not both.")
    self.margins = (None if margins is None
                    else [np.asarray(m, np.float32) for m in margins])
    self.teacher_bn = (None if teacher_bn is None else
                       [(np.asarray(g, np.float32), np.asarray(b, np.float32))
                        for g, b in teacher_bn])
    self.feature_key = feature_key
    self.layers = layers
    self.teacher_layers = layers if teacher_layers is None else teacher_layers
    self.kernel_size = kernel_size

  @classmethod
  def from_config(cls, cfg, run_info):
    """`teacher_bn='auto'`: the teacher's BN-before-ReLU parameters,
    `bn_before_relu(run_info.teacher_variables)` (with
    `run_info.placeholders` and no teacher: margins from data)."""
    cfg = dict(cfg)
    if cfg.get("teacher_bn") == "auto":
      if run_info.teacher_variables is not None:
        cfg["teacher_bn"] = bn_before_relu(run_info.teacher_variables)
      elif run_info.placeholders:
        cfg.pop("teacher_bn")
      else:
        raise ValueError("OFD with teacher_bn='auto' needs the teacher "
                         "variables.")
    return super().from_config(cfg, run_info)

  def _pairs(self, inputs):
    s = self._student(inputs, self.feature_key, self.layers)
    t = self._teacher(inputs, self.feature_key, self.teacher_layers)
    s, t = _align(s, t)
    for i, (a, b) in enumerate(zip(s, t)):
      if a.ndim != 4 or b.ndim != 4:
        raise ValueError(f"ofd: layer {i} must be NHWC maps; got student "
                         f"{tuple(a.shape)}, teacher {tuple(b.shape)}.")
    return s, t

  def _connector(self, t, axis_name):
    return OFDConnector(t.shape[-1], self.kernel_size,
                                 axis_name=axis_name)

  def _initial_margins(self, t_list):
    n = len(t_list)
    if self.margins is not None:
      src = [jnp.asarray(m) for m in self.margins]
    elif self.teacher_bn is not None:
      src = [losses.ofd_margin(g, b) for g, b in self.teacher_bn]
    else:
      src = []
      for t in t_list:
        t = jnp.asarray(t, jnp.float32)
        mean = jnp.mean(t, axis=(0, 1, 2))
        std = jnp.std(t, axis=(0, 1, 2))
        src.append(losses.ofd_margin(std, mean))
      return src
    if len(src) < n:
      raise ValueError(f"ofd: got {len(src)} margins for {n} layers.")
    src = src[-n:]  # aligned like the features (the last n)
    for i, (m, t) in enumerate(zip(src, t_list)):
      if m.shape != (t.shape[-1],):
        raise ValueError(
            f"ofd: margin {i} has shape {tuple(m.shape)}; the teacher layer "
            f"has {t.shape[-1]} channels.")
    return [jnp.asarray(m, jnp.float32) for m in src]

  def init(self, rng, inputs):
    s_list, t_list = self._pairs(inputs)
    params, state = {}, {}
    for i, (s, t) in enumerate(zip(s_list, t_list)):
      p, st = init_module(self._connector(t, None),
                           jax.random.fold_in(rng, i), s)
      params[f"connector{i}"] = p
      state[f"connector{i}"] = st
    state["margins"] = self._initial_margins(t_list)
    return params, state

  def __call__(self, params, state, inputs):
    s_list, t_list = self._pairs(inputs)
    outs, new_state = [], {"margins": state["margins"]}
    for i, (s, t) in enumerate(zip(s_list, t_list)):
      key = f"connector{i}"
      out, st = apply_module(self._connector(t, inputs.axis_name),
                              params[key], state[key], s, train=inputs.train)
      outs.append(out)
      new_state[key] = st
    margins = [jax.lax.stop_gradient(m) for m in state["margins"]]
    return losses.ofd_loss(outs, t_list, margins), new_state
