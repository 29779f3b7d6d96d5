r"""A kd_jax loss inside EasyDeL's distillation step and trainer (``easydel``).

EasyDeL (github.com/erfanzar/EasyDeL, ``easydel/trainers/
distillation_trainer``) compiles one pure step ``distillation_step(
student_state, batch, teacher_state, *static) -> (state, metrics)`` over its
`EasyDeLState` s, and its `DistillationTrainer` jits that function in
``configure_functions``. `kd_jax_distillation_step` is the same step --
the teacher's forward, EasyDeL's gradient accumulation (`minibatch_call`),
its update (`update_state_respectfully`) and metrics -- with the loss from
`kd_jax.losses`:

.. math::
  \mathcal L = \alpha\, s\, \overline{D(z^s, z^t; T)} + (1 - \alpha)\,
  \overline{\mathrm{CE}(z^s, y)}

(means over the trained tokens: ``completion_mask``, else
``attention_mask``, and ``labels != -100``; :math:`s = T^2` by default as in
EasyDeL's own loss). ``divergence`` is ``forward_kl`` (EasyDeL's own),
``reverse_kl``, ``js_divergence`` or ``total_variation``;
``fused_chunk_size`` computes it with `kd_jax.losses.fused_head_divergence`
from the two models' last hidden states and head kernels, never
materializing ``[B, T, V]`` logits (EasyDeL's ``logits_chunk_size`` is its
own chunked path). `KdJaxDistillationTrainer` is EasyDeL's trainer running
this step. Labels are taken as given (targets aligned with the logits: pass
``labels = input_ids`` shifted by one).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from easydel.infra.loss_utils import LossMetrics
from easydel.trainers.distillation_trainer import DistillationTrainer
from easydel.trainers.training_utils import make_assertions_and_get_sizes
from easydel.trainers.training_utils import minibatch_call
from easydel.trainers.training_utils import update_metrics
from easydel.trainers.training_utils import update_state_respectfully
from easydel.utils.compiling_utils import ejit
from eformer.escale import with_sharding_constraint

from kd_jax import losses

DIVERGENCES = {"forward_kl": losses.forward_kl, "reverse_kl": losses.reverse_kl,
               "js_divergence": losses.js_divergence,
               "total_variation": losses.total_variation}
_FUSED = {"forward_kl": "forward_kl", "reverse_kl": "reverse_kl",
          "js_divergence": "jsd", "total_variation": "tvd"}
_NOT_MODEL_INPUTS = ("labels", "completion_mask", "assistant_masks")


def _trained_mask(batch):
  mask = batch.get("completion_mask", batch.get("attention_mask"))
  labels = batch["labels"]
  valid = labels != -100
  return valid if mask is None else valid & mask.astype(bool)


def _model_kwargs(batch, **extra):
  kw = {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}
  kw.update(extra)
  return kw


def _head_kernel(module):
  """``[D, V]`` head kernel of an EasyDeL causal LM (tied: embedding^T)."""
  if getattr(module.config, "tie_word_embeddings", False):
    return module.model.embed_tokens.embedding[...].T
  return module.lm_head.kernel[...]


def _per_token(student, teacher, batch, where, targets, *, divergence,
               temperature, beta, fused_chunk_size):
  """(divergence, CE) per token ``[B, T]`` from the two modules."""
  kw = {"temperature": temperature}
  if divergence == "js_divergence":
    kw["beta"] = beta
  if fused_chunk_size:
    hs = student(**_model_kwargs(batch, apply_lm_head=False)).last_hidden_state
    ht = teacher(**_model_kwargs(batch, apply_lm_head=False)).last_hidden_state
    return losses.fused_head_divergence(
        hs, _head_kernel(student), jax.lax.stop_gradient(ht),
        jax.lax.stop_gradient(_head_kernel(teacher)),
        divergence=_FUSED[divergence], where=where, labels=targets,
        chunk_size=fused_chunk_size, **kw)
  zs = student(**_model_kwargs(batch)).logits
  zt = jax.lax.stop_gradient(teacher(**_model_kwargs(batch)).logits)
  kd = DIVERGENCES[divergence](zs, zt, where=where, **kw)
  ce = optax.softmax_cross_entropy_with_integer_labels(
      zs.astype(jnp.float32), targets)
  return kd, ce


def kd_jax_distillation_step(student_state, batch, teacher_state,
                             loss_config=None, learning_rate_fn=None,
                             partition_spec=None,
                             gradient_accumulation_steps: int = 1,
                             is_training: bool = True,
                             divergence: str = "forward_kl",
                             temperature: float = 4.0, alpha: float = 0.9,
                             beta: float = 0.5, kd_scale=None,
                             fused_chunk_size=None):
  """EasyDeL's ``distillation_step`` with a `kd_jax.losses` divergence (see
  the module docstring); returns ``(state, LossMetrics)`` when training,
  else the metrics."""
  if divergence not in DIVERGENCES:
    raise ValueError(f"divergence must be one of {tuple(DIVERGENCES)}, got "
                     f"{divergence!r}")
  scale = temperature ** 2 if kd_scale is None else kd_scale
  _, minibatch_size, partition_spec = make_assertions_and_get_sizes(
      batch=batch, gradient_accumulation_steps=gradient_accumulation_steps,
      batch_partition_spec=partition_spec)
  batch = with_sharding_constraint(arr=batch, sharding=partition_spec)

  def loss_fn(tree, minibatch):
    where = _trained_mask(minibatch)
    targets = jnp.where(minibatch["labels"] == -100, 0, minibatch["labels"])
    kd, ce = _per_token(
        student_state.merge(tree), teacher_state.model, minibatch, where,
        targets, divergence=divergence, temperature=temperature, beta=beta,
        fused_chunk_size=fused_chunk_size)
    n = jnp.maximum(jnp.sum(where), 1).astype(jnp.float32)
    kd_mean, ce_mean = jnp.sum(kd) / n, jnp.sum(ce) / n
    loss = alpha * scale * kd_mean + (1 - alpha) * ce_mean
    return loss, LossMetrics(loss=loss, other_metrics={
        "kd_loss": scale * kd_mean, "ce_loss": ce_mean})

  if not is_training:
    return loss_fn(student_state.graphstate, batch)[1]
  grads, metrics = minibatch_call(
      state=student_state, batch=batch, minibatch_size=minibatch_size,
      grad_fn=jax.value_and_grad(loss_fn, has_aux=True))
  student_state = update_state_respectfully(
      state=student_state, gradients=grads, loss_config=loss_config,
      metrics=update_metrics(metrics=metrics,
                             learning_rate_fn=learning_rate_fn,
                             step=student_state.step, gradients=grads))
  return student_state, metrics


class KdJaxDistillationTrainer(DistillationTrainer):
  """EasyDeL's `DistillationTrainer` whose compiled step is
  `kd_jax_distillation_step` (``divergence``, ``beta``,
  ``fused_chunk_size`` as there; temperature and alpha from the
  `DistillationConfig`)."""

  def __init__(self, *args, divergence: str = "forward_kl",
               beta: float = 0.5, fused_chunk_size=None, **kwargs):
    self._kd = dict(divergence=divergence, beta=float(beta),
                    fused_chunk_size=fused_chunk_size)
    super().__init__(*args, **kwargs)

  def _step(self, training: bool):
    a = self.arguments
    return functools.partial(
        kd_jax_distillation_step, loss_config=a.loss_config,
        learning_rate_fn=self.scheduler,
        partition_spec=a.step_partition_spec,
        gradient_accumulation_steps=a.gradient_accumulation_steps,
        is_training=training, temperature=a.temperature, alpha=a.alpha,
        **self._kd)

  def configure_functions(self):
    out = super().configure_functions()  # EasyDeL's setup, then our step
    empty = jax.sharding.NamedSharding(out.mesh, jax.sharding.PartitionSpec())
    out.sharded_training_step_function = ejit(
        self._step(True),
        in_shardings=(self.state_shardings, empty,
                      self.teacher_state.shardings),
        out_shardings=(self.state_shardings, empty), donate_argnums=(0,))
    out.sharded_evaluation_step_function = ejit(
        self._step(False),
        in_shardings=(self.state_shardings, empty,
                      self.teacher_state.shardings),
        out_shardings=empty)
    # the trainer calls step(state, batch, teacher_state, *static_args)
    self._train_shared_fn_static_args = ()
    self._eval_shared_fn_static_args = ()
    return out
