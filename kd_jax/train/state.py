"""`TrainState`: everything a compiled train/distill step updates.

The optimizer sees one pytree `{'student': params, 'distiller':
distiller_params}`, so feature-distiller adapters get gradients
and optimizer updates alongside the student with a single optax
`GradientTransformation` (use `optax.multi_transform` on those two keys for
different learning rates). The teacher is *not* part of the state: its
variables are an argument of every step (no optimizer state, no copy).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
  """Train state of one student (plus its distiller parameters).

  Attributes:
    step: int32 scalar, number of optimizer steps taken.
    params: the student's `'params'` collection.
    batch_stats: the student's `'batch_stats'` collection (`{}` without BN).
    opt_state: optax state of `{'student': params, 'distiller':
      distiller_params}`.
    distiller_params: trainable parameters of feature distillers, keyed by
      term label (`{}` for logit methods).
    distiller_state: non-trainable distiller state (e.g. adapter BN stats).
    rng: PRNG key; the step folds in the step number for dropout.
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  distiller_params: PyTree
  distiller_state: PyTree
  rng: jax.Array

  @property
  def variables(self) -> dict:
    """The student's Flax variables `{'params': ..., ['batch_stats': ...]}`."""
    return student_variables(self.params, self.batch_stats)

  def trainable(self) -> dict:
    """The pytree the optimizer updates."""
    return {"student": self.params, "distiller": self.distiller_params}

  def apply_gradients(self, tx: optax.GradientTransformation, grads, *,
                      batch_stats=None, distiller_state=None) -> "TrainState":
    """One optimizer step: `tx`'s update of `trainable()` by `grads` (or by
    the `{'task', 'distill'}` pair of a split-gradient optimizer), the step
    count + 1, and the new `batch_stats` / `distiller_state` when given."""
    trainable = self.trainable()
    updates, opt_state = tx.update(grads, self.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return self.replace(
        step=self.step + 1, params=trainable["student"],
        distiller_params=trainable["distiller"],
        batch_stats=self.batch_stats if batch_stats is None else batch_stats,
        distiller_state=(self.distiller_state if distiller_state is None
                         else distiller_state),
        opt_state=opt_state)


def student_variables(params, batch_stats) -> dict:
  v = {"params": params}
  if batch_stats:
    v["batch_stats"] = batch_stats
  return v


def create_train_state(variables: Mapping[str, PyTree],
                       tx: optax.GradientTransformation, *, rng,
                       distiller_params: Optional[PyTree] = None,
                       distiller_state: Optional[PyTree] = None) -> TrainState:
  """Builds a `TrainState` from a student's initial Flax variables.

  Args:
    variables: `module.init(...)` output: a mapping with `'params'` and
      optionally `'batch_stats'` (other collections are rejected).
    tx: the optax transformation used by the step (initialized here on
      `{'student': params, 'distiller': distiller_params}`).
    rng: PRNG key for dropout etc.
    distiller_params / distiller_state: from `Objective.init_distillers`.

  >>> import jax, optax, flax.linen as nn
  >>> m = nn.Dense(3)
  >>> v = m.init(jax.random.key(0), jax.numpy.zeros((1, 2)))
  >>> st = create_train_state(v, optax.sgd(0.1), rng=jax.random.key(1))
  >>> int(st.step), sorted(st.variables)
  (0, ['params'])
  """
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError(
        "`variables` must be a mapping with a 'params' collection (the "
        f"output of `module.init`); got keys "
        f"{list(variables) if isinstance(variables, Mapping) else type(variables).__name__}.")
  extra = set(variables) - {"params", "batch_stats"}
  if extra:
    raise ValueError(
        f"`variables` has unsupported collections {sorted(extra)}; the train "
        "state holds only 'params' and 'batch_stats'.")
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  distiller_params = {} if distiller_params is None else distiller_params
  distiller_state = {} if distiller_state is None else distiller_state
  opt_state = tx.init({"student": params, "distiller": distiller_params})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=batch_stats, opt_state=opt_state,
                    distiller_params=distiller_params,
                    distiller_state=distiller_state, rng=rng)


STATE_FIELDS = ("step", "params", "batch_stats", "opt_state",
                "distiller_params", "distiller_state", "rng")


def state_to_tree(state: TrainState) -> dict:
  """The checkpointed tree of a train state: its fields as a dict, the PRNG
  key as its raw key data (host or device arrays, as they are)."""
  tree = {f: getattr(state, f) for f in STATE_FIELDS}
  rng = tree["rng"]
  if isinstance(rng, jax.Array) and jnp.issubdtype(rng.dtype,
                                                   jax.dtypes.prng_key):
    tree["rng"] = jax.random.key_data(rng)
  return tree


def tree_to_state(tree: Mapping[str, Any], impl) -> TrainState:
  """Inverse of `state_to_tree` (`impl`: the key's `jax.random.key_impl`)."""
  d = dict(tree)
  d["rng"] = jax.random.wrap_key_data(jnp.asarray(d["rng"]), impl=impl)
  return TrainState(**d)
