r"""DeepInversion and Adaptive DeepInversion: images synthesized from a teacher.

A batch of images :math:`\hat x` (initialized with noise) is optimized so
that the frozen teacher classifies it as chosen targets :math:`y` *and* the
statistics of every BatchNorm layer's input match that layer's running
statistics:

.. math::
  \min_{\hat x}\; w_{ce}\,\mathrm{CE}(T(\tilde x), y)
    + w_{bn} \sum_l m_l\, \mathcal{R}_{feature}^{(l)}(\tilde x)
    + w_{tv2}\,\mathcal{R}_{TV}^{\ell_2}(\tilde x)
    + w_{tv1}\,\mathcal{R}_{TV}^{\ell_1}(\tilde x)
    + w_{\ell_2}\,\overline{\|\tilde x\|_2}
    + w_{adi}\,\mathcal{R}_{compete}(S(\tilde x), T(\tilde x))

where :math:`\tilde x` is :math:`\hat x` randomly shifted by up to `jitter`
pixels (`torch.roll`, wrapping) and, optionally, flipped; :math:`m_1` =
`first_bn_multiplier`, :math:`m_{l>1} = 1`. The pieces are the pure losses
`kd_jax.losses.bn_statistics_loss`, `image_total_variation`,
`image_l2_norm` and `adi_competition_loss` (Adaptive DeepInversion, which
makes the images ones the student :math:`S` gets wrong). Adam updates the
pixels; the batch with the lowest loss seen is kept (`best_images`).

The BatchNorm inputs are read with `nn.intercept_methods` around the
teacher's forward (the Flax counterpart of the authors' forward hooks on
`nn.BatchNorm2d`): any Flax model with `nn.BatchNorm` layers works
unchanged, e.g. the zoo's CIFAR ResNets. `spatial_only=True` (default)
keeps the layers whose input is a 4-D map, like the hooks on
`nn.BatchNorm2d` only.

Authors' settings. CIFAR-10 (`cifar10/deepinversion_cifar10.py`, its
README's paper parameters): batch 256, 2000 iterations, Adam lr 0.05
(betas 0.9, 0.999), BN weight 10, TV-l2 2.5e-5, l2 0, jitter 2, no flip, no
clipping, targets `[0..9] * 25 + [0..5]`; ADI competition weight
`--cig_scale` (temperature 3). ImageNet (`imagenet_inversion.py`,
`deepinversion.py`): BN weight 0.01, first-BN multiplier 10, TV-l2 1e-4,
l2 1e-5, lr 0.25 (betas 0.5, 0.9) with a cosine schedule, jitter 30, flip,
pixels clipped to the normalized [0, 1] range, 2k + 1k iterations.

References:
  Yin, Molchanov, Li, Alvarez, Mallya, Hoiem, Jha & Kautz, "Dreaming to
  Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020.
  Authors' code: github.com/NVlabs/DeepInversion (`deepinversion.py`,
  `cifar10/deepinversion_cifar10.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from kd_jax import losses
from kd_jax.train import steps as steps_lib

PyTree = Any

__all__ = ["DeepInversionConfig", "InversionState", "bn_statistics",
           "inversion_loss", "init_inversion", "make_inversion_step",
           "synthesize", "cycling_targets", "evaluate_images",
           "inversion_checkpoint_tree", "inversion_from_tree"]


@dataclasses.dataclass(frozen=True)
class DeepInversionConfig:
  """Loss weights and augmentation (defaults: the CIFAR-10 paper settings)."""
  bn_weight: float = 10.0             # --r_feature_weight
  first_bn_multiplier: float = 1.0    # ImageNet: 10
  tv_l2_weight: float = 2.5e-5        # --di_var_scale
  tv_l1_weight: float = 0.0
  l2_weight: float = 0.0              # --di_l2_scale
  ce_weight: float = 1.0              # main_loss_multiplier
  adi_weight: float = 0.0             # --cig_scale (Adaptive DeepInversion)
  adi_temperature: float = 3.0
  jitter: int = 2
  flip: bool = False
  clip_range: Optional[Tuple[Sequence[float], Sequence[float]]] = None
  spatial_only: bool = True

  def __post_init__(self):
    for f in ("bn_weight", "first_bn_multiplier", "tv_l2_weight",
              "tv_l1_weight", "l2_weight", "ce_weight", "adi_weight"):
      if getattr(self, f) < 0:
        raise ValueError(f"DeepInversionConfig.{f} must be >= 0; got "
                         f"{getattr(self, f)}.")
    if not isinstance(self.jitter, int) or self.jitter < 0:
      raise ValueError(f"DeepInversionConfig.jitter must be an int >= 0; got "
                       f"{self.jitter!r}.")


class InversionState(flax.struct.PyTreeNode):
  """The optimized pixels, their Adam state and the best batch so far."""
  images: jax.Array
  opt_state: PyTree
  step: jax.Array
  rng: jax.Array
  best_images: jax.Array
  best_loss: jax.Array


def bn_statistics(teacher_apply: Callable, teacher_variables, x, *,
                  spatial_only: bool = True,
                  paths_out: Optional[list] = None):
  """Teacher forward that also returns every BatchNorm layer's input.

  Returns `(logits, [(bn_input, running_mean, running_var), ...])` in call
  order; if a list `paths_out` is given, the layers' module paths
  (`'layer1_0/bn1'`) are appended to it (at trace time). `teacher_apply(
  variables, x)` must run Flax `nn.BatchNorm` modules (inference mode: their
  running statistics are read from the variables).
  """
  records: List[tuple] = []

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if isinstance(mod, nn.BatchNorm) and context.method_name == "__call__":
      inp = args[0]
      if not spatial_only or inp.ndim == 4:
        records.append((inp, mod.get_variable("batch_stats", "mean"),
                        mod.get_variable("batch_stats", "var")))
        if paths_out is not None:
          paths_out.append("/".join(mod.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    logits, _ = steps_lib.as_teacher_apply(teacher_apply)(teacher_variables, x)
  return logits, records


def _f32(x):
  """float32 (float64 stays float64 under x64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def cycling_targets(batch_size: int, num_classes: int) -> jax.Array:
  """`[0, 1, ..., K-1, 0, 1, ...]`: the CIFAR script's targets."""
  return jnp.arange(batch_size, dtype=jnp.int32) % num_classes


def _jitter(rng, x, cfg: DeepInversionConfig):
  k1, k2, k3 = jax.random.split(rng, 3)
  if cfg.jitter:
    off = jax.random.randint(k1, (2,), -cfg.jitter, cfg.jitter + 1)
    x = jnp.roll(x, (off[0], off[1]), axis=(1, 2))
  if cfg.flip:
    x = jnp.where(jax.random.bernoulli(k2), x[:, :, ::-1, :], x)
  del k3
  return x


def inversion_loss(x, targets, teacher_apply, teacher_variables,
                   cfg: DeepInversionConfig, student_apply=None,
                   student_variables=None):
  """`(total, metrics)` of the (already jittered) batch `x`."""
  logits, records = bn_statistics(teacher_apply, teacher_variables, x,
                                  spatial_only=cfg.spatial_only)
  if not records and cfg.bn_weight:
    raise ValueError("DeepInversion: the teacher has no BatchNorm layer (with "
                     "a 4-D input) to match; set bn_weight=0 or use a "
                     "BN-equipped teacher.")
  logits = _f32(logits)
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits,
                                                                targets))
  bn = sum((cfg.first_bn_multiplier if i == 0 else 1.0)
           * losses.bn_statistics_loss(inp, rm, rv)
           for i, (inp, rm, rv) in enumerate(records)) if records else 0.0
  tv2 = losses.image_total_variation(x, kind="l2")
  tv1 = losses.image_total_variation(x, kind="l1")
  l2 = jnp.mean(losses.image_l2_norm(x))
  total = (cfg.ce_weight * ce + cfg.bn_weight * bn + cfg.tv_l2_weight * tv2
           + cfg.tv_l1_weight * tv1 + cfg.l2_weight * l2)
  metrics = {"ce": ce, "bn": jnp.asarray(bn, ce.dtype), "tv_l2": tv2,
             "tv_l1": tv1, "l2": l2,
             "teacher_top1": jnp.mean((jnp.argmax(logits, -1) == targets)
                                      .astype(jnp.float32))}
  if cfg.adi_weight:
    if student_apply is None:
      raise ValueError("DeepInversion: adi_weight > 0 needs a student.")
    s_logits, _ = steps_lib.as_teacher_apply(student_apply)(student_variables,
                                                            x)
    comp = losses.adi_competition_loss(_f32(s_logits), logits,
                                       temperature=cfg.adi_temperature)
    total = total + cfg.adi_weight * comp
    metrics["competition"] = comp
  metrics["loss"] = total
  return total, metrics


def evaluate_images(images, targets, teacher_apply, teacher_variables,
                    cfg: DeepInversionConfig, student_apply=None,
                    student_variables=None):
  """The loss terms and accuracies of the (un-jittered) batch `images`:
  `inversion_loss`'s metrics (``teacher_top1``: the teacher's top-1 against
  `targets`; ``competition`` with ADI) plus ``student_top1`` when a student
  is given (what ADI drives down)."""
  _, m = inversion_loss(images, targets, teacher_apply, teacher_variables,
                        cfg, student_apply, student_variables)
  if student_apply is not None:
    s_logits, _ = steps_lib.as_teacher_apply(student_apply)(student_variables,
                                                            images)
    m["student_top1"] = jnp.mean((jnp.argmax(s_logits, -1) == targets)
                                 .astype(jnp.float32))
  return m


def inversion_checkpoint_tree(state: InversionState) -> dict:
  """The saved tree of a state: its fields, the PRNG key as key data."""
  tree = {f: getattr(state, f) for f in ("images", "opt_state", "step",
                                         "best_images", "best_loss")}
  tree["rng"] = jax.random.key_data(state.rng)
  return tree


def inversion_from_tree(tree, impl) -> InversionState:
  """Inverse of `inversion_checkpoint_tree` (`impl`: the key's
  `jax.random.key_impl`)."""
  d = dict(tree)
  d["rng"] = jax.random.wrap_key_data(jnp.asarray(d["rng"]), impl=impl)
  return InversionState(**d)


def init_inversion(rng, shape, tx: optax.GradientTransformation,
                   dtype=jnp.float32) -> InversionState:
  """Gaussian-noise images of `shape` `[B, H, W, C]` (`torch.randn`)."""
  k_init, k_run = jax.random.split(rng)
  x = jax.random.normal(k_init, tuple(shape), dtype)
  return InversionState(images=x, opt_state=tx.init(x),
                        step=jnp.zeros((), jnp.int32), rng=k_run,
                        best_images=x, best_loss=jnp.asarray(jnp.inf, dtype))


def make_inversion_step(teacher_apply, cfg: DeepInversionConfig,
                        tx: optax.GradientTransformation, *,
                        student_apply=None):
  """`step(state, targets, teacher_variables, student_variables=None) ->
  (state, metrics)`: one Adam step on the pixels (compile it)."""
  if cfg.adi_weight and student_apply is None:
    raise ValueError("DeepInversion: adi_weight > 0 needs `student_apply`.")
  lo_hi = None
  if cfg.clip_range is not None:
    lo_hi = tuple(jnp.asarray(v, jnp.float32) for v in cfg.clip_range)

  def step(state: InversionState, targets, teacher_variables,
           student_variables=None):
    key = jax.random.fold_in(state.rng, state.step)

    def loss_fn(x):
      return inversion_loss(_jitter(key, x, cfg), targets, teacher_apply,
                            teacher_variables, cfg, student_apply,
                            student_variables)

    (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(
        state.images)
    upd, opt_state = tx.update(g, state.opt_state, state.images)
    x = optax.apply_updates(state.images, upd)
    if lo_hi is not None:
      x = jnp.clip(x, lo_hi[0], lo_hi[1])
    # `best_images` are the images the lowest loss was computed on. (The
    # ImageNet script clones the *post*-update pixels next to the pre-update
    # loss; the CIFAR script's `best_inputs = inputs.data` aliases the live
    # tensor, i.e. always returns the last images.)
    better = loss < state.best_loss
    best = jnp.where(better, state.images, state.best_images)
    new = state.replace(images=x, opt_state=opt_state, step=state.step + 1,
                        best_images=best,
                        best_loss=jnp.where(better, loss, state.best_loss))
    return new, metrics

  return step


def synthesize(rng, teacher_apply, teacher_variables, *, shape, targets,
               cfg: DeepInversionConfig = DeepInversionConfig(),
               iterations: int = 2000, lr: float = 0.05,
               tx: Optional[optax.GradientTransformation] = None,
               student_apply=None, student_variables=None,
               log_every: int = 0, log: Callable[[str], None] = print):
  """Runs `iterations` inversion steps; returns `(best_images, metrics)`
  (the last step's metrics, as floats)."""
  tx = tx or optax.adam(lr)
  state = init_inversion(rng, shape, tx)
  step = jax.jit(make_inversion_step(teacher_apply, cfg, tx,
                                     student_apply=student_apply))
  metrics = {}
  for i in range(iterations):
    state, metrics = step(state, targets, teacher_variables, student_variables)
    if log_every and (i % log_every == 0 or i == iterations - 1):
      m = {k: round(float(v), 4) for k, v in metrics.items()}
      log(f"it {i}: {m}")
  return state.best_images, {k: float(v) for k, v in metrics.items()}
