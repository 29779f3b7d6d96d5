"""Image classification as a task of the one loop (``task = 'classify'``).

The run's pieces: the data (`feeds.load_data`: in memory for MNIST / CIFAR,
grain for ImageNet), the zoo's student and teachers (`kd_jax.models`), the
placement (`kd_jax.trainer.placement`), the teachers' variables (restored
into their placement; a converted PyTorch checkpoint with
``checkpoint_format='torch'``), the `Objective` (`terms.build_objective`,
distillers with the dataset and the teacher they need), the optimizer
(`kd_jax.train.optim`) and the compiled programs (`programs`). The step is
one XLA program: augmentation, teacher forward, student forward/backward,
the objective and the optax update, ``steps_per_call`` of them per
`lax.scan`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import distillers as distillers_lib
from kd_jax import models as models_lib
from kd_jax.data import sources as sources_lib
from kd_jax.train import checkpoints as ckpt_lib
from kd_jax.train import optim
from kd_jax.trainer import classify_config
from kd_jax.trainer import config as config_lib
from kd_jax.trainer import error_counts as error_counts_lib
from kd_jax.trainer import feeds as feeds_lib
from kd_jax.trainer import loop
from kd_jax.trainer import placement as placement_lib
from kd_jax.trainer import programs as programs_lib
from kd_jax.trainer import teachers as teachers_lib
from kd_jax.trainer import terms as terms_lib
from kd_jax.trainer.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def create_models(rc):
  """(student, [teachers]) Linen modules."""
  student = models_lib.create(rc.model.name, num_classes=rc.model.num_classes,
                              dtype=DTYPES[rc.model.dtype])
  teachers = [models_lib.create(t.name, num_classes=t.num_classes,
                                dtype=DTYPES[t.dtype]) for t in rc.teachers]
  return student, teachers


def teacher_variables(rc, t, module, image_shape, rng, placement, *,
                      abstract: bool = False):
  """Teacher `t`'s variables from its checkpoint (a teacher run's workdir,
  an Orbax dir, or a converted PyTorch file), or randomly initialized in
  debug runs without one; `abstract=True` (dry runs without a checkpoint):
  shapes only."""
  init = lambda r: programs_lib.init_variables(module, r, image_shape)  # noqa: E731
  key = config_lib.teacher_key(rc, t, "checkpoint")
  if abstract and not t.checkpoint:
    return jax.eval_shape(init, rng)
  if not t.checkpoint:
    logging.warning("debug run: distilling from a randomly initialized "
                    "teacher (no teacher.checkpoint).")
    return jax.jit(init, compiler_options=programs_lib.INIT_COMPILER_OPTIONS)(
        jax.random.fold_in(rng, 7))
  shapes = jax.eval_shape(init, rng)
  if t.checkpoint_format != "torch":
    return teachers_lib.restore(t.checkpoint, shapes, placement, key)
  # A .pth / .npz state_dict of the reference PyTorch definition.
  from kd_jax.models import convert  # pylint: disable=g-import-not-at-top
  try:
    sd = convert.unwrap_state_dict(convert.load_torch_checkpoint(
        t.checkpoint))
    tv = convert.from_torch_state_dict(t.name, sd, num_classes=t.num_classes)
    ckpt_lib.check_tree_matches(shapes, tv,
                                what=f"converted teacher {t.checkpoint!r}")
  except (ckpt_lib.CheckpointError, FileNotFoundError, ValueError) as e:
    raise ConfigError(key, str(e)) from None
  return tv


def _weighted_eval(metrics_list: List[Dict[str, np.ndarray]]
                   ) -> Dict[str, float]:
  """`count`-weighted means over eval batches of every metric (`loss`,
  `top1`, `top5`, a distiller's `'<label>/<name>'`)."""
  tot = sum(float(m["count"]) for m in metrics_list)
  out = {k: sum(float(m[k]) * float(m["count"]) for m in metrics_list)
            / max(tot, 1.0) for k in metrics_list[0] if k != "count"}
  out["count"] = tot
  return out


_EXIT = re.compile(r"^(.+)/top1_exit(\d+)$")
_DISTILLER_METRICS: Dict[str, Tuple[loop.Metric, ...]] = {}


def distiller_metrics(rc) -> Tuple[loop.Metric, ...]:
  """The metrics of distiller terms that evaluate themselves (BYOT: every
  exit's top-1 `'<label>/top1_exit<i>'`, the last one the student's own,
  and `'<label>/top1_ensemble'`); () without such terms. Traced once per
  model / loss (shapes only)."""
  reg = distillers_lib.registry()
  if not any(t.kind == "distiller" and callable(getattr(
      reg[t.name], "eval_sums", None)) for t in rc.loss.terms):
    return ()
  info = sources_lib.dataset_info(rc.data.name)
  shape = info.image_shape or (rc.data.image_size, rc.data.image_size, 3)
  key = json.dumps([dataclasses.asdict(rc.model), shape,
                    [dataclasses.asdict(t) for t in rc.loss.terms]],
                   sort_keys=True, default=str)
  if key not in _DISTILLER_METRICS:
    student, _ = create_models(dataclasses.replace(rc, teachers=()))
    objective = terms_lib.build_objective(rc.loss)
    names = sorted(  # per term: its exits shallow to deep, then the rest
        programs_lib.distiller_eval_names(student, objective, shape),
        key=lambda n: (n.split("/")[0], *(
            (0, int(m.group(2))) if (m := _EXIT.match(n)) else (1, 0)), n))
    deepest = max((int(m.group(2)) for m in map(_EXIT.match, names) if m),
                  default=0)
    out = []
    for n in names:
      label, _, what = n.partition("/")
      m = _EXIT.match(n)
      text = (f"{label} exit {m.group(2)} top-1 %" if m else
              f"{label} {what.replace('top1_', '')} top-1 %"
              if what.startswith("top1_") else n)
      # The deepest exit is the student's own classifier: the top-1 column.
      out.append(loop.Metric(n, text, True, 100.0 if "top1" in what else 1.0,
                             table=not (m and int(m.group(2)) == deepest)))
    _DISTILLER_METRICS[key] = tuple(out)
  return _DISTILLER_METRICS[key]


class _MockMetadataFilter(logging.Filter):
  """Drops TFDS's "Variant folder ... has no dataset_info.json": mocked
  datasets have no prepared folder, by design."""

  def filter(self, record):
    return not str(record.msg).startswith("Variant folder %s has no")


@loop.register("classify")
class ClassifyTask(loop.Task):
  """Train a network, or distil a student from frozen teachers, on images."""

  @classmethod
  def metrics(cls, rc):
    return (loop.Metric("top1", "top-1 %", True, 100.0, gain=True),
            loop.Metric("top5", "top-5 %", True, 100.0, table=False),
            loop.Metric("loss", "eval loss", False, table=False),
            *distiller_metrics(rc),
            *error_counts_lib.metrics(classify_config.evaluation(rc)))

  def __init__(self, rc, workdir: str, *, dry_run: bool = False):
    self.rc, self.workdir, self.dry_run = rc, workdir, dry_run
    self._stack = contextlib.ExitStack()
    try:
      self._setup()
    except BaseException:
      self._stack.close()
      raise

  def _setup(self):
    rc = self.rc
    if rc.data.mock and not sources_lib.dataset_info(rc.data.name).in_memory:
      # Streaming pipelines read records lazily: keep the mock active.
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      self._stack.enter_context(tfds.testing.mock_data(
          num_examples=int(rc.data.mock_num_examples)))
      log, filt = logging.getLogger("absl"), _MockMetadataFilter()
      log.addFilter(filt)
      self._stack.callback(log.removeFilter, filt)
    self.data = data = feeds_lib.load_data(rc)
    self._stack.callback(data.close)
    self.steps_per_epoch = spe = data.train.steps_per_epoch
    self.total_steps = config_lib.total_steps(rc, spe)
    self.units = {"examples": rc.train.batch_size}
    student, teachers = create_models(rc)
    example = jnp.zeros((1,) + tuple(data.image_shape), jnp.float32)
    self.placement = placement_lib.make_placement(rc, student, teachers,
                                                  example)
    init_rng, state_rng, teacher_rng = jax.random.split(
        jax.random.key(int(rc.seed)), 3)
    self.rngs = (init_rng, state_rng)
    tx, self.schedule = optim.make_optimizer(
        rc.optimizer, steps_per_epoch=spe, total_steps=self.total_steps)
    # A dry run without checkpoints has abstract teacher variables: OFD then
    # estimates its margins from data instead of the teacher's BN parameters.
    abstract = self.dry_run and not any(t.checkpoint for t in rc.teachers)
    tshape = data.teacher_shape or data.image_shape  # (data.views)
    placement_lib.check_rules(rc, self.placement, None, [
        jax.eval_shape(lambda r, m=m: programs_lib.init_variables(
            m, r, tshape), teacher_rng) for m in teachers])
    tvs = [teacher_variables(rc, t, m, tshape,
                             jax.random.fold_in(teacher_rng, i)
                             if i else teacher_rng, self.placement,
                             abstract=abstract)
           for i, (t, m) in enumerate(zip(rc.teachers, teachers))]
    one = lambda xs: (xs[0] if len(xs) == 1 else xs) if xs else None  # noqa: E731
    objective = terms_lib.build_objective(rc.loss, run_info=(
        distillers_lib.RunInfo(
            num_data=data.train.num_examples,
            dataset_labels=data.train.labels,
            teacher_variables=None if abstract else one(tvs),
            placeholders=abstract)))
    # In-memory datasets are put on device once; the host then sends only
    # the example indices of each chunk and the gather runs in the program.
    self.on_device = bool(rc.data.on_device) and isinstance(
        data.train, feeds_lib.InMemoryFeed)
    self.spec = programs_lib.ProgramSpec(
        rc=rc, data=data, placement=self.placement, student=student,
        teacher=one(teachers), teacher_vars=one(tvs), objective=objective,
        tx=tx, steps_per_epoch=spe,
        precompute=rc.distill and all(t.precompute for t in rc.teachers),
        separate=rc.distill and (rc.data.teacher_view == "separate"
                                 or data.has_views),
        dry_run=self.dry_run)
    self.progs = programs_lib.build_programs(self.spec, self._program_key())
    ev = classify_config.evaluation(rc)
    self.error_counter = (error_counts_lib.ErrorCounter(
        student, ev, feeds_lib.eval_preprocess(data)) if ev.active else None)

  def _program_key(self):
    """What the compiled programs depend on (not the seed: it only enters
    through the state and the data); None: not shared (distillers' constants
    -- CRD labels, OFD margins -- depend on the data and the teacher)."""
    if self.spec.objective.distiller_terms:
      return None
    rc, data = self.rc, self.data
    parts = {k: dataclasses.asdict(getattr(rc, k))
             for k in ("model", "loss", "optimizer")}
    parts["teachers"] = [{k: v for k, v in dataclasses.asdict(t).items()
                          if k != "checkpoint"} for t in rc.teachers]
    parts["data"] = {k: getattr(rc.data, k) for k in (
        "name", "augment", "teacher_view", "views", "normalization",
        "jitter")}
    parts["train"] = {k: getattr(rc.train, k) for k in
                      ("batch_size", "eval_batch_size", "parallel",
                       "num_devices", "mesh", "sharding_rules")}
    parts["mode"] = rc.mode
    parts["extra"] = {
        "spe": self.steps_per_epoch, "total": self.total_steps,
        "precompute": self.spec.precompute, "shape": data.image_shape,
        "teacher_shape": data.teacher_shape,
        "pad": data.crop_padding, "flip": data.flip,
        "spc": rc.train.steps_per_call,
        "ndev": self.placement.num_devices, "on_device": self.on_device}
    return json.dumps(parts, sort_keys=True, default=str)

  # -- the protocol ---------------------------------------------------------

  def dataset_name(self) -> str:
    return self.rc.data.name

  def init_state(self):
    state = self.progs.init_state(*self.rngs)
    placement_lib.check_rules(self.rc, self.placement, state, [])
    return state

  def constants(self, clock):
    """Replicated step constants (the teachers / their logits table, the
    device-resident dataset) and the teachers' eval accuracy."""
    consts, info = {}, {}
    rc, data, p = self.rc, self.data, self.placement
    if self.on_device:
      consts["data"] = p.replicate({"image": data.train.images,
                                    "label": data.train.labels})
    if not rc.distill:
      return consts, info
    tvs = self.spec.teacher_vars
    tvs = tvs if isinstance(tvs, list) else [tvs]
    placed = [p.place_teacher(tv) for tv in tvs]
    accs = [self._evaluate(fn, tv) ["top1"] for fn, tv, t in zip(
        self.progs.teacher_evaluate, placed, rc.teachers) if t.evaluate]
    if accs:
      info["teacher_top1"] = accs[0] if len(accs) == 1 else accs
    consts["teacher"] = (programs_lib.precompute_logits(self.spec, p)
                         if self.spec.precompute else
                         (placed[0] if len(placed) == 1 else placed))
    clock.tick("teacher_ready")
    return consts, info

  def before_training(self, state, writer):
    if not self.spec.objective.distiller_terms:
      return state, {}
    return programs_lib.run_pretrain_stages(self.spec, state, writer)

  def call(self, step: int, n: int):
    feed, spc = self.data.train, self.rc.train.steps_per_call
    if n == 1 and spc == 1:
      batch = (feed.index_batch(step) if self.on_device
               else feed.batch(step))
      return self.progs.single, self.placement.shard_batch(batch)
    batch = (feed.index_chunk(step, n) if self.on_device
             else feed.chunk(step, n))
    return self.progs.multi, self.placement.shard_batch(batch, stacked=True)

  def _evaluate(self, fn, variables) -> Dict[str, float]:
    outs = [fn(variables, self.placement.shard_batch(b))
            for b in self.data.eval_batches()]
    return _weighted_eval([self.placement.fetch(o) for o in outs])

  def evaluate(self, state, consts) -> Dict[str, float]:
    del consts
    out = self._evaluate(self.progs.evaluate, state)
    if self.error_counter is not None:  # `evaluation`: counts, bias shift
      out.update(self.error_counter(self.placement.fetch(state.variables),
                                    self.data.eval_batches(),
                                    self.data.val_batches()))
    return out

  def best_checkpoint(self):
    return "accuracy", True  # (the name earlier checkpoints carry)

  def summary(self, evals) -> Dict[str, Any]:
    out = super().summary(evals)
    out["convention"] = ("last_top1: after the final epoch; best_top1: max "
                         "over evaluated epochs (test set)")
    return out

  def close(self) -> None:
    self._stack.close()

  def dry_run_report(self) -> Dict[str, Any]:
    """Traces init / train / eval with `jax.eval_shape` (no compile)."""
    return programs_lib.dry_run(self.spec, self.progs, self.rngs,
                                spc=self.rc.train.steps_per_call,
                                total_steps=self.total_steps,
                                on_device=self.on_device)
