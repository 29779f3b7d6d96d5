"""The compiled programs of an image-classification run: init, train step,
eval, dry run, the distillers' pretrain stages, precomputed teacher logits.

Programs are memoized across the phases / seeds of one process
(`program_key`): they do not depend on the seed, which only enters through
the state and the data.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import distillers as distillers_lib
from kd_jax.data import augment as augment_lib
from kd_jax.train import objectives as objectives_lib
from kd_jax.train import optim
from kd_jax.train import state as state_lib
from kd_jax.train import step_utils
from kd_jax.train import steps as steps_lib
from kd_jax.trainer import feeds as feeds_lib

PyTree = Any
# Parameter initialization runs once; XLA:CPU spends seconds optimizing the
# threefry kernels of a ResNet's init (5 s for resnet8) -- compile it without
# backend optimizations (1 s). Results are the same integer/float ops.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def init_variables(model, rng, image_shape):
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  return model.init({"params": rng, "dropout": jax.random.fold_in(rng, 1)},
                    x, train=False)


# ---------------------------------------------------------------------------
# State initialization.


@dataclasses.dataclass(frozen=True)
class StudentInit:
  """`init(init_rng, state_rng)`: the student's variables + optimizer state."""
  student: Any
  tx: Any
  image_shape: Tuple[int, ...]
  takes_teacher_variables = False

  def build(self, jit: bool = True) -> Callable:
    def init_state(init_rng, state_rng):
      variables = init_variables(self.student, init_rng, self.image_shape)
      return state_lib.create_train_state(variables, self.tx, rng=state_rng)
    return (jax.jit(init_state, compiler_options=INIT_COMPILER_OPTIONS)
            if jit else init_state)


@dataclasses.dataclass(frozen=True)
class DistillerInit:
  """`init(init_rng, state_rng, teacher_variables=None)` for objectives with
  distiller terms: the student's variables, then the distillers' params /
  state from a first (normalized, un-augmented) batch through both networks."""
  objective: Any
  student: Any
  teacher: Any
  teacher_vars: Any
  tx: Any
  data: Any
  takes_teacher_variables = True

  def build(self, jit: bool = True) -> Callable:
    def maybe_jit(f):  # (no jit when traced by a dry run's eval_shape)
      return jax.jit(f, compiler_options=INIT_COMPILER_OPTIONS) if jit else f
    init_vars = maybe_jit(lambda r: init_variables(
        self.student, r, self.data.image_shape))
    dinit = maybe_jit(lambda v, tv, batch, r: distillers_lib.init_distillers(
        self.objective, r, student_apply=self.student,
        teacher_apply=self.teacher, student_variables=v, teacher_variables=tv,
        batch=batch, preprocess=feeds_lib.eval_preprocess(self.data)))
    make_state = maybe_jit(
        lambda v, dparams, dstate, r: state_lib.create_train_state(
            v, self.tx, rng=r, distiller_params=dparams,
            distiller_state=dstate))

    def init_state(init_rng, state_rng, tvars=None):
      v = init_vars(init_rng)
      dparams, dstate = dinit(v, self.teacher_vars if tvars is None else tvars,
                              self.data.first_batch(),
                              jax.random.fold_in(init_rng, 99))
      return make_state(v, dparams, dstate, state_rng)
    return init_state


# ---------------------------------------------------------------------------
# The programs.


@dataclasses.dataclass
class Programs:
  """What a run compiles; `train_step` / `eval_step` are the raw (traceable)
  functions, the others are compiled by the run's `DataParallel`."""
  init: Any                   # StudentInit | DistillerInit
  init_state: Callable
  multi: Callable             # [n, B] chunks (lax.scan)
  single: Callable            # one step
  evaluate: Callable
  teacher_evaluate: Optional[list]    # one per teacher
  train_step: Callable
  eval_step: Callable


_CACHE: Dict[str, Programs] = {}


def clear_program_cache():
  _CACHE.clear()


def views(objective: objectives_lib.Objective) -> Dict[str, str]:
  """{view: label of the first term asking for it} (a distiller's `views`)."""
  out = {}
  for t in objective.distiller_terms:
    for v in getattr(t.distiller, "views", ()) or ():
      out.setdefault(v, t.label)
  return out


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
  """What the programs of a run are built from. `teacher` / `teacher_vars`:
  one module / variables, a list of them (several teachers), or None."""
  rc: Any                       # the RunConfig
  data: Any
  placement: Any
  student: Any
  teacher: Any
  teacher_vars: Any
  objective: Any
  tx: Any
  steps_per_epoch: int
  precompute: bool
  separate: bool
  dry_run: bool = False

  @property
  def teacher_weights(self):
    ts = self.rc.teachers
    return tuple(float(t.weight) for t in ts) if len(ts) > 1 else None


def build_programs(spec: ProgramSpec, cache_key: Optional[str]) -> Programs:
  """The run's programs (memoized under `cache_key` when not None)."""
  progs = _CACHE.get(cache_key) if cache_key is not None else None
  if progs is not None:
    return progs
  s = spec
  if s.objective.distiller_terms:
    init = DistillerInit(s.objective, s.student, s.teacher, s.teacher_vars,
                         s.tx, s.data)
  else:
    init = StudentInit(s.student, s.tx, s.data.image_shape)
  train_step = _train_step(s)
  eval_pre = feeds_lib.eval_preprocess(s.data)
  eval_step = _eval_step(s, eval_pre)
  teacher_eval = None
  if s.rc.distill:
    teacher_eval = [s.placement.compile(
        steps_lib.make_eval_step(t, axis_name=s.placement.axis_name,
                                 preprocess=eval_pre),
        stacked=False, donate_state=False) for t in _as_list(s.teacher)]
  progs = Programs(
      init=init, init_state=init.build(jit=not s.dry_run),
      multi=s.placement.compile(steps_lib.make_multi_step(train_step), stacked=True),
      single=s.placement.compile(train_step, stacked=False),
      evaluate=s.placement.compile(eval_step, stacked=False, donate_state=False),
      teacher_evaluate=teacher_eval, train_step=train_step,
      eval_step=eval_step)
  if cache_key is not None:
    _CACHE[cache_key] = progs
  return progs


def _as_list(x):
  return list(x) if isinstance(x, (list, tuple)) else [x]


def _multi_teacher(s: ProgramSpec) -> Dict[str, Any]:
  """`make_distill_step`'s several-teacher arguments (none for one)."""
  if s.teacher_weights is None:
    return {}
  return {"multi_teacher": s.rc.loss.multi_teacher,
          "teacher_weights": s.teacher_weights}


def _train_step(s: ProgramSpec) -> Callable:
  """`train_step(state, consts, batch)`: the engine's step on the batch
  `feeds.make_step_batch` assembles."""
  strong = None
  if "strong" in views(s.objective):
    strong = feeds_lib.strong_augment_fn(views(s.objective)["strong"])
  step_batch = feeds_lib.make_step_batch(
      s.data, steps_per_epoch=s.steps_per_epoch, teacher_apply=s.teacher,
      precomputed_logits=s.precompute, separate_teacher_view=s.separate,
      strong=strong)
  if s.rc.distill:
    inner_teacher = None if (s.precompute or s.separate) else s.teacher
    inner = steps_lib.make_distill_step(
        s.student, inner_teacher, s.objective, s.tx,
        axis_name=s.placement.axis_name, steps_per_epoch=s.steps_per_epoch,
        split_gradients=optim.split_gradients(s.rc.optimizer),
        on_nonfinite=s.rc.train.on_nonfinite, **_multi_teacher(s))
  else:  # supervised, or teacher-free distillers (self-distillation)
    inner_train = steps_lib.make_train_step(
        s.student, s.tx, objective=s.objective,
        axis_name=s.placement.axis_name,
        steps_per_epoch=s.steps_per_epoch if s.objective.terms else None,
        on_nonfinite=s.rc.train.on_nonfinite)

  def train_step(st, consts, batch):
    batch, tv = step_batch(st, consts, batch)
    if not s.rc.distill:
      return inner_train(st, batch)
    return inner(st, tv, batch)

  return train_step


# ---------------------------------------------------------------------------
# Evaluation.


def eval_terms(objective) -> Tuple[Any, ...]:
  """Distiller terms with evaluation metrics of their own (`eval_sums`:
  BYOT's exits and their ensemble)."""
  return tuple(t for t in objective.distiller_terms
               if callable(getattr(t.distiller, "eval_sums", None)))


def _distiller_eval_sums(terms, dparams, dstate, logits, feats, labels,
                         mask):
  """`{'<label>/<metric>': masked sum}` of every term's `eval_sums`."""
  sums = {}
  for t in terms:
    out = t.distiller.eval_sums(dparams[t.label], dstate[t.label], logits,
                                feats, labels, mask)
    sums.update({f"{t.label}/{k}": v for k, v in out.items()})
  return sums


def _eval_step(s: ProgramSpec, preprocess: Callable) -> Callable:
  """`eval_step(state, batch) -> metrics`: the engine's (`loss`, `top1`,
  `top5`, `count`) plus, for distiller terms with `eval_sums` (BYOT), their
  metrics as `'<label>/<name>'` (e.g. `byot/top1_exit1`), averaged over the
  unmasked examples like the others."""
  axis = s.placement.axis_name
  base = steps_lib.make_eval_step(s.student, axis_name=axis,
                                  preprocess=preprocess)
  terms = eval_terms(s.objective)
  if not terms:
    return base
  apply = step_utils.as_student_apply(s.student)

  def eval_step(state, batch):
    out = dict(base(state, batch))
    b = preprocess(batch)
    logits, feats, _ = step_utils.split_apply_output(
        apply(state.variables, b["image"], train=False))
    labels = b["label"]
    mask = b.get("mask")
    m = (jnp.ones(labels.shape, jnp.float32) if mask is None
         else mask.astype(jnp.float32))
    sums = _distiller_eval_sums(terms, state.distiller_params,
                                state.distiller_state,
                                logits.astype(jnp.float32), feats, labels, m)
    count = jnp.sum(m)
    if axis is not None:
      sums, count = jax.lax.psum((sums, count), axis)
    out.update({k: v / jnp.maximum(count, 1.0) for k, v in sums.items()})
    return out

  return eval_step


def distiller_eval_names(student, objective, image_shape) -> Tuple[str, ...]:
  """The `'<label>/<name>'` metrics `_eval_step` adds (traced on shapes
  only: the student, its distillers' init and `eval_sums`)."""
  terms = eval_terms(objective)
  if not terms:
    return ()
  x = jnp.zeros((2,) + tuple(image_shape), jnp.float32)
  labels = jnp.zeros((2,), jnp.int32)

  def names(rng):
    v = student.init({"params": rng, "dropout": rng}, x, train=False)
    dp, ds = distillers_lib.init_distillers(
        objective, rng, student_apply=student, teacher_apply=None,
        student_variables=v, teacher_variables=None,
        batch={"image": x, "label": labels})
    logits, feats, _ = step_utils.split_apply_output(
        step_utils.as_student_apply(student)(v, x, train=False))
    return _distiller_eval_sums(terms, dp, ds, logits.astype(jnp.float32),
                                feats, labels, jnp.ones((2,), jnp.float32))

  return tuple(jax.eval_shape(names, jax.random.key(0)))


# ---------------------------------------------------------------------------
# Dry run.


def _abstract(tree):
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _pmap_as_vmap(dp, fn, eval_step, batch, eval_batch):
  """Traces pmap programs as `vmap` over a leading device axis."""
  k = dp.num_devices

  def split(x, axis):
    x = np.asarray(x)
    sh = x.shape
    x = x.reshape(sh[:axis] + (k, sh[axis] // k) + sh[axis + 1:])
    return np.moveaxis(x, axis, 0)

  batch = jax.tree_util.tree_map(lambda x: split(x, 1), batch)
  eval_batch = jax.tree_util.tree_map(lambda x: split(x, 0), eval_batch)
  fn = jax.vmap(fn, in_axes=(None, None, 0), axis_name=dp.axis)
  eval_step = jax.vmap(eval_step, in_axes=(None, 0), axis_name=dp.axis)
  return fn, eval_step, batch, eval_batch


def dry_run(spec: ProgramSpec, progs: Programs, rngs, *, spc: int,
            total_steps: int, on_device: bool) -> Dict[str, Any]:
  """Traces init / train / eval programs with `jax.eval_shape` (no compile)."""
  rc, data, dp = spec.rc, spec.data, spec.placement
  init_rng, state_rng = rngs
  if rc.distill and progs.init.takes_teacher_variables:
    st = jax.eval_shape(progs.init_state, init_rng, state_rng,
                        _abstract(spec.teacher_vars))
  else:
    st = jax.eval_shape(progs.init_state, init_rng, state_rng)
  n = min(spc, data.train.steps_per_epoch, total_steps)
  fn = steps_lib.make_multi_step(progs.train_step)
  consts = {}
  if rc.distill:
    consts["teacher"] = (jax.ShapeDtypeStruct(
        (data.train.num_examples, rc.model.num_classes), jnp.float32)
                         if spec.precompute else spec.teacher_vars)
  if on_device:
    consts["data"] = {"image": data.train.images, "label": data.train.labels}
    batch = data.train.index_chunk(0, n)
  else:
    batch = data.train.chunk(0, n)
  eval_batch = next(iter(data.eval_batches()))
  eval_step = progs.eval_step
  if dp.mode == "pmap":
    fn, eval_step, batch, eval_batch = _pmap_as_vmap(dp, fn, eval_step, batch,
                                                     eval_batch)
  _, metrics = jax.eval_shape(fn, st, _abstract(consts), batch)
  eval_metrics = jax.eval_shape(eval_step, st, eval_batch)
  count = lambda t: sum(int(np.prod(x.shape))  # noqa: E731
                        for x in jax.tree_util.tree_leaves(t))
  shapes = lambda t: jax.tree_util.tree_map(  # noqa: E731
      lambda x: tuple(x.shape), t)
  return {"dry_run": True, "mode": rc.mode, "model": rc.model.name,
          "teacher": ([t.name for t in rc.teachers] if rc.distill else None),
          "num_params": count(st.params),
          "num_distiller_params": count(st.distiller_params),
          "steps": total_steps,
          "steps_per_epoch": data.train.steps_per_epoch,
          "metrics": shapes(metrics), "eval_metrics": shapes(eval_metrics)}


# ---------------------------------------------------------------------------
# Distillers' pretrain stages.


def _stage_optimizer(rc, stage, spe, n):
  opt = dataclasses.replace(
      optim.stage_spec(rc.optimizer),
      learning_rate=float(stage.learning_rate or rc.optimizer.learning_rate),
      schedule="constant", warmup_epochs=0)
  return optim.make_optimizer(opt, steps_per_epoch=spe, total_steps=n)[0]


def _stage_batches(data, n, spe):
  for g in range(n):
    b = {k: v for k, v in data.train.batch(g).items() if k != "teacher_image"}
    b["aug_epoch"] = np.full(b["label"].shape, g // spe, np.int32)
    yield b


def run_pretrain_stages(spec: ProgramSpec, state, writer):
  """Runs the initialization stage of every distiller that has one (AB, FT,
  FSP, optionally FitNets) before the main training, on one device; returns
  the updated state and `{label: {'steps', 'first_loss', 'last_loss'}}`.

  Stage `s` uses the train batches of global steps `0..epochs*spe-1` (capped
  by `train.pretrain_max_steps` when > 0), the run's augmentation, and the
  configured optimizer with a constant LR (`stage.learning_rate` or
  `optimizer.learning_rate`); an optimizer that takes split task/distill
  gradients (DOT) is replaced by SGD with the same momentum and weight decay
  (a stage has one loss). Not checkpointed: a run killed during a stage
  redoes it; a resumed run (step > 0) skips it (its result is in the state).
  """
  info = {}
  spe = spec.steps_per_epoch
  for i, term in enumerate(spec.objective.distiller_terms):
    stage = getattr(term.distiller, "pretrain", None)
    if stage is None or not stage.epochs:
      continue
    n = int(stage.epochs) * spe
    cap = int(spec.rc.train.pretrain_max_steps or 0)
    n = min(n, cap) if cap else n
    key = jax.random.fold_in(state.rng, 0x5747 + i)
    sv, mp, ms, losses = distillers_lib.run_pretrain_stage(
        stage, term.label, student_apply=spec.student,
        teacher_apply=spec.teacher, student_variables=state.variables,
        teacher_variables=spec.teacher_vars,
        distiller_params=state.distiller_params[term.label],
        distiller_state=state.distiller_state[term.label],
        tx=_stage_optimizer(spec.rc, stage, spe, n),
        batches=_stage_batches(spec.data, n, spe), rng=key,
        preprocess=feeds_lib.make_stage_preprocess(
            spec.data, jax.random.fold_in(key, 1)))
    state = state.replace(
        params=sv["params"],
        batch_stats=sv.get("batch_stats", state.batch_stats),
        distiller_params={**state.distiller_params, term.label: mp},
        distiller_state={**state.distiller_state, term.label: ms})
    every = max(1, n // 20)
    for j in range(0, n, every):
      writer.write(0, {f"{term.label}_stage": float(np.mean(
          losses[j:j + every]))}, split="pretrain", epoch=(j + every) / spe)
    info[term.label] = {"steps": n, "first_loss": float(losses[0]),
                        "last_loss": float(losses[-1]),
                        "description": stage.description}
  return state, info


def precompute_logits(spec: ProgramSpec, placement):
  """The teacher's logits over the (in-memory) training set (several
  teachers: their weighted mean), replicated."""
  data = spec.data
  logits = steps_lib.precompute_teacher_logits(
      spec.teacher, spec.teacher_vars, data.train.images,
      batch_size=max(spec.rc.train.eval_batch_size, 256),
      teacher_weights=spec.teacher_weights,
      preprocess=lambda x: augment_lib.normalize(x, data.mean, data.std))
  return placement.replicate(jnp.asarray(logits, jnp.float32))
