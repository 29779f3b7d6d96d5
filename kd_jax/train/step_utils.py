"""What every compiled step shares: apply-function adapters, batch checks,
per-step PRNG keys and data-parallel averaging.

The image steps (`kd_jax.train.steps`) and the language-model steps
(`kd_jax.train.lm_steps`) are built from these, so both read and update a
`TrainState` the same way (`TrainState.apply_gradients`).

Apply-function convention (any Flax Linen model, NNX via split/merge, or a
hand-written function):

* `student_apply(variables, x, train=..., rngs=...)` returns `(logits,
  features)`, or `((logits, features), updates)` with updated mutable
  collections (e.g. `{'batch_stats': ...}`). An `nn.Module` is wrapped by
  `linen_student_apply`, which asks for a mutable `'batch_stats'` when the
  variables have one.
* `teacher_apply(variables, x)` returns `(logits, features)` (inference
  mode). An `nn.Module` is wrapped as `module.apply(v, x, train=False)`.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any


def linen_student_apply(module: nn.Module,
                        mutable: Sequence[str] = ("batch_stats",)):
  """Wraps a Linen module as `apply(variables, x, train, rngs)`.

  In training mode, collections of `mutable` present in `variables` are
  made mutable and returned: `((logits, features), updates)`.
  """
  mutable = tuple(mutable)

  def apply(variables, x, train=True, rngs=None):
    muts = [c for c in mutable if c in variables] if train else []
    if muts:
      return module.apply(variables, x, train=train, rngs=rngs, mutable=muts)
    return module.apply(variables, x, train=train, rngs=rngs)

  return apply


def linen_teacher_apply(module: nn.Module):
  """Wraps a Linen module as `apply(variables, x)` in inference mode."""

  def apply(variables, x):
    return module.apply(variables, x, train=False)

  return apply


def as_student_apply(fn):
  return linen_student_apply(fn) if isinstance(fn, nn.Module) else fn


def as_teacher_apply(fn):
  return linen_teacher_apply(fn) if isinstance(fn, nn.Module) else fn


def split_apply_output(out, where: str = "student_apply"):
  """`(logits, feats)` or `((logits, feats), updates)` -> (logits, feats,
  updates)."""
  if not isinstance(out, (tuple, list)) or len(out) != 2:
    raise TypeError(
        f"`{where}` must return `(logits, features)` or `((logits, features), "
        f"updated_collections)`; got {type(out).__name__}.")
  if isinstance(out[0], (tuple, list)):
    (logits, feats), updates = out
    return logits, feats, dict(updates)
  return out[0], out[1], {}


def teacher_output(out):
  """`(logits, features)` of a teacher apply function (checked)."""
  if not isinstance(out, (tuple, list)) or len(out) != 2:
    raise TypeError(
        "`teacher_apply` must return `(logits, features)`; got "
        f"{type(out).__name__}.")
  return out[0], out[1]


def check_batch(batch, keys) -> None:
  """TypeError / KeyError unless `batch` is a dict holding `keys`."""
  if not isinstance(batch, dict):
    raise TypeError(f"`batch` must be a dict; got {type(batch).__name__}.")
  for k in keys:
    if k not in batch:
      raise KeyError(f"`batch` has no key {k!r}; it has {sorted(batch)}.")


def pmean_floats(tree, axis_name: Optional[str]):
  """`pmean` of the floating leaves over `axis_name` (None: unchanged;
  integer leaves, e.g. counters, are the same on every device and keep
  their dtype)."""
  if axis_name is None:
    return tree
  return jax.tree_util.tree_map(
      lambda x: (jax.lax.pmean(x, axis_name)
                 if jnp.issubdtype(jnp.result_type(x), jnp.inexact) else x),
      tree)


def step_rng(state_rng, step, axis_name: Optional[str]):
  """The key of optimizer step `step` (folded with the device index under
  `pmap`, so dropout masks differ between devices)."""
  key = jax.random.fold_in(state_rng, step)
  if axis_name is not None:
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
  return key


def stream_rngs(key, streams: Sequence[str], offset: int = 0
                ) -> Dict[str, Any]:
  """`{stream: fold_in(key, offset + i)}`: the `rngs=` of an apply call."""
  return {name: jax.random.fold_in(key, offset + i)
          for i, name in enumerate(streams)}


NONFINITE_MODES = ("stop", "skip_update")


def nonfinite_guard(old, new, loss, grads, mode: str = "stop"):
  """`(state, metrics)` after a step whose loss or gradients may be NaN/inf.

  `metrics['nonfinite']` is 1.0 when the loss or the global gradient norm
  is not finite (the loop stops on it in mode ``'stop'``, never saving such
  a state). With ``mode='skip_update'`` (optax's `apply_if_finite`) the
  update is skipped instead: parameters, optimizer and distiller state and
  batch statistics stay those of `old`; the step count still advances (data
  order and dropout keys follow the step).
  """
  if mode not in NONFINITE_MODES:
    raise ValueError(f"on_nonfinite must be one of {NONFINITE_MODES}; got "
                     f"{mode!r}.")
  import optax  # pylint: disable=g-import-not-at-top
  finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
  metrics = {"nonfinite": jnp.logical_not(finite).astype(jnp.float32)}
  if mode == "skip_update":
    def keep(a, b):
      return jax.tree_util.tree_map(lambda x, y: jnp.where(finite, x, y),
                                    a, b)
    new = new.replace(
        params=keep(new.params, old.params),
        batch_stats=keep(new.batch_stats, old.batch_stats),
        opt_state=keep(new.opt_state, old.opt_state),
        distiller_params=keep(new.distiller_params, old.distiller_params),
        distiller_state=keep(new.distiller_state, old.distiller_state))
  return new, metrics


def _materialized_cpu(x):
  if x.size == 0:
    return x
  first = x.reshape(-1)[0]
  # Two branches with the same values (+0 keeps XLA from folding the
  # conditional away; it maps -0.0 to +0.0 and nothing else).
  return jax.lax.cond(first == first, lambda a: a + 0, lambda a: a + 0, x)


@jax.custom_vjp
def gradient_boundary(x):
  r"""Identity whose gradient XLA:CPU computes into memory before using it.

  The cotangent of a language model's logits ``[B, T, V]`` is a sum of
  elementwise terms (CE, KD, ...). XLA:CPU fuses that sum into every
  consumer, including the layout copy that transposes it to ``[V, B*T]``
  for the head's weight-gradient dot; such a transposing fusion reads each
  of its inputs with a stride per output element (measured: 469 ms instead
  of 21 ms for ``[2048, 2048]`` float32 with four fused inputs, half of a
  distillation step; ``docs/performance.md``, "LM distillation vs the JAX
  peers"). A conditional is a fusion boundary (the trick of
  `kd_jax.models.layers.fusion_boundary`), so the cotangent is summed once,
  then copied. Forward: ``x`` itself. Gradient: the same values (up to the
  sign of zero). Other backends: a plain identity.
  """
  return x


def _gradient_boundary_bwd(_, g):
  return (jax.tree_util.tree_map(
      lambda a: jax.lax.platform_dependent(a, cpu=_materialized_cpu,
                                           default=lambda b: b), g),)


gradient_boundary.defvjp(lambda x: (x, None), _gradient_boundary_bwd)
