r"""kd_jax losses as tunix distillation strategies (``google-tunix``).

tunix (github.com/google/tunix, ``tunix/distillation``) trains an NNX student
with a `DistillationTrainer` and a *strategy*: ``get_teacher_outputs`` runs
the frozen teacher (its own ``nnx.jit`` program), ``compute_loss(student
output, teacher output, labels)`` is the loss inside the student's compiled
train step. Two strategies here put kd_jax's losses there:

* `KdJaxLogitStrategy`: tunix's ``LogitStrategy`` with the divergence taken
  from `kd_jax.losses` -- ``forward_kl`` (tunix's own, the default),
  ``reverse_kl``, ``js_divergence`` (GKD's generalized JSD, which tunix does
  not have) or ``total_variation`` --, per token with a ``where=`` mask:

  .. math::
    \mathcal L = \alpha\, s\, \overline{D(z^s, z^t; T)} + (1 - \alpha)\,
    \overline{\mathrm{CE}(z^s, y)}

  (means over the unmasked tokens; ``kd_scale`` :math:`s` = :math:`T^2` by
  default, tunix's and Hinton's factor);
* `KdJaxFusedStrategy`: the same loss from the models' final hidden states
  and head kernels (`kd_jax.losses.fused_head_divergence`): the teacher's
  output handed to the train step is ``[B, T, D]`` + ``[D, V]`` instead of
  ``[B, T, V]`` logits, and no ``[B, T, V]`` array is ever materialized.

The forward functions for tunix's Llama 3 (`tunix.models.llama3`) are
`llama_logits` / `llama_hidden`; ``gen_model_input_fn`` splits a token
batch into inputs and next-token targets (`next_token_inputs`). tunix is not
a dependency of kd_jax: ``experiments/benchmark_peers.py --setup`` installs
it into its own virtual environment, where ``tests/test_peer_examples.py``
runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from tunix.distillation import strategies

from kd_jax import losses

DIVERGENCES = {"forward_kl": losses.forward_kl, "reverse_kl": losses.reverse_kl,
               "js_divergence": losses.js_divergence,
               "total_variation": losses.total_variation}
_FUSED = {"forward_kl": "forward_kl", "reverse_kl": "reverse_kl",
          "js_divergence": "jsd", "total_variation": "tvd"}


def next_token_inputs(x):
  """tunix ``gen_model_input_fn``: a ``TrainingInput`` of ``[B, L]`` tokens
  (+ ``input_mask``) -> the model's inputs ``tokens[:, :-1]``, the targets
  ``tokens[:, 1:]`` and the trained-target mask."""
  tokens = x.input_tokens
  return {"input_tokens": tokens[:, :-1], "targets": tokens[:, 1:],
          "target_mask": x.input_mask[:, 1:].astype(bool)}


def _causal(tokens):
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  return positions, mask


def llama_logits(model, input_tokens, targets=None, target_mask=None):
  """Logits ``[B, T, V]`` of a tunix Llama 3 (causal, no cache)."""
  del targets, target_mask
  positions, mask = _causal(input_tokens)
  return model(input_tokens, positions, None, mask)[0]


def llama_hidden(model, input_tokens, targets=None, target_mask=None):
  """``(final hidden states [B, T, D], head kernel [D, V])`` of a tunix
  Llama 3: its forward pass without the head (the same layers in order)."""
  del targets, target_mask
  positions, mask = _causal(input_tokens)
  x = model.embedder.encode(input_tokens)
  for layer in model.layers:
    _, x = layer(x, positions, None, mask)
  x = model.final_norm(x)
  if model.config.weight_tying:
    return x, model.embedder.input_embedding[...].T
  return x, model.lm_head.w[...]


def target_labels(input_tokens=None, targets=None, target_mask=None):
  """tunix ``labels_fn``: integer targets and their mask."""
  del input_tokens
  return {"targets": targets, "mask": target_mask}


def _mean(x, where):
  return jnp.sum(jnp.where(where, x, 0.0)) / jnp.maximum(jnp.sum(where), 1)


class KdJaxLogitStrategy(strategies.LogitStrategy):
  """tunix's logit distillation with a `kd_jax.losses` divergence."""

  def __init__(self, student_forward_fn, teacher_forward_fn, labels_fn, *,
               divergence: str = "forward_kl", temperature: float = 2.0,
               alpha: float = 0.5, beta: float = 0.5, kd_scale=None):
    super().__init__(student_forward_fn, teacher_forward_fn, labels_fn,
                     temperature=temperature, alpha=alpha)
    if divergence not in DIVERGENCES:
      raise ValueError(f"divergence must be one of {tuple(DIVERGENCES)}, "
                       f"got {divergence!r}")
    self.divergence = divergence
    self.beta = float(beta)
    self.kd_scale = (self.temperature ** 2 if kd_scale is None
                     else float(kd_scale))

  def _kw(self):
    kw = {"temperature": self.temperature}
    if self.divergence == "js_divergence":
      kw["beta"] = self.beta
    return kw

  def _combine(self, kd, ce, where):
    kd_mean, ce_mean = _mean(kd, where), _mean(ce, where)
    loss = self.alpha * self.kd_scale * kd_mean + (1 - self.alpha) * ce_mean
    return loss, {"distill/soft_loss": self.kd_scale * kd_mean,
                  "distill/hard_loss": ce_mean}

  def compute_loss(self, student_output, teacher_output, labels):
    where = labels["mask"]
    kd = DIVERGENCES[self.divergence](student_output, teacher_output,
                                      where=where, **self._kw())
    ce = optax.softmax_cross_entropy_with_integer_labels(
        student_output.astype(jnp.float32), labels["targets"])
    return self._combine(kd, ce, where)

  def compute_eval_loss(self, student_output, labels):
    ce = optax.softmax_cross_entropy_with_integer_labels(
        student_output.astype(jnp.float32), labels["targets"])
    return _mean(ce, labels["mask"]), {}


class KdJaxFusedStrategy(KdJaxLogitStrategy):
  """`KdJaxLogitStrategy` from hidden states + head kernels (forward
  functions returning ``(hidden, kernel)``, e.g. `llama_hidden`)."""

  def __init__(self, *args, chunk_size: int = 1024, **kwargs):
    super().__init__(*args, **kwargs)
    self.chunk_size = int(chunk_size)

  def compute_loss(self, student_output, teacher_output, labels):
    (hs, ws), (ht, wt) = student_output, teacher_output
    where = labels["mask"]
    kd, ce = losses.fused_head_divergence(
        hs, ws, jax.lax.stop_gradient(ht), jax.lax.stop_gradient(wt),
        divergence=_FUSED[self.divergence], where=where,
        labels=labels["targets"], chunk_size=self.chunk_size, **self._kw())
    return self._combine(kd, ce, where)

  def compute_eval_loss(self, student_output, labels):
    hs, ws = student_output
    logits = jnp.einsum("btd,dv->btv", hs, ws)
    return super().compute_eval_loss(logits, labels)
