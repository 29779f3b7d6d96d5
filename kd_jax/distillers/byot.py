r"""BYOT: "Be Your Own Teacher" -- the deepest classifier teaches shallow exits.

A bottleneck + classifier exit after every stage of the student but the
last; the network's own (deepest) classifier is the teacher of the shallow
ones. With :math:`z_i, f_i` the logits and pooled bottleneck feature of exit
:math:`i = 1..n`, :math:`z_d` the student's logits and :math:`f_d` its
pooled last-stage feature (`features['pooled']`, both constants here):

.. math::
  \mathcal{L} = (1-\alpha)\Big[\mathrm{CE}(z_d, y) + \sum_i \mathrm{CE}(z_i, y)
    \Big] + \alpha \sum_i T^2\, H\big(\sigma(z_d/T), \sigma(z_i/T)\big)
    + \beta \sum_i \sum_b \big\| (f_{i,b} - f_{d,b})
      \odot [f_{i,b} > 0 \lor f_{d,b} > 0] \big\|_2^2

(`kd_jax.losses.soft_cross_entropy`, `kd_jax.losses.byot_feature_loss`,
summed over the global batch as the reference's `.sum()`). The first CE is
the objective's own: run the term with weight 1 and `loss.ce_weight = 1 -
alpha`; this distiller adds everything else. The student needs no teacher
(`needs_teacher = False`): the deepest classifier is the teacher.

There is no official code. kd_jax follows the widely used reimplementation
luanyunteng/pytorch-be-your-own-teacher (`models/resnet.py`, `train.py`),
whose README says it guesses the side branches and the hyperparameters:

* exits after every stage but the last: `features['stages'][1:-1]` of the
  zoo's CIFAR ResNets (after `layer1..3` of its ResNet18 = `resnet18_cifar`);
* exit = `branchBottleNeck(C_in, C_d, kernel_size=k)`: conv 1x1 -> `C_d/4`,
  conv k x k stride k -> `C_d/4`, conv 1x1 -> `C_d` (all with bias), each
  followed by BatchNorm + ReLU, then global average pooling (the feature)
  and a linear classifier; `k` = the stage's height over the last stage's
  (8, 4, 2 for ResNet18), `C_d` = the last stage's channels. Conv weights
  Kaiming-normal (fan-out), biases and the classifier PyTorch's default;
  its unused `downsample*_1` modules are not created;
* `alpha = 0.1`, `T = 3`, `beta = 1e-6`; the KD term is a cross-entropy
  to the deepest classifier's softened output times `T^2` (same gradient as
  KL); the feature term compares the *pooled* features (not the maps) and
  applies to every exit, the shallowest included;
* recipe: SGD 0.1 (momentum 0.9, weight decay 5e-4), batch 128, 200 epochs,
  LR x0.1 at epochs 75 / 130 / 180 (`configs/cifar100_byot.py`).

Evaluation: every exit's accuracy (the reference's `Middle{1,2,3}@1` next to
`Prec@1`) and that of the ensemble of all classifiers (mean of their
softmax probabilities; the paper reports an ensemble column, the
reimplementation none): `BYOTDistiller.eval_sums` / `make_exit_eval_step`.

Data parallelism: the exits' BatchNorms normalize over `inputs.axis_name`
(sync BN), and the feature term is scaled to the *global* batch sum.

References:
  Zhang, Song, Gao, Chen, Bao & Ma, "Be Your Own Teacher: Improve the
  Performance of Convolutional Neural Networks via Self Distillation",
  ICCV 2019. Reimplementation: github.com/luanyunteng/pytorch-be-your-own-teacher.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from kd_jax import losses
from kd_jax.distillers.base import Distiller
from kd_jax.distillers.base import apply_module
from kd_jax.distillers.base import init_module
from kd_jax.distillers.base import register
from kd_jax.distillers.base import select_features
from kd_jax.models import layers as L
from kd_jax.train import state as _state
from kd_jax.train import steps as _steps


class BYOTBranch(nn.Module):
  """The reimplementation's `branchBottleNeck` + average pool + classifier.

  Attributes:
    channels: output channels `C_d` (the last stage's); the middle convs
      have `C_d // 4`.
    kernel: kernel size = stride of the middle conv.
    num_classes: classifier outputs.
    axis_name: sync-BN axis (inside `pmap`).

  Returns `(logits [B, num_classes], feature [B, C_d])`.
  """
  channels: int
  kernel: int
  num_classes: int
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = jnp.asarray(x, jnp.float32)
    mid = self.channels // 4
    for i, (c, k) in enumerate(((mid, 1), (mid, self.kernel),
                                (self.channels, 1))):
      x = L.torch_conv(c, k, stride=k, use_bias=True,
                       fan_in=x.shape[-1] * k * k,
                       kernel_init=L.kaiming_normal_fan_out,
                       name=f"conv{i + 1}")(x)
      x = L.batch_norm(train, self.axis_name, name=f"bn{i + 1}")(x)
      x = nn.relu(x)
    feat = L.global_avg_pool(x)
    logits = L.linear(self.num_classes, fan_in=self.channels, name="fc")(feat)
    return logits, feat


@register("byot")
class BYOTDistiller(Distiller):
  """BYOT exits and loss (params / state: one `BYOTBranch` per exit).

  Args:
    alpha: KD weight; the exits' CE weight is `1 - alpha` (and the
      objective's `ce_weight` must be `1 - alpha` too). 0.1.
    temperature: `T` (3).
    beta: feature-loss weight (1e-6).
    feature_key: the stage list (`'stages'`).
    layers: the stages that get an exit (`'1:-1'`: all after the stem but
      the last).
    deep_feature_key: the deepest feature (`'pooled'`; a 4-D entry is
      average-pooled).
  """
  needs_teacher = False

  def __init__(self, *, alpha: float = 0.1, temperature: float = 3.0,
               beta: float = 1e-6, feature_key: str = "stages",
               layers="1:-1", deep_feature_key: str = "pooled"):
    if not 0.0 <= float(alpha) <= 1.0:
      raise ValueError(f"byot: `alpha` must be in [0, 1]; got {alpha!r}.")
    if not float(temperature) > 0:
      raise ValueError(f"byot: `temperature` must be > 0; got "
                       f"{temperature!r}.")
    if not float(beta) >= 0:
      raise ValueError(f"byot: `beta` must be >= 0; got {beta!r}.")
    self.alpha = float(alpha)
    self.temperature = float(temperature)
    self.beta = float(beta)
    self.feature_key = feature_key
    self.layers = layers
    self.deep_feature_key = deep_feature_key

  # -- features ------------------------------------------------------------

  def _features(self, student_features):
    """(exit inputs, kernels, deepest pooled feature [B, C_d])."""
    maps = select_features(student_features, self.feature_key, self.layers,
                           who="student", method=self.name)
    last = select_features(student_features, self.feature_key, -1,
                           who="student", method=self.name)[0]
    deep = select_features(student_features, self.deep_feature_key, None,
                           who="student", method=self.name)[0]
    if deep.ndim == 4:
      deep = L.global_avg_pool(deep)
    if last.ndim != 4 or deep.ndim != 2:
      raise ValueError(
          f"byot: needs NHWC stage maps and a [B, C] deepest feature; got "
          f"the last {self.feature_key!r} map {tuple(last.shape)} and "
          f"{self.deep_feature_key!r} {tuple(deep.shape)}.")
    if deep.shape[-1] < 4:
      raise ValueError(f"byot: the deepest feature needs >= 4 channels (the "
                       f"bottleneck has C/4); got {deep.shape[-1]}.")
    kernels = []
    for i, m in enumerate(maps):
      if m.ndim != 4:
        raise ValueError(f"byot: exit {i + 1} input must be an NHWC map; got "
                         f"shape {tuple(m.shape)}.")
      k, rem_h = divmod(m.shape[1], last.shape[1])
      kw, rem_w = divmod(m.shape[2], last.shape[2])
      if rem_h or rem_w or k != kw or k < 1:
        raise ValueError(
            f"byot: exit {i + 1}'s map {tuple(m.shape[1:3])} must be a square "
            f"integer multiple of the last stage's {tuple(last.shape[1:3])} "
            "(the bottleneck's strided conv maps one onto the other).")
      kernels.append(k)
    return maps, kernels, deep

  def _branch(self, deep, kernel, num_classes, axis_name):
    return BYOTBranch(deep.shape[-1], kernel, num_classes, axis_name)

  def _exits(self, params, state, student_features, num_classes, *, train,
             axis_name):
    """([(logits, feature)] per exit, new state, deepest feature)."""
    maps, kernels, deep = self._features(student_features)
    outs, new_state = [], {}
    for i, (m, k) in enumerate(zip(maps, kernels)):
      key = f"exit{i + 1}"
      if key not in params:
        raise ValueError(f"byot: no parameters for {key}; the distiller was "
                         f"initialized for {len(params)} exits.")
      out, new_state[key] = apply_module(
          self._branch(deep, k, num_classes, axis_name), params[key],
          state[key], m, train=train)
      outs.append(out)
    return outs, new_state, deep

  # -- protocol ------------------------------------------------------------

  def init(self, rng, inputs):
    maps, kernels, deep = self._features(inputs.student_features)
    num_classes = inputs.student_logits.shape[-1]
    params, state = {}, {}
    for i, (m, k) in enumerate(zip(maps, kernels)):
      p, s = init_module(self._branch(deep, k, num_classes, None),
                          jax.random.fold_in(rng, i), m)
      params[f"exit{i + 1}"], state[f"exit{i + 1}"] = p, s
    return params, state

  def __call__(self, params, state, inputs):
    z_deep = jax.lax.stop_gradient(jnp.asarray(inputs.student_logits,
                                               jnp.float32))
    outs, new_state, deep = self._exits(
        params, state, inputs.student_features, z_deep.shape[-1],
        train=inputs.train, axis_name=inputs.axis_name)
    f_deep = jax.lax.stop_gradient(jnp.asarray(deep, jnp.float32))
    n = jnp.float32(z_deep.shape[0])
    if inputs.axis_name is not None:  # the reference sums the whole batch
      n = n * jax.lax.psum(jnp.ones((), jnp.float32), inputs.axis_name)
    total = jnp.zeros((), jnp.float32)
    for z, f in outs:
      ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          z, inputs.labels))
      kd = jnp.mean(losses.soft_cross_entropy(z, z_deep,
                                              temperature=self.temperature))
      fe = jnp.mean(losses.byot_feature_loss(f, f_deep)) * n
      total = total + ((1.0 - self.alpha) * ce + self.alpha * kd
                       + self.beta * fe)
    return total, new_state

  # -- evaluation ----------------------------------------------------------

  def exit_logits(self, params, state, student_logits,
                  student_features) -> List[Any]:
    """Logits of every classifier in inference mode, shallow to deep: the
    `n` exits, then the student's own (`student_logits`)."""
    z = jnp.asarray(student_logits, jnp.float32)
    outs, _, _ = self._exits(params, state, student_features, z.shape[-1],
                             train=False, axis_name=None)
    return [o[0] for o in outs] + [z]

  def eval_sums(self, params, state, student_logits, student_features,
                labels, mask=None) -> Dict[str, Any]:
    """Masked *sums* of correct predictions per classifier (`top1_exit1` ..
    `top1_exit{n+1}`, the last one the student's own) and of the ensemble
    (`top1_ensemble`: mean of the classifiers' softmax probabilities); divide
    by the number of unmasked examples (sum over devices first)."""
    logits = self.exit_logits(params, state, student_logits,
                              student_features)
    m = (jnp.ones(labels.shape, jnp.float32) if mask is None
         else jnp.asarray(mask, jnp.float32))
    hit = lambda z: jnp.sum(  # noqa: E731
        (jnp.argmax(z, -1) == labels).astype(jnp.float32) * m)
    out = {f"top1_exit{i + 1}": hit(z) for i, z in enumerate(logits)}
    probs = sum(jax.nn.softmax(z, -1) for z in logits) / len(logits)
    out["top1_ensemble"] = hit(probs)
    return out


def make_exit_eval_step(student_apply, distiller: BYOTDistiller, *,
                        axis_name: Optional[str] = None,
                        image_key: str = "image", label_key: str = "label",
                        mask_key: str = "mask",
                        preprocess: Optional[Callable] = None):
  """`eval_step(variables, distiller_params, distiller_state, batch) ->
  metrics`: every BYOT classifier's top-1 (`top1_exit1..`, the last the
  student's own, equal to `make_eval_step`'s `top1`), the ensemble's
  (`top1_ensemble`) and `count`, averaged over the unmasked examples
  (summed over `axis_name` first). Combine batches with `count` weights.

  `variables` is the student's Flax variables or a `TrainState`;
  `distiller_params` / `distiller_state` the BYOT term's
  (`state.distiller_params[label]`, `state.distiller_state[label]`).
  """
  apply = _steps.as_student_apply(student_apply)

  def eval_step(variables, distiller_params, distiller_state, batch):
    if isinstance(variables, _state.TrainState):
      variables = variables.variables
    if preprocess is not None:
      batch = preprocess(batch)
    logits, feats, _ = _steps._split_student_out(  # pylint: disable=protected-access
        apply(variables, batch[image_key], train=False))
    labels = batch[label_key]
    mask = batch.get(mask_key)
    m = (jnp.ones(labels.shape, jnp.float32) if mask is None
         else mask.astype(jnp.float32))
    sums = distiller.eval_sums(distiller_params, distiller_state, logits,
                               feats, labels, m)
    sums["count"] = jnp.sum(m)
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    denom = jnp.maximum(sums["count"], 1.0)
    return {k: (v if k == "count" else v / denom) for k, v in sums.items()}

  return eval_step


def exit_names(num_exits: int) -> Tuple[str, ...]:
  """Metric names of `eval_sums` for `num_exits` shallow exits."""
  return tuple(f"top1_exit{i + 1}" for i in range(num_exits + 1)) + (
      "top1_ensemble",)
