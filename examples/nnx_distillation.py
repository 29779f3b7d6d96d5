r"""kd_jax losses inside Flax NNX code: ``nnx.Optimizer`` + ``nnx.jit`` steps.

kd_jax's losses are pure functions of arrays, so an NNX train step calls them
exactly as a Linen/optax step does. Three steps, each a complete recipe:

* `kd_step`: a response-based loss on a classifier (Hinton's KD + CE, the
  README's Linen/optax snippet in NNX): the teacher is an NNX module that is
  *not* in the optimizer, so it stays frozen;
* `lm_fused_step`: token-level distillation of a language model without
  ``[B, T, V]`` logits: `kd_jax.losses.fused_head_divergence` takes the
  student's final hidden states and its head kernel (an ``nnx.Param``) and
  returns per-token forward KL and CE; its custom VJP sends the gradients
  back to both;
* `bridged_kd_step`: a model of kd_jax's Linen zoo (``kd_jax.models``)
  used as an NNX module through ``flax.nnx.bridge.ToNNX``.

Run ``python examples/nnx_distillation.py`` for a few steps of each.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kd_jax import losses


class MLP(nnx.Module):
  """``din -> hidden -> dout`` with ReLU."""

  def __init__(self, din: int, hidden: int, dout: int, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(din, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, dout, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


@nnx.jit(static_argnames=("temperature", "ce_weight", "kd_weight"))
def kd_step(student, teacher, optimizer, x, y, *, temperature=4.0,
            ce_weight=0.1, kd_weight=0.9):
  """One step of ``ce_weight * CE + kd_weight * kd_loss`` (mdistiller's
  weights by default); returns the batch-mean loss."""
  teacher_logits = teacher(x)  # a constant: no gradient is taken w.r.t. it

  def loss_fn(student):
    logits = student(x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    kd = losses.kd_loss(logits, teacher_logits, temperature=temperature)
    return jnp.mean(ce_weight * ce + kd_weight * kd)  # per example -> mean

  loss, grads = nnx.value_and_grad(loss_fn)(student)
  optimizer.update(student, grads)  # flax >= 0.11: (model, grads)
  return loss


class TinyLM(nnx.Module):
  """Embedding -> one ReLU MLP block (residual) -> head; ``hidden(tokens)``
  gives the head's inputs ``[B, T, D]``, ``head.kernel`` is ``[D, V]``."""

  def __init__(self, vocab: int, width: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.block = nnx.Linear(width, width, rngs=rngs)
    self.head = nnx.Linear(width, vocab, use_bias=False, rngs=rngs)

  def hidden(self, tokens):
    h = self.embed(tokens)
    return h + nnx.relu(self.block(h))

  def __call__(self, tokens):
    return self.head(self.hidden(tokens))


@nnx.jit(static_argnames=("temperature", "kd_weight", "chunk_size"))
def lm_fused_step(student, teacher, optimizer, tokens, mask, *,
                  temperature=1.0, kd_weight=0.5, chunk_size=16):
  """Teacher-forced token KD, ``(1 - kd_weight) NLL + kd_weight KL`` per
  trained target (``mask[:, 1:]``), from hidden states + head kernels."""
  inputs, targets, where = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
  t_hidden = teacher.hidden(inputs)
  t_kernel = teacher.head.kernel[...]

  def loss_fn(student):
    kd, ce = losses.fused_head_divergence(
        student.hidden(inputs), student.head.kernel[...], t_hidden, t_kernel,
        divergence="forward_kl", temperature=temperature, where=where,
        labels=targets, chunk_size=chunk_size)  # [B, T] each
    n = jnp.maximum(jnp.sum(where), 1)
    return jnp.sum((1 - kd_weight) * ce + kd_weight * kd) / n

  loss, grads = nnx.value_and_grad(loss_fn)(student)
  optimizer.update(student, grads)
  return loss


def bridge_zoo_model(name: str, x, *, num_classes: int = 10, seed: int = 0):
  """A kd_jax zoo model (Linen, returns ``(logits, features)``) as an
  initialized NNX module (``nnx.bridge.ToNNX`` + ``lazy_init``)."""
  from kd_jax import models  # pylint: disable=g-import-not-at-top
  linen = models.create(name, num_classes=num_classes)
  module = nnx.bridge.ToNNX(linen, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
  return nnx.bridge.lazy_init(module, x, train=False)


@nnx.jit(static_argnames=("temperature",))
def bridged_kd_step(student, teacher, optimizer, x, y, *, temperature=4.0):
  """`kd_step` for bridged zoo models (their outputs are ``(logits,
  features)``; the student runs with ``train=True``: dropout)."""
  teacher_logits, _ = teacher(x, train=False)

  def loss_fn(student):
    logits, _ = student(x, train=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    kd = losses.kd_loss(logits, teacher_logits, temperature=temperature)
    return jnp.mean(0.1 * ce + 0.9 * kd)

  loss, grads = nnx.value_and_grad(loss_fn)(student)
  optimizer.update(student, grads)
  return loss


def linen_variables(module) -> dict:
  """The Linen variables (``{'params': ...}``) of a bridged module, to call
  the same zoo model with ``linen_module.apply``."""
  return {"params": nnx.state(module, nnx.Param).to_pure_dict()}


def _demo():
  rngs = nnx.Rngs(0)
  x = jax.random.normal(jax.random.key(1), (64, 16))
  y = jax.random.randint(jax.random.key(2), (64,), 0, 5)
  teacher, student = MLP(16, 64, 5, rngs=rngs), MLP(16, 8, 5, rngs=rngs)
  opt = nnx.Optimizer(student, optax.adam(1e-2), wrt=nnx.Param)
  print("kd_step:", [float(kd_step(student, teacher, opt, x, y))
                     for _ in range(3)])
  tokens = jax.random.randint(jax.random.key(3), (4, 33), 0, 64)
  mask = jnp.ones(tokens.shape, bool)
  t_lm, s_lm = TinyLM(64, 32, rngs=rngs), TinyLM(64, 8, rngs=rngs)
  opt = nnx.Optimizer(s_lm, optax.adam(1e-2), wrt=nnx.Param)
  print("lm_fused_step:", [float(lm_fused_step(s_lm, t_lm, opt, tokens, mask))
                           for _ in range(3)])
  images = jax.random.uniform(jax.random.key(4), (8, 28, 28, 1))
  labels = jax.random.randint(jax.random.key(5), (8,), 0, 10)
  t_zoo = bridge_zoo_model("mlp_teacher", images)
  s_zoo = bridge_zoo_model("mlp_student", images, seed=1)
  opt = nnx.Optimizer(s_zoo, optax.adam(1e-3), wrt=nnx.Param)
  print("bridged_kd_step:", [float(bridged_kd_step(s_zoo, t_zoo, opt, images,
                                                   labels)) for _ in range(3)])


if __name__ == "__main__":
  _demo()
