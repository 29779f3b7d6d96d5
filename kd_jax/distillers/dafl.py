r"""DAFL: data-free learning of student networks with a generator.

A generator :math:`G` maps noise :math:`z \sim \mathcal{N}(0, I)` to images
on which the frozen teacher :math:`T` is confident, active and
class-balanced; the student :math:`S` is distilled on those images only:

.. math::
  \mathcal{L}_G &= w_{oh}\,\overline{\ell_{oh}}(T(G(z)))
      + w_{ie}\,\ell_{ie}(T(G(z))) + w_a\,\overline{\ell_a}(f_T(G(z))) \\
  \mathcal{L}_S &= \overline{\mathrm{KL}}\big(\sigma(T(x)) \,\|\,
      \sigma(S(x))\big), \quad x = \mathrm{sg}(G(z))

(`kd_jax.losses.dafl_one_hot_loss`, `dafl_information_entropy_loss` --
log base 10 as the code --, `dafl_activation_loss` on the teacher's
penultimate feature :math:`f_T`, and `kd_loss(..., temperature=1)`). As in
the authors' `DAFL-train.py`, *one* noise batch per step feeds both losses,
the total `L_G + L_S` is differentiated once (the student sees detached
images and teacher logits, so :math:`G` gets no gradient from
:math:`\mathcal{L}_S` and :math:`S` none from :math:`\mathcal{L}_G`), and
both optimizers step: `make_dafl_step` does exactly that in one compiled
program. The generator is always in training mode (BatchNorm with batch
statistics), as in the authors' code, which never calls `generator.eval()`.

MNIST recipe (the code's defaults, the paper's Table 1): LeNet-5 teacher on
32x32 MNIST, LeNet-5-half student, batch 512, 120 iterations per "epoch",
200 epochs, Adam lr 0.2 for G and 2e-3 for S (betas (0.9, 0.999)), latent
dimension 100, weights :math:`w_{oh} = 1, w_{ie} = 5, w_a = 0.1`. CIFAR:
latent 1000, batch 1024, lr_G 0.02, SGD lr_S 0.1 (momentum 0.9, weight
decay 5e-4, /10 at epochs 800 and 1600 of 2000), weights (0.05, 5, 0.01) on
CIFAR-10 and (0.5, 20, 0.1) on CIFAR-100.

The generator (`Generator`) is the authors' (DCGAN-like): Linear(latent,
128 (s/4)^2) -> BN(128) -> 2x nearest upsampling -> Conv3x3(128) ->
BN(128, eps=0.8) -> LeakyReLU(0.2) -> 2x upsampling -> Conv3x3(64) ->
BN(64, eps=0.8) -> LeakyReLU(0.2) -> Conv3x3(C) -> tanh -> BN(C, no affine).
`nn.BatchNorm2d(128, 0.8)` sets *eps* = 0.8 (its second positional
argument), kept here; PyTorch's default initialization.

References:
  Chen, Wang, Xu, Yang, Liu, Shi, Xu, Xu & Tian, "Data-Free Learning of
  Student Networks", ICCV 2019. Authors' code: github.com/huawei-noah/
  Efficient-Computing, `Data-Efficient-Model-Compression/DAFL/`
  (`DAFL-train.py`, `lenet.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax import losses
from kd_jax.models import layers as L
from kd_jax.train import state as state_lib
from kd_jax.train import steps as steps_lib

PyTree = Any

__all__ = ["Generator", "DAFLConfig", "DAFLState", "DAFLTask",
           "init_dafl_state", "make_dafl_step", "generator_losses",
           "generate"]


class Generator(nn.Module):
  """DAFL's generator: `z [B, latent] -> images [B, img_size, img_size, C]`.

  Call with `train=True` (batch statistics; `mutable=['batch_stats']`), as
  the authors always do.
  """
  img_size: int = 32
  channels: int = 1
  latent_dim: int = 100
  dtype: Any = jnp.float32          # computation dtype (params are float32)

  @nn.compact
  def __call__(self, z, train: bool = True):
    if self.img_size % 4:
      raise ValueError(f"Generator: `img_size` must be a multiple of 4; got "
                       f"{self.img_size}.")
    if z.ndim != 2 or z.shape[-1] != self.latent_dim:
      raise ValueError(f"Generator expects noise [B, {self.latent_dim}]; got "
                       f"{tuple(z.shape)}.")
    s = self.img_size // 4
    bn = lambda eps, name, affine=True: nn.BatchNorm(  # noqa: E731
        use_running_average=not train, momentum=0.9, epsilon=eps,
        use_scale=affine, use_bias=affine, name=name)
    up = lambda x: jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # noqa: E731
    x = L.linear(128 * s * s, fan_in=self.latent_dim, dtype=self.dtype,
                 name="l1")(z)
    x = x.reshape(z.shape[0], 128, s, s).transpose(0, 2, 3, 1)  # torch .view
    x = up(bn(1e-5, "bn0")(x))
    x = L.torch_conv(128, 3, padding=1, fan_in=128 * 9, canonical=True,
                     name="conv1")(x)
    x = up(nn.leaky_relu(bn(0.8, "bn1")(x), 0.2))
    x = L.torch_conv(64, 3, padding=1, fan_in=128 * 9, canonical=True,
                     name="conv2")(x)
    x = nn.leaky_relu(bn(0.8, "bn2")(x), 0.2)
    x = L.torch_conv(self.channels, 3, padding=1, fan_in=64 * 9,
                     canonical=True, name="conv3")(x)
    return bn(1e-5, "bn3", affine=False)(jnp.tanh(x))


@dataclasses.dataclass(frozen=True)
class DAFLConfig:
  """DAFL hyperparameters (defaults: the authors' MNIST command)."""
  batch_size: int = 512
  latent_dim: int = 100
  img_size: int = 32
  channels: int = 1
  one_hot_weight: float = 1.0       # --oh
  entropy_weight: float = 5.0       # --ie
  activation_weight: float = 0.1    # --a
  entropy_log_base: float = 10.0    # torch.log10 in the code
  kd_temperature: float = 1.0       # kdloss: plain softmax / log_softmax
  feature_key: str = "pooled"       # the teacher feature of L_a

  def __post_init__(self):
    for name in ("batch_size", "latent_dim", "img_size", "channels"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"DAFLConfig.{name} must be a positive int; got {v!r}.")
    for name in ("one_hot_weight", "entropy_weight", "activation_weight"):
      if getattr(self, name) < 0:
        raise ValueError(f"DAFLConfig.{name} must be >= 0.")
    if self.kd_temperature <= 0:
      raise ValueError("DAFLConfig.kd_temperature must be > 0.")


class DAFLState(flax.struct.PyTreeNode):
  """The combined state: the generator's and the student's `TrainState`s.

  `generator.rng` draws the noise (`fold_in(rng, step)`), `student.rng` the
  student's dropout; both step counters advance together.
  """
  generator: state_lib.TrainState
  student: state_lib.TrainState

  @property
  def step(self):
    return self.student.step


def init_dafl_state(rng, generator: nn.Module, student_init: Callable,
                    gen_tx: optax.GradientTransformation,
                    student_tx: optax.GradientTransformation,
                    cfg: DAFLConfig) -> DAFLState:
  """`student_init(rng) -> variables` builds the student's variables."""
  kg, ks, kn, kd = jax.random.split(rng, 4)
  gv = generator.init(kg, jnp.zeros((2, cfg.latent_dim)), train=True)
  gen = state_lib.create_train_state(gv, gen_tx, rng=kn)
  stu = state_lib.create_train_state(student_init(ks), student_tx, rng=kd)
  return DAFLState(generator=gen, student=stu)


def generator_losses(teacher_logits, teacher_feature, cfg: DAFLConfig,
                     axis_name: Optional[str] = None):
  """`(L_G, {'one_hot', 'entropy', 'activation'})` of one generated batch."""
  oh = jnp.mean(losses.dafl_one_hot_loss(teacher_logits))
  ie = losses.dafl_information_entropy_loss(
      teacher_logits, log_base=cfg.entropy_log_base, axis_name=axis_name)
  act = jnp.mean(losses.dafl_activation_loss(teacher_feature))
  if axis_name is not None:
    oh, act = jax.lax.pmean((oh, act), axis_name)
  total = (cfg.one_hot_weight * oh + cfg.entropy_weight * ie
           + cfg.activation_weight * act)
  return total, {"one_hot": oh, "entropy": ie, "activation": act}


def _f32(x):
  """float32 (float64 stays float64 under x64): losses in full precision."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _select(feats, key):
  if isinstance(feats, dict):
    if key not in feats:
      raise KeyError(f"DAFL: the teacher's features have no {key!r}; they "
                     f"have {sorted(feats)} (set DAFLConfig.feature_key).")
    return feats[key]
  return feats


def _student_logits(student_apply, params, batch_stats, x, rng):
  out = student_apply(state_lib.student_variables(params, batch_stats), x,
                      train=True, rngs={"dropout": rng})
  if isinstance(out[0], (tuple, list)):
    (logits, _), updates = out
    return _f32(logits), dict(updates)
  return _f32(out[0]), {}


def _update(tx, st, grads, axis_name):
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
  tr = st.trainable()
  upd, opt_state = tx.update({"student": grads, "distiller": {}},
                             st.opt_state, tr)
  tr = optax.apply_updates(tr, upd)
  return st.replace(step=st.step + 1, params=tr["student"], opt_state=opt_state)


def make_dafl_step(generator: nn.Module, teacher_apply, student_apply,
                   gen_tx: optax.GradientTransformation,
                   student_tx: optax.GradientTransformation, cfg: DAFLConfig,
                   *, axis_name: Optional[str] = None):
  """`step(state, teacher_variables, batch=None) -> (state, metrics)`.

  One compiled program: noise -> generator (train mode) -> frozen teacher
  (inference mode, differentiated w.r.t. the images) -> generator update;
  student on the detached images -> KD at `cfg.kd_temperature` -> student
  update. `batch` is ignored (the noise comes from the state). Under `pmap`
  pass `axis_name`: gradients, metrics, the generator's BN statistics and
  the entropy loss's mean prediction are averaged over devices (each device
  normalizes its generator BatchNorms with its own batch, as the authors'
  `nn.DataParallel`); every device then needs its own noise, so give the
  replicas different `generator.rng` keys or fold in the device index.
  Metrics: `one_hot`, `entropy`, `activation`, `generator_loss`, `kd`,
  `agreement` (student argmax == teacher argmax on the generated batch).
  """
  teacher_apply = steps_lib.as_teacher_apply(teacher_apply)
  student_apply = steps_lib.as_student_apply(student_apply)

  def step(state: DAFLState, teacher_variables, batch=None):
    del batch
    gen, stu = state.generator, state.student
    key = jax.random.fold_in(gen.rng, gen.step)
    if axis_name is not None:
      key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    z = jax.random.normal(key, (cfg.batch_size, cfg.latent_dim))

    def g_loss(params):
      imgs, upd = generator.apply({"params": params,
                                   "batch_stats": gen.batch_stats}, z,
                                  train=True, mutable=["batch_stats"])
      t_logits, t_feats = teacher_apply(teacher_variables, imgs)
      t_logits = _f32(t_logits)
      total, parts = generator_losses(
          t_logits, _select(t_feats, cfg.feature_key), cfg, axis_name)
      return total, (imgs, t_logits, upd["batch_stats"], parts)

    (g_total, (imgs, t_logits, g_stats, parts)), g_grads = jax.value_and_grad(
        g_loss, has_aux=True)(gen.params)
    imgs, t_logits = jax.lax.stop_gradient((imgs, t_logits))

    def s_loss(params):
      logits, upd = _student_logits(student_apply, params, stu.batch_stats,
                                    imgs, jax.random.fold_in(stu.rng, stu.step))
      kd = jnp.mean(losses.kd_loss(logits, t_logits,
                                   temperature=cfg.kd_temperature))
      return kd, (logits, upd)

    (kd, (s_logits, s_upd)), s_grads = jax.value_and_grad(
        s_loss, has_aux=True)(stu.params)
    if axis_name is not None:
      g_stats = jax.lax.pmean(g_stats, axis_name)
    gen = _update(gen_tx, gen, g_grads, axis_name).replace(batch_stats=g_stats)
    stu = _update(student_tx, stu, s_grads, axis_name)
    if "batch_stats" in s_upd:
      bs = s_upd["batch_stats"]
      stu = stu.replace(batch_stats=bs if axis_name is None
                        else jax.lax.pmean(bs, axis_name))
    agree = jnp.mean((jnp.argmax(s_logits, -1) == jnp.argmax(t_logits, -1))
                     .astype(jnp.float32))
    metrics = {**parts, "generator_loss": g_total, "kd": kd,
               "agreement": agree}
    if axis_name is not None:
      metrics = jax.lax.pmean(metrics, axis_name)
    return DAFLState(generator=gen, student=stu), metrics

  return step


def generate(generator: nn.Module, state: DAFLState, rng, n: int,
             latent_dim: int):
  """`n` images from the current generator (train-mode BatchNorm, as in
  training; the running statistics are not changed)."""
  z = jax.random.normal(rng, (n, latent_dim))
  imgs, _ = generator.apply(
      {"params": state.generator.params,
       "batch_stats": state.generator.batch_stats}, z, train=True,
      mutable=["batch_stats"])
  return imgs


@dataclasses.dataclass
class DAFLTask:
  """DAFL as a task of a training loop (the protocol the trainer wraps).

  * `init_state(rng) -> DAFLState`
  * `train_step(state, teacher_variables, batch) -> (state, metrics)` (pure;
    compile it, or scan it with `kd_jax.train.make_multi_step`)
  * `eval_step(state, batch) -> metrics` (the student on real test data:
    `loss`, `top1`, `top5`, `count`)
  * `batch(step) -> {'step': int32}`: DAFL reads no data; the entry only
    gives the loop something to stack into chunks.
  * `report_fields`: the train metrics.
  """
  generator: nn.Module
  teacher_apply: Any
  student: Any
  student_init: Callable
  gen_tx: optax.GradientTransformation
  student_tx: optax.GradientTransformation
  cfg: DAFLConfig = DAFLConfig()
  axis_name: Optional[str] = None

  report_fields = ("one_hot", "entropy", "activation", "generator_loss", "kd",
                   "agreement")

  def init_state(self, rng) -> DAFLState:
    return init_dafl_state(rng, self.generator, self.student_init,
                           self.gen_tx, self.student_tx, self.cfg)

  @property
  def train_step(self):
    return make_dafl_step(self.generator, self.teacher_apply, self.student,
                          self.gen_tx, self.student_tx, self.cfg,
                          axis_name=self.axis_name)

  @property
  def eval_step(self):
    inner = steps_lib.make_eval_step(self.student, axis_name=self.axis_name)
    return lambda state, batch: inner(state.student, batch)

  @staticmethod
  def batch(step: int) -> Dict[str, np.ndarray]:
    return {"step": np.asarray(step, np.int32)}
