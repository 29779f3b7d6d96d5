"""Pure, compilable train / distill / eval steps.

Every builder returns a pure function of pytrees -- jit it, `pmap` it or
hand it to `kd_jax.train.parallel.DataParallel.compile`:

* `make_distill_step(student_apply, teacher_apply, objective, tx)` ->
  `step(state, teacher_variables, batch) -> (state, metrics)`: frozen
  teacher forward (inference mode, `stop_gradient`), student forward, the
  objective, the gradient and the optax update -- one XLA program.
* `make_train_step(apply, tx)` -> `step(state, batch)`: training without a
  teacher -- supervised (the teachers are trained with the same engine) or
  with teacher-free distiller terms (self-distillation: BYOT, CS-KD, Tf-KD).
* `make_eval_step(apply)` -> `step(variables_or_state, batch) -> metrics`
  (`loss`, `top1`, `top5`, `count`; honours an optional `batch['mask']`).
* `make_dml_step(student_applies, objective, tx)` -> `step(states, batch)`:
  deep mutual learning, all students in one program.
* `make_multi_step(step)` -> the same signature with a *stacked* chunk of
  batches `[num_steps, batch, ...]`: `lax.scan` runs the whole loop in one
  compiled call (metrics come back stacked `[num_steps]`).

Apply-function convention (any Flax Linen model, NNX via split/merge, or a
hand-written function):

* `student_apply(variables, x, train=..., rngs=...)` returns `(logits,
  features)`, or `((logits, features), updates)` with updated mutable
  collections (e.g. `{'batch_stats': ...}`). An `nn.Module` may be passed
  instead; it is wrapped by `linen_student_apply`, which asks for a mutable
  `'batch_stats'` when the variables have one.
* `teacher_apply(variables, x)` returns `(logits, features)` (inference
  mode). An `nn.Module` is wrapped as `module.apply(v, x, train=False)`.

Batches are dicts: `batch[image_key]` (default `'image'`), `batch[label_key]`
(`'label'`), optionally `'teacher_logits'` (precomputed teacher) and
`'mask'` (eval only). `preprocess(batch) -> batch` runs inside the program
(e.g. uint8 -> normalized float, so the host ships 4x fewer bytes).

Mixed precision: build the models with `dtype=jnp.bfloat16` (parameters stay
float32); the engine casts logits to float32 before every loss, so losses,
gradients and the optimizer are float32.

Data parallelism: pass `axis_name` (what `DataParallel.axis_name` returns)
when the step runs under `pmap`; gradients, metrics and BatchNorm statistics
are then `pmean`-ed over that axis. Under `jit` with a sharded batch leave it
None: the program is written for the global batch and XLA partitions it.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Dict, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax.train.objectives import Objective
from kd_jax.train.state import TrainState
from kd_jax.train.state import student_variables
from kd_jax.train.step_utils import as_student_apply
from kd_jax.train.step_utils import as_teacher_apply
from kd_jax.train.step_utils import check_batch as _check_batch
from kd_jax.train.step_utils import nonfinite_guard
from kd_jax.train.step_utils import linen_student_apply  # noqa: F401
from kd_jax.train.step_utils import linen_teacher_apply  # noqa: F401
from kd_jax.train.step_utils import pmean_floats as _pmean
from kd_jax.train.step_utils import split_apply_output as _split_student_out
from kd_jax.train.step_utils import step_rng as _step_rng
from kd_jax.train.step_utils import stream_rngs
from kd_jax.train.step_utils import teacher_output as _teacher_out

PyTree = Any
Batch = Dict[str, Any]

MULTI_TEACHER_MODES = ("mean_logits", "mean_losses")


def _sync_distiller_state(objective, dstate, axis_name):
  """`pmean`s each distiller's state unless the distiller keeps it in sync.

  A distiller with `state_is_synced = True` promises that its new state is
  already identical on every device (e.g. sync BatchNorm statistics, a CRD
  memory bank updated from all-gathered embeddings); averaging it again would
  cost an all-reduce of the whole state (CRD: 2 x N x 128 floats per step) and
  would turn integer leaves into floats.
  """
  if axis_name is None:
    return dstate
  synced = {t.label for t in objective.distiller_terms
            if getattr(t.distiller, "state_is_synced", False)}
  return {k: (v if k in synced else _pmean(v, axis_name))
          for k, v in dstate.items()}


def _epoch(step, steps_per_epoch):
  if steps_per_epoch is None:
    return None
  return step // steps_per_epoch + 1


# ---------------------------------------------------------------------------
# Teacher forward (also used by `precompute_teacher_logits`).


def teacher_forward(teacher_apply, teacher_variables, x, *,
                    multi_teacher: str = "mean_logits",
                    teacher_weights: Optional[Sequence[float]] = None):
  """Runs the frozen teacher(s); returns stop-gradient `(logits, features)`.

  With a list of teachers: `multi_teacher='mean_logits'` returns the
  weighted mean of their float32 logits (weights normalized, uniform when
  None) and the list of features; `'mean_losses'` returns the lists.
  """
  if isinstance(teacher_apply, (list, tuple)):
    if not isinstance(teacher_variables, (list, tuple)) or len(
        teacher_variables) != len(teacher_apply):
      raise ValueError(
          f"{len(teacher_apply)} teacher apply functions need a list of as "
          "many `teacher_variables`; got "
          f"{type(teacher_variables).__name__}"
          f"{'' if not isinstance(teacher_variables, (list, tuple)) else ' of length %d' % len(teacher_variables)}.")
    outs = [_teacher_out(as_teacher_apply(f)(v, x))
            for f, v in zip(teacher_apply, teacher_variables)]
    logits = [jax.lax.stop_gradient(o[0]).astype(jnp.float32) for o in outs]
    feats = [jax.lax.stop_gradient(o[1]) for o in outs]
    if multi_teacher == "mean_logits":
      w = teacher_weights or (1.0,) * len(logits)
      if len(w) != len(logits):
        raise ValueError(
            f"`teacher_weights` has {len(w)} entries for {len(logits)} "
            "teachers.")
      total = float(sum(w))
      logits = sum((wi / total) * li for wi, li in zip(w, logits))
    return logits, feats
  logits, feats = _teacher_out(as_teacher_apply(teacher_apply)(
      teacher_variables, x))
  return jax.lax.stop_gradient(logits), jax.lax.stop_gradient(feats)


# ---------------------------------------------------------------------------
# The generic single-student step.


STRONG_IMAGE_KEY = "image_strong"
PAIR_IMAGE_KEY = "image_pair"
SUPPORTED_VIEWS = ("strong", "pair")
# Views the teacher runs on (precomputed teacher logits cannot provide them).
TEACHER_VIEWS = ("strong",)


def _student_views(student_apply, trainable, batch_stats, updates, xs, rngs):
  """Student forward on the strong view, after the weak one (BN statistics
  continue from the weak forward's, as two train-mode calls in PyTorch)."""
  stats = updates.get("batch_stats", batch_stats)
  out = student_apply(student_variables(trainable["student"], stats), xs,
                      train=True, rngs=rngs)
  logits, _, upd = _split_student_out(out)
  return logits, {**updates, **upd}


def _split_value_and_grads(loss_fn, trainable, ce_weight):
  """`{'task', 'distill'}` gradients from one forward (`jax.vjp`).

  task = `ce_weight * CE`, distill = the rest of the objective (the KD
  terms); the two cotangents reuse the same linearization.
  """
  def pair_fn(tr):
    loss, (aux, updates) = loss_fn(tr)
    task = ce_weight * aux["metrics"]["ce"]
    return jnp.stack([task, loss - task]), (aux, updates)

  pair, vjp_fn, (aux, updates) = jax.vjp(pair_fn, trainable, has_aux=True)
  (g_task,) = vjp_fn(jnp.array([1.0, 0.0], pair.dtype))
  (g_distill,) = vjp_fn(jnp.array([0.0, 1.0], pair.dtype))
  return {"task": g_task, "distill": g_distill}, (aux, updates)


def _make_step(student_apply, teacher_fn, objective: Objective,
               tx: optax.GradientTransformation, *, axis_name, image_key,
               label_key, steps_per_epoch, preprocess, rng_streams,
               split_gradients=False, on_nonfinite="stop"):
  student_apply = as_student_apply(student_apply)
  views = objective.views
  unknown = [v for v in views if v not in SUPPORTED_VIEWS]
  if unknown:
    raise ValueError(f"distillers declare unsupported input views {unknown}; "
                     f"supported: {SUPPORTED_VIEWS}.")
  strong = "strong" in views
  pair = "pair" in views
  if objective.warmup_epochs and steps_per_epoch is None:
    raise ValueError(
        f"the objective has warmup_epochs={objective.warmup_epochs}; pass "
        "`steps_per_epoch` so the step can count epochs.")
  if steps_per_epoch is not None and (
      not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
    raise ValueError(
        f"`steps_per_epoch` must be a positive int; got {steps_per_epoch!r}.")

  def step(state: TrainState, teacher_variables, batch: Batch):
    _check_batch(batch, (image_key, label_key))
    if preprocess is not None:
      batch = preprocess(batch)
    x, labels = batch[image_key], batch[label_key]
    t_logits, t_feats = teacher_fn(teacher_variables, x, batch)
    key = _step_rng(state.rng, state.step, axis_name)
    dkey, okey = jax.random.split(key)
    rngs = stream_rngs(dkey, rng_streams)
    epoch = _epoch(state.step, steps_per_epoch)
    if strong:
      _check_batch(batch, (STRONG_IMAGE_KEY,))
      xs = batch[STRONG_IMAGE_KEY]
      ts_logits, _ = teacher_fn(teacher_variables, xs, batch)
      rngs_strong = stream_rngs(dkey, rng_streams, offset=len(rng_streams))
    if pair:
      _check_batch(batch, (PAIR_IMAGE_KEY,))
      xp = batch[PAIR_IMAGE_KEY]
      rngs_pair = stream_rngs(dkey, rng_streams,
                              offset=2 * len(rng_streams))

    def loss_fn(trainable):
      variables = student_variables(trainable["student"], state.batch_stats)
      out = student_apply(variables, x, train=True, rngs=rngs)
      logits, feats, updates = _split_student_out(out)
      view_inputs = None
      if strong:
        s_strong, updates = _student_views(student_apply, trainable,
                                           state.batch_stats, updates, xs,
                                           rngs_strong)
        view_inputs = {"strong": (s_strong.astype(jnp.float32), ts_logits)}
      if pair:  # CS-KD: same-class partners, no gradient (torch.no_grad)
        s_pair, updates = _student_views(student_apply, trainable,
                                         state.batch_stats, updates, xp,
                                         rngs_pair)
        view_inputs = {**(view_inputs or {}), "pair": (
            jax.lax.stop_gradient(s_pair.astype(jnp.float32)), None)}
      loss, aux = objective(
          logits, labels, teacher_logits=t_logits, student_features=feats,
          teacher_features=t_feats, epoch=epoch,
          distiller_params=trainable["distiller"],
          distiller_state=state.distiller_state, train=True, rng=okey,
          axis_name=axis_name, batch=batch, step=state.step,
          views=view_inputs)
      return loss, (aux, updates)

    trainable = state.trainable()
    if split_gradients:
      grads, (aux, updates) = _split_value_and_grads(
          loss_fn, trainable, objective.ce_weight)
    else:
      grads, (aux, updates) = jax.grad(loss_fn, has_aux=True)(trainable)
    grads = _pmean(grads, axis_name)
    metrics = _pmean(aux["metrics"], axis_name)
    batch_stats = _pmean(updates.get("batch_stats", state.batch_stats),
                         axis_name)
    dstate = _sync_distiller_state(objective, aux["distiller_state"],
                                   axis_name)
    new_state = state.apply_gradients(tx, grads, batch_stats=batch_stats,
                                      distiller_state=dstate)
    new_state, flags = nonfinite_guard(state, new_state, metrics["loss"],
                                       grads, on_nonfinite)
    return new_state, {**metrics, **flags}

  return step


def _check_teachers(teacher_apply, objective: Objective, multi_teacher: str,
                    teacher_weights):
  """Checks `make_distill_step`'s teacher arguments; returns the objective
  (with the teacher weights of a multi-teacher step) and the weights as a
  tuple of floats (or None)."""
  if multi_teacher not in MULTI_TEACHER_MODES:
    raise ValueError(
        f"`multi_teacher` must be one of {MULTI_TEACHER_MODES}; got "
        f"{multi_teacher!r}.")
  if not objective.terms:
    raise ValueError(
        "the objective has no KD terms; use `make_train_step` for "
        "supervised training.")
  if teacher_weights is not None:
    teacher_weights = tuple(float(w) for w in teacher_weights)
    if any(w < 0 for w in teacher_weights) or sum(teacher_weights) <= 0:
      raise ValueError(
          f"`teacher_weights` must be >= 0 with a positive sum; got "
          f"{teacher_weights}.")
    if isinstance(teacher_apply, (list, tuple)) and len(teacher_weights) != len(
        teacher_apply):
      raise ValueError(
          f"`teacher_weights` has {len(teacher_weights)} entries for "
          f"{len(teacher_apply)} teachers.")
  if isinstance(teacher_apply, (list, tuple)):
    # mean_losses: weights of the logit terms; both modes: feature terms
    # (`Term(features=...)`) average over the teachers' features.
    objective = dataclasses.replace(objective, teacher_weights=teacher_weights)

  teacher_views = [v for v in objective.views if v in TEACHER_VIEWS]
  if teacher_apply is None and teacher_views:
    raise ValueError(
        f"distillers declaring input views {teacher_views} need a teacher "
        "apply function (precomputed teacher logits exist for one view only).")
  return objective, teacher_weights


def _teacher_fn(teacher_apply, teacher_logits_key: str, multi_teacher: str,
                teacher_weights):
  """`(teacher_variables, x, batch) -> (logits, features)`: the teacher's
  forward, or the precomputed logits of the batch when `teacher_apply` is
  None."""
  if teacher_apply is None:
    def teacher_fn(teacher_variables, x, batch):
      del teacher_variables, x
      _check_batch(batch, (teacher_logits_key,))
      return jax.lax.stop_gradient(batch[teacher_logits_key]), None
  else:
    def teacher_fn(teacher_variables, x, batch):
      del batch
      return teacher_forward(teacher_apply, teacher_variables, x,
                             multi_teacher=multi_teacher,
                             teacher_weights=teacher_weights)
  return teacher_fn


def make_distill_step(student_apply, teacher_apply, objective: Objective,
                      tx: optax.GradientTransformation, *,
                      axis_name: Optional[str] = None,
                      steps_per_epoch: Optional[int] = None,
                      multi_teacher: str = "mean_logits",
                      teacher_weights: Optional[Sequence[float]] = None,
                      image_key: str = "image", label_key: str = "label",
                      teacher_logits_key: str = "teacher_logits",
                      preprocess: Optional[Callable[[Batch], Batch]] = None,
                      rng_streams: Sequence[str] = ("dropout",),
                      split_gradients: bool = False,
                      on_nonfinite: str = "stop"):
  """Builds `step(state, teacher_variables, batch) -> (state, metrics)`.

  Args:
    student_apply: `(variables, x, train=, rngs=) -> (logits, features)` (or
      `((logits, features), updates)`), or a Linen module.
    teacher_apply: `(variables, x) -> (logits, features)`, a Linen module, a
      list of those (multi-teacher; `teacher_variables` is then a list), or
      None to read precomputed logits from `batch[teacher_logits_key]` (no
      teacher forward; pass `teacher_variables=None`).
    objective: the `Objective` (CE + KD terms + warm-up).
    tx: optax transformation of `{'student': ..., 'distiller': ...}`.
    axis_name: the `pmap` axis to average gradients/metrics/BN stats over.
    steps_per_epoch: lets the step derive the 1-based epoch
      `step // steps_per_epoch + 1` for the warm-up factor.
    multi_teacher: `'mean_logits'` (distil from the weighted mean of the
      teachers' logits) or `'mean_losses'` (each KD term is the weighted mean
      of the term against each teacher).
    teacher_weights: per-teacher weights (normalized; uniform when None).
    image_key, label_key, teacher_logits_key: batch keys.
    preprocess: `batch -> batch`, run inside the compiled program.
    rng_streams: PRNG streams handed to the student (`rngs=`).
    split_gradients: give `tx` the task and the distillation gradients
      separately, as `{'task': g_task, 'distill': g_distill}` (task =
      `ce_weight * CE`, distill = the KD terms; one forward, two
      cotangents), for optimizers that treat them differently (DOT,
      `kd_jax.distillers.dot.dot`). The default hands `tx` their sum.
    on_nonfinite: ``'stop'`` (report `metrics['nonfinite']`; the trainer
      stops) or ``'skip_update'`` (also skip the update of such a step);
      see `step_utils.nonfinite_guard`.

  Distillers that declare `views = ('strong',)` (MLKD) make the step read
  `batch['image_strong']` as well, run the student (train mode, BatchNorm
  statistics continuing from the weak forward) and the teacher on it, and
  hand the distiller `inputs.views['strong'] = (student_logits,
  teacher_logits)`. `views = ('pair',)` (CS-KD) runs the student alone on
  `batch['image_pair']` (see `make_train_step`).

  The teacher variables are an argument (not constants baked into the
  program); the teacher runs in inference mode, outside the differentiated
  function, and its outputs are wrapped in `stop_gradient`.
  """
  objective, teacher_weights = _check_teachers(
      teacher_apply, objective, multi_teacher, teacher_weights)
  teacher_fn = _teacher_fn(teacher_apply, teacher_logits_key, multi_teacher,
                           teacher_weights)
  return _make_step(student_apply, teacher_fn, objective, tx,
                    axis_name=axis_name, image_key=image_key,
                    label_key=label_key, steps_per_epoch=steps_per_epoch,
                    preprocess=preprocess, rng_streams=tuple(rng_streams),
                    split_gradients=split_gradients,
                    on_nonfinite=on_nonfinite)


def make_train_step(apply_fn, tx: optax.GradientTransformation, *,
                    objective: Optional[Objective] = None,
                    axis_name: Optional[str] = None,
                    steps_per_epoch: Optional[int] = None,
                    image_key: str = "image", label_key: str = "label",
                    preprocess: Optional[Callable[[Batch], Batch]] = None,
                    rng_streams: Sequence[str] = ("dropout",),
                    on_nonfinite: str = "stop"):
  """Step without a teacher, `step(state, batch) -> (state, metrics)`.

  `objective` defaults to plain cross-entropy (`Objective(ce_weight=1)`).
  Its terms may only be teacher-free distillers (`needs_teacher = False`:
  BYOT, CS-KD, Tf-KD_reg), whose params and state are trained as in
  `make_distill_step`; one declaring `views = ('pair',)` (CS-KD) makes the
  step run the student (train mode, BatchNorm statistics continuing from
  the anchors' forward, no gradient) on `batch['image_pair']` and hand the
  logits over as `inputs.views['pair'] = (logits, None)`. Metrics: `ce`,
  `loss`, `top1`, `kd_factor` and one per term.
  """
  objective = objective if objective is not None else Objective()
  need_teacher = [t.label for t in objective.terms
                  if not (t.is_distiller
                          and not getattr(t.distiller, "needs_teacher", True))]
  if need_teacher:
    raise ValueError(
        "`make_train_step` takes an objective without KD terms (only "
        f"teacher-free distillers); got {need_teacher} (use "
        "`make_distill_step`).")
  teacher_views = [v for v in objective.views if v in TEACHER_VIEWS]
  if teacher_views:
    raise ValueError(f"input views {teacher_views} need a teacher; use "
                     "`make_distill_step`.")

  def teacher_fn(teacher_variables, x, batch):
    return None, None

  inner = _make_step(apply_fn, teacher_fn, objective, tx,
                     axis_name=axis_name, image_key=image_key,
                     label_key=label_key, steps_per_epoch=steps_per_epoch,
                     preprocess=preprocess, rng_streams=tuple(rng_streams),
                     on_nonfinite=on_nonfinite)

  def step(state: TrainState, batch: Batch):
    return inner(state, None, batch)

  return step


def make_eval_step(apply_fn, *, axis_name: Optional[str] = None,
                   image_key: str = "image", label_key: str = "label",
                   mask_key: str = "mask",
                   preprocess: Optional[Callable[[Batch], Batch]] = None):
  """Builds `eval_step(variables, batch) -> metrics`.

  `variables` is a `TrainState` or a Flax variables dict; `apply_fn` is a
  student-style apply function (called with `train=False`), a teacher-style
  `(variables, x)` function (when it takes no `train` argument) or a Linen
  module. Metrics (float32): `loss` (mean CE), `top1`, `top5`, averaged over
  the examples with `batch[mask_key]` true (all when absent), and `count`,
  the number of such examples (sum over devices under `pmap`). Combine
  batches with `count`-weighted means.
  """
  if isinstance(apply_fn, nn.Module):
    module = apply_fn
    fwd = lambda v, x: module.apply(v, x, train=False)  # noqa: E731
  else:
    try:
      params = inspect.signature(apply_fn).parameters
      takes_train = "train" in params or any(
          p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
      takes_train = True
    if takes_train:
      fwd = lambda v, x: apply_fn(v, x, train=False)  # noqa: E731
    else:
      fwd = apply_fn

  def eval_step(variables, batch: Batch):
    _check_batch(batch, (image_key, label_key))
    if isinstance(variables, TrainState):
      variables = variables.variables
    if preprocess is not None:
      batch = preprocess(batch)
    x, labels = batch[image_key], batch[label_key]
    out = fwd(variables, x)
    logits, _, _ = _split_student_out(out, "apply_fn")
    logits = logits.astype(jnp.float32)
    mask = batch.get(mask_key)
    mask = (jnp.ones(labels.shape, jnp.float32) if mask is None
            else mask.astype(jnp.float32))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    k = min(5, logits.shape[-1])
    topk = jax.lax.top_k(logits, k)[1]
    top5 = jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
    top1 = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    sums = {"loss": jnp.sum(ce * mask), "top1": jnp.sum(top1 * mask),
            "top5": jnp.sum(top5 * mask), "count": jnp.sum(mask)}
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    denom = jnp.maximum(sums["count"], 1.0)
    return {"loss": sums["loss"] / denom, "top1": sums["top1"] / denom,
            "top5": sums["top5"] / denom, "count": sums["count"]}

  return eval_step


# ---------------------------------------------------------------------------
# Deep mutual learning.


def make_dml_step(student_applies: Sequence[Any], objective: Objective,
                  tx: Union[optax.GradientTransformation,
                            Sequence[optax.GradientTransformation]], *,
                  axis_name: Optional[str] = None,
                  steps_per_epoch: Optional[int] = None,
                  image_key: str = "image", label_key: str = "label",
                  preprocess: Optional[Callable[[Batch], Batch]] = None,
                  rng_streams: Sequence[str] = ("dropout",)):
  r"""Deep mutual learning: `step(states, batch) -> (states, metrics)`.

  With :math:`K` students, student :math:`k` minimizes
  :math:`w_{ce} CE(z_k, y) + \frac{1}{K-1}\sum_{l \ne k} \sum_j w_j
  \mathcal{L}_j(z_k, \mathrm{sg}(z_l))` (the objective's KD terms with the
  peers' logits as stop-gradient teachers); for DML use `Term('kd',
  temperature=1.0)`, i.e. :math:`KL(p_l \| p_k)`. All students are updated
  simultaneously from the same batch in one program (the paper's Algorithm 1
  updates them sequentially; simultaneous updates are the common
  implementation). `states` is a tuple of `TrainState`; metrics are keyed
  `'student{k}/{name}'`.

  References:
    Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018.
  """
  applies = [as_student_apply(f) for f in student_applies]
  n = len(applies)
  txs = _check_dml(objective, tx, n, steps_per_epoch)
  obj = dataclasses.replace(objective, teacher_weights=None)

  def step(states, batch: Batch):
    if len(states) != n:
      raise ValueError(f"`states` must hold {n} TrainStates; got {len(states)}.")
    _check_batch(batch, (image_key, label_key))
    if preprocess is not None:
      batch = preprocess(batch)
    keys = [_step_rng(s.rng, s.step, axis_name) for s in states]
    rngs = [{name: jax.random.fold_in(k, i) for i, name in enumerate(rng_streams)}
            for k in keys]
    loss_fn = _dml_loss_fn(applies, obj, states, batch[image_key],
                           batch[label_key], rngs,
                           _epoch(states[0].step, steps_per_epoch), axis_name)
    trainables = [s.trainable() for s in states]
    grads, (auxes, updates) = jax.grad(loss_fn, has_aux=True)(trainables)
    return _dml_update(states, txs, _pmean(grads, axis_name),
                       auxes, updates, axis_name)

  return step


def _check_dml(objective: Objective, tx, n: int, steps_per_epoch):
  """Checks `make_dml_step`'s arguments; returns one optimizer per student."""
  if n < 2:
    raise ValueError(f"DML needs at least 2 students; got {n}.")
  if any(t.is_distiller for t in objective.terms):
    raise ValueError("DML supports logit terms only (no distiller terms).")
  if not objective.terms:
    raise ValueError("DML needs at least one KD term in the objective.")
  # GradientTransformation is itself a NamedTuple: test for it first.
  if isinstance(tx, optax.GradientTransformation) or not isinstance(
      tx, (list, tuple)):
    txs = [tx] * n
  else:
    txs = list(tx)
  if len(txs) != n:
    raise ValueError(f"got {len(txs)} optimizers for {n} students.")
  if objective.warmup_epochs and steps_per_epoch is None:
    raise ValueError(
        f"the objective has warmup_epochs={objective.warmup_epochs}; pass "
        "`steps_per_epoch` so the step can count epochs.")
  return txs


def _dml_loss_fn(applies, obj: Objective, states, x, labels, rngs, epoch,
                 axis_name):
  """`trainables -> (sum of the students' losses, (metrics, BN updates))`,
  each student's KD terms against its peers' stop-gradient logits."""
  n = len(applies)

  def loss_fn(trainables):
    outs = []
    for k in range(n):
      v = student_variables(trainables[k]["student"], states[k].batch_stats)
      outs.append(_split_student_out(applies[k](v, x, train=True,
                                                rngs=rngs[k])))
    logits = [o[0].astype(jnp.float32) for o in outs]
    total, auxes = 0.0, []
    for k in range(n):
      peers = [jax.lax.stop_gradient(logits[l]) for l in range(n) if l != k]
      loss, aux = obj(logits[k], labels, teacher_logits=peers, epoch=epoch,
                      axis_name=axis_name)
      total = total + loss
      auxes.append(aux["metrics"])
    return total, (auxes, [o[2] for o in outs])

  return loss_fn


def _dml_update(states, txs, grads, auxes, updates, axis_name):
  """Every student's optimizer update; metrics keyed `student{k}/{name}`."""
  new_states, metrics = [], {}
  for k, s in enumerate(states):
    bs = _pmean(updates[k].get("batch_stats", s.batch_stats), axis_name)
    new_states.append(s.apply_gradients(txs[k], grads[k], batch_stats=bs))
    for name, v in auxes[k].items():
      metrics[f"student{k}/{name}"] = v
  metrics = _pmean(metrics, axis_name)
  return tuple(new_states), metrics


# ---------------------------------------------------------------------------
# Many steps per compiled call.


def make_multi_step(step_fn: Callable, *, unroll: int = 1):
  """Wraps `step(state, *consts, batch)` into a `lax.scan` over batches.

  The returned function has the same signature, except that its last
  argument is a chunk of batches stacked on a new leading axis
  `[num_steps, batch, ...]`; it returns the final state and the metrics
  stacked `[num_steps]`. Compile it once (jit / `DataParallel.compile(...,
  stacked=True)`) and the whole loop runs in one call -- no Python or
  dispatch overhead per step.
  """

  def multi_step(state, *args):
    if not args:
      raise TypeError("multi_step needs at least (state, batches).")
    consts, batches = args[:-1], args[-1]

    def body(carry, batch):
      return step_fn(carry, *consts, batch)

    return jax.lax.scan(body, state, batches, unroll=unroll)

  return multi_step


# ---------------------------------------------------------------------------
# Precomputed teacher logits.


def precompute_teacher_logits(teacher_apply, teacher_variables, images, *,
                              batch_size: int = 1024,
                              multi_teacher: str = "mean_logits",
                              teacher_weights=None,
                              preprocess: Optional[Callable] = None):
  """Teacher logits for a whole in-memory dataset, float32 `[N, K]`.

  Runs one jitted inference forward per chunk of `batch_size` (the last
  chunk is padded), so a `make_distill_step(teacher_apply=None)` run needs
  no teacher forward per step. `preprocess` maps an image chunk to the
  teacher's input. Note: with data augmentation the teacher sees different
  inputs than the student; precompute only for fixed inputs.
  """
  if multi_teacher == "mean_losses":
    raise ValueError("precomputed logits support multi_teacher='mean_logits' "
                     "only.")

  @jax.jit
  def fwd(tv, x):
    if preprocess is not None:
      x = preprocess(x)
    logits, _ = teacher_forward(teacher_apply, tv, x,
                                multi_teacher=multi_teacher,
                                teacher_weights=teacher_weights)
    return jnp.asarray(logits, jnp.float32)

  n = images.shape[0]
  out = []
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]
    m = chunk.shape[0]
    if m < batch_size and n > batch_size:
      pad = np.zeros((batch_size - m,) + tuple(chunk.shape[1:]), chunk.dtype)
      chunk = np.concatenate([np.asarray(chunk), pad])
    out.append(np.asarray(fwd(teacher_variables, chunk))[:m])
  return np.concatenate(out, axis=0)
