"""The trainer: one run (train a network, or distill a student) from a config.

`train_and_evaluate(config, workdir)` runs one phase described by an
`ml_collections.ConfigDict` with the schema of `configs/base.py`:

1. `validate_config` checks names, class counts, batch size vs devices,
   loss terms and their hyperparameters -- every error names the config key
   -- before anything is loaded or compiled;
2. the data are decoded once into memory (`kd_jax.data`), batches are
   gathered on the host in chunks of `train.steps_per_call` steps;
3. the step -- teacher forward, student forward/backward, loss, optimizer
   update, and the dataset augmentation/normalization -- is one XLA program;
   with `steps_per_call > 1` a `lax.scan` runs that many steps per call
   (`kd_jax.train.make_multi_step`), data-parallel over `train.parallel`
   (`'none'`, `'jit'` sharding or `'pmap'`);
4. every `eval_every_epochs` the student is evaluated (top-1/top-5/loss);
   metrics go to `metrics.jsonl` + TensorBoard (`kd_jax.metrics_io`), a tqdm
   bar shows steps and examples/s, `curves.png` is drawn at the end;
5. Orbax checkpoints (`kd_jax.train.checkpoints`) hold the whole train state
   and the data position; a restarted run with the same workdir resumes from
   the latest finalized checkpoint and ends bit-identical to an
   uninterrupted run (the batch order and the augmentation are pure
   functions of (seed, step), and chunk boundaries are aligned to epochs).

Augmentation randomness: every example's key is
`fold_in(fold_in(fold_in(rng, AUG), epoch), example_index)`, computed inside
the step, so it does not depend on the number of devices or on where a run
was resumed.

The run's summary (`report.json` in the workdir, also returned) has the
last-epoch and best-epoch eval accuracy, wall time, and train throughput.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kd_jax import metrics_io
from kd_jax import models as models_lib
from kd_jax.data import augment as augment_lib
from kd_jax.data import pipeline as pipeline_lib
from kd_jax.data import sources as sources_lib
from kd_jax.train import checkpoints as ckpt_lib
from kd_jax.train import objectives as objectives_lib
from kd_jax.train import parallel as parallel_lib
from kd_jax.train import state as state_lib
from kd_jax.train import steps as steps_lib

PyTree = Any

MODES = ("train", "distill", "seed_experiment")
PARALLEL = {"none": "single", "single": "single", "jit": "jit",
            "pmap": "pmap"}
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_AUG_TAG = 0x6175  # fold-in tag of the augmentation stream
# Parameter initialization runs once; XLA:CPU spends seconds optimizing the
# threefry kernels of a ResNet's init (5 s for resnet8) -- compile it without
# backend optimizations (1 s). Results are the same integer/float ops.
_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


class ConfigError(ValueError):
  """An invalid config value; the message starts with the config key."""

  def __init__(self, key: str, msg: str):
    super().__init__(f"config.{key}: {msg}")
    self.key = key


# ---------------------------------------------------------------------------
# Config handling.


def apply_debug(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` shrunk for smoke tests when `config.debug` is set.

  Tiny subsets of mock data (TFDS `mock_data`, unless `data.mock` was
  explicitly turned off with real data available), 2 train steps of batch 8,
  one scanned call, an eval on 16 examples, synchronous checkpoints, 32x32
  ImageNet crops, no progress bar. Returns `config` unchanged otherwise.
  """
  if not config.get("debug", False) or config.get("debug_applied", False):
    return config
  c = ml_collections.ConfigDict(config.to_dict())
  c.debug_applied = True
  c.data.mock = c.data.get("mock", True) if c.data.data_dir else True
  if c.get("teacher") and c.teacher.checkpoint and not os.path.exists(
      c.teacher.checkpoint):
    c.teacher.checkpoint = ""  # the default teacher workdir is not there yet
  c.data.mock_num_examples = max(int(c.data.get("mock_num_examples", 64)), 32)
  c.data.train_subset = 32
  c.data.eval_subset = 16
  c.data.image_size = min(int(c.data.get("image_size", 32)), 32)
  c.train.batch_size = 8
  c.train.eval_batch_size = 8
  c.train.num_steps = 2
  c.train.steps_per_call = min(int(c.train.get("steps_per_call", 1)), 2)
  c.train.log_every_steps = 1
  c.train.pretrain_max_steps = 1
  c.train.progress_bar = False
  c.checkpoint.async_save = False
  if c.get("teacher"):
    c.teacher.evaluate = False
  if c.mode == "seed_experiment":
    c.seed_experiment.seeds = tuple(c.seed_experiment.seeds)[:1]
  return c


def _get(config, dotted: str, default=None):
  node = config
  for part in dotted.split("."):
    if node is None or part not in node:
      return default
    node = node[part]
  return node


def _num_devices(config) -> int:
  mode = PARALLEL.get(str(_get(config, "train.parallel", "none")))
  if mode == "single":
    return 1
  n = int(_get(config, "train.num_devices", 0) or 0)
  avail = len(jax.local_devices()) if mode == "pmap" else len(jax.devices())
  return n if n > 0 else avail


def objective_from_loss_config(loss_cfg, *, num_data: Optional[int] = None,
                               dataset_labels=None, teacher_variables=None,
                               placeholders: bool = True
                               ) -> objectives_lib.Objective:
  """`config.loss` -> `kd_jax.train.Objective` (errors name the config key).

  Logit terms name a loss of `kd_jax.losses` (`name`, default the label);
  feature/relation terms name a distiller (`distiller`, see
  `kd_jax.distillers.term_from_config`), which may need run-time information:
  the training-set size and labels (CRD) and the teacher's variables (OFD).
  With `placeholders=True` (validation) dummies stand in for those.
  """
  from kd_jax import distillers as distillers_lib  # pylint: disable=g-import-not-at-top
  terms = []
  term_cfgs = loss_cfg.get("terms", None) or {}
  for label in term_cfgs:
    tc = dict(term_cfgs[label])
    if distillers_lib.is_distiller_term(tc):
      try:
        terms.append(distillers_lib.term_from_config(
            label, tc, num_data=num_data, dataset_labels=dataset_labels,
            teacher_variables=teacher_variables, placeholders=placeholders))
      except (ValueError, TypeError) as e:
        msg = str(e)
        prefix = f"loss.terms.{label}: "
        raise ConfigError(f"loss.terms.{label}",
                          msg[len(prefix):] if msg.startswith(prefix)
                          else msg) from None
      continue
    name = tc.pop("name", label)
    weight = tc.pop("weight", 1.0)
    warmup = tc.pop("warmup", True)
    try:
      terms.append(objectives_lib.Term(name, float(weight), label=label,
                                       warmup=bool(warmup), **tc))
    except (ValueError, TypeError) as e:
      key = f"loss.terms.{label}" + (".name" if "unknown loss name" in str(e)
                                     else "")
      raise ConfigError(key, str(e)) from None
  try:
    return objectives_lib.Objective(
        ce_weight=float(loss_cfg.get("ce_weight", 1.0)), terms=tuple(terms),
        warmup_epochs=float(loss_cfg.get("warmup_epochs", 0) or 0),
        label_smoothing=float(loss_cfg.get("label_smoothing", 0.0) or 0.0))
  except (ValueError, TypeError) as e:
    raise ConfigError("loss", str(e)) from None


def validate_config(config: ml_collections.ConfigDict, *,
                    check_paths: bool = True) -> None:
  """Raises `ConfigError` (naming the key) for an invalid config.

  Runs before any data is loaded or step compiled. `check_paths=False` skips
  the checks of `teacher.checkpoint` (for phases whose teacher is trained
  later in the same experiment).
  """
  mode = config.get("mode", None)
  if mode not in MODES:
    raise ConfigError("mode", f"must be one of {MODES}; got {mode!r}.")
  if mode == "seed_experiment":
    _validate_seed_experiment(config)
    return
  data_name = _get(config, "data.name")
  try:
    info = sources_lib.dataset_info(data_name)
  except ValueError as e:
    raise ConfigError("data.name", str(e)) from None
  avail = models_lib.available_models()
  name = _get(config, "model.name")
  if name not in avail:
    raise ConfigError("model.name", f"unknown model name {name!r}; valid "
                      f"names: {', '.join(avail)}.")
  nc = _get(config, "model.num_classes")
  if not isinstance(nc, int) or nc < 1:
    raise ConfigError("model.num_classes", f"must be a positive int; got {nc!r}.")
  if nc != info.num_classes:
    raise ConfigError(
        "model.num_classes", f"{nc} does not match dataset {data_name!r} "
        f"({info.num_classes} classes).")
  for key in ("model.dtype",) + (("teacher.dtype",) if mode == "distill" else ()):
    if _get(config, key, "float32") not in DTYPES:
      raise ConfigError(key, f"must be one of {tuple(DTYPES)}; got "
                        f"{_get(config, key)!r}.")
  if not info.in_memory and not _get(config, "data.augment", True):
    raise ConfigError("data.augment", f"dataset {data_name!r} is streamed "
                      "with its standard crops; data.augment=False is only "
                      "supported for in-memory datasets.")
  teacher_view = _get(config, "data.teacher_view", "same")
  if teacher_view not in ("same", "separate"):
    raise ConfigError("data.teacher_view", "must be 'same' or 'separate'; got "
                      f"{teacher_view!r}.")
  objective = objective_from_loss_config(config.loss)
  if mode == "train" and objective.terms:
    raise ConfigError(
        "loss.terms", f"mode 'train' is supervised training; got KD terms "
        f"{[t.label for t in objective.terms]} (use mode 'distill').")
  if mode == "distill":
    if not objective.terms:
      raise ConfigError("loss.terms", "mode 'distill' needs at least one KD "
                        "term (e.g. {'kd': {'weight': 0.9, 'temperature': 4}}).")
    if objective.distiller_terms and (
        _get(config, "teacher.precompute_logits", False)
        or teacher_view == "separate"):
      raise ConfigError(
          "loss.terms", "feature/relation distiller terms need the teacher's "
          "features every step: incompatible with "
          "teacher.precompute_logits / data.teacher_view='separate'.")
    tname = _get(config, "teacher.name")
    if tname not in avail:
      raise ConfigError("teacher.name", f"unknown model name {tname!r}; valid "
                        f"names: {', '.join(avail)}.")
    tnc = _get(config, "teacher.num_classes")
    if tnc != nc:
      raise ConfigError(
          "teacher.num_classes", f"teacher has {tnc!r} classes but the "
          f"student (model.num_classes) has {nc}; they must match.")
    ckpt = _get(config, "teacher.checkpoint", "")
    fmt = _get(config, "teacher.checkpoint_format", "orbax")
    if fmt not in ("orbax", "torch"):
      raise ConfigError("teacher.checkpoint_format",
                        f"must be 'orbax' or 'torch'; got {fmt!r}.")
    if check_paths and not ckpt and not config.get("debug", False):
      raise ConfigError(
          "teacher.checkpoint", "distillation needs a trained teacher: the "
          "workdir of a teacher-training run (mode 'train') or a converted "
          "checkpoint. (Only debug runs may use a randomly initialized "
          "teacher.)")
    if check_paths and ckpt and not os.path.exists(ckpt):
      raise ConfigError("teacher.checkpoint", f"path {ckpt!r} does not exist.")
    if _get(config, "teacher.precompute_logits", False):
      if _augments(config, info):
        raise ConfigError(
            "teacher.precompute_logits", "precomputed teacher logits are "
            f"exact only without augmentation; dataset {data_name!r} is "
            "augmented (set data.augment=False or precompute_logits=False).")
      if teacher_view == "separate":
        raise ConfigError("teacher.precompute_logits",
                          "incompatible with data.teacher_view='separate'.")
  opt = config.optimizer
  if opt.name not in OPTIMIZERS:
    raise ConfigError("optimizer.name", f"must be one of {OPTIMIZERS}; got "
                      f"{opt.name!r}.")
  if opt.schedule not in SCHEDULES:
    raise ConfigError("optimizer.schedule", f"must be one of {SCHEDULES}; "
                      f"got {opt.schedule!r}.")
  if not opt.learning_rate > 0:
    raise ConfigError("optimizer.learning_rate",
                      f"must be > 0; got {opt.learning_rate!r}.")
  par = _get(config, "train.parallel", "none")
  if par not in PARALLEL:
    raise ConfigError("train.parallel", f"must be one of "
                      f"{tuple(k for k in PARALLEL if k != 'single')}; got "
                      f"{par!r}.")
  ndev = _num_devices(config)
  avail_dev = (len(jax.local_devices()) if PARALLEL[par] == "pmap"
               else len(jax.devices()))
  if ndev > avail_dev:
    raise ConfigError("train.num_devices", f"{ndev} devices requested but "
                      f"only {avail_dev} are available.")
  for key in ("train.batch_size", "train.eval_batch_size"):
    bs = _get(config, key)
    if not isinstance(bs, int) or bs < 1:
      raise ConfigError(key, f"must be a positive int; got {bs!r}.")
    if bs % (ndev * jax.process_count()):
      raise ConfigError(
          key, f"{bs} is not divisible by the number of devices {ndev} "
          f"(train.parallel={par!r}, {jax.process_count()} process(es)); use "
          f"a multiple of {ndev * jax.process_count()}.")
  spc = _get(config, "train.steps_per_call", 1)
  if not isinstance(spc, int) or spc < 1:
    raise ConfigError("train.steps_per_call", f"must be an int >= 1; got {spc!r}.")
  ne, ns = _get(config, "train.num_epochs", 0), _get(config, "train.num_steps", 0)
  if not (ne and ne > 0) and not (ns and ns > 0):
    raise ConfigError("train.num_epochs", "one of train.num_epochs / "
                      "train.num_steps must be positive.")


def _validate_seed_experiment(config):
  se = config.get("seed_experiment", None)
  if se is None:
    raise ConfigError("seed_experiment", "mode 'seed_experiment' needs a "
                      "seed_experiment section (see configs/mnist_seed.py).")
  if not tuple(se.get("seeds", ())):
    raise ConfigError("seed_experiment.seeds", "needs at least one seed.")


def _augments(config, info) -> bool:
  return bool(_get(config, "data.augment", True)) and bool(
      info.crop_padding or info.flip)


# ---------------------------------------------------------------------------
# Data.


class _InMemoryTrain:
  """Train batches gathered from in-memory arrays (MNIST / CIFAR)."""

  def __init__(self, pipe: pipeline_lib.InMemoryPipeline):
    self.pipe = pipe
    self.steps_per_epoch = pipe.steps_per_epoch
    self.num_examples = pipe.num_examples
    self.images = pipe.images
    self.labels = pipe.labels

  def chunk(self, step: int, n: int) -> Dict[str, np.ndarray]:
    """Stacked `[n, local_batch, ...]` batches of global steps [step, step+n)."""
    spe = self.steps_per_epoch
    idx = np.stack([self.pipe.local_indices(*divmod(step + j, spe))
                    for j in range(n)])
    return self.pipe.batch_at(idx)

  def batch(self, step: int) -> Dict[str, np.ndarray]:
    return self.pipe.get_batch(*divmod(step, self.steps_per_epoch))

  def index_chunk(self, step: int, n: int) -> Dict[str, np.ndarray]:
    """Only the example indices `[n, local_batch]` (data on device)."""
    spe = self.steps_per_epoch
    idx = np.stack([self.pipe.local_indices(*divmod(step + j, spe))
                    for j in range(n)])
    return {"index": idx.astype(np.int32)}

  def index_batch(self, step: int) -> Dict[str, np.ndarray]:
    return {"index": self.pipe.local_indices(
        *divmod(step, self.steps_per_epoch)).astype(np.int32)}

  def close(self):
    pass


class _GrainTrain:
  """Train batches from the ImageNet grain pipeline (host crops)."""

  def __init__(self, pipe):
    self.pipe = pipe
    self.steps_per_epoch = pipe.steps_per_epoch
    self.num_examples = pipe.num_examples
    self.labels = None  # not in memory (CRD's class negatives need them)
    self._it = None
    self._next = None

  def _seek(self, step):
    if self._it is None or self._next != step:
      pos = {"epoch": step // self.steps_per_epoch,
             "step": step % self.steps_per_epoch}
      if self._it is None:
        self._it = self.pipe.iterator(pos)
      else:
        self._it.set_state(pos)
      self._next = step

  def chunk(self, step: int, n: int) -> Dict[str, np.ndarray]:
    self._seek(step)
    out = self._it.next_chunk(n)
    self._next = step + n
    return out

  def batch(self, step: int) -> Dict[str, np.ndarray]:
    self._seek(step)
    out = next(self._it)
    self._next = step + 1
    return out

  def close(self):
    if self._it is not None:
      self._it.close()
      self._it = None


@dataclasses.dataclass
class _Data:
  info: sources_lib.DatasetInfo
  train: Any                      # _InMemoryTrain | _GrainTrain
  eval_pipe: Any
  image_shape: Tuple[int, int, int]
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  crop_padding: Optional[int]     # on-device augmentation (in-memory data)
  flip: bool
  host_teacher_view: bool = False  # the pipeline emits `teacher_image`

  def eval_batches(self):
    if isinstance(self.eval_pipe, pipeline_lib.InMemoryPipeline):
      yield from self.eval_pipe.epoch(0)
      return
    it = self.eval_pipe.iterator(num_epochs=1)
    try:
      yield from it
    finally:
      it.close()

  def close(self):
    self.train.close()


def _mock_arrays(name: str, split: str, n: int):
  """Arrays from TFDS `mock_data` (random records; never the network)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  info = sources_lib.dataset_info(name)
  with tfds.testing.mock_data(num_examples=n):
    src = tfds.data_source(name, split=split)
    recs = [src[i] for i in range(len(src))]
  images = np.stack([np.asarray(r["image"], np.uint8) for r in recs])
  labels = np.asarray([int(r["label"]) % info.num_classes for r in recs],
                      np.int32)
  return images, labels


def _load_data(config) -> _Data:
  """Train/eval pipelines. Call inside `tfds.testing.mock_data` for mocks."""
  name = config.data.name
  info = sources_lib.dataset_info(name)
  data_dir = config.data.data_dir or None
  cache_dir = config.data.cache_dir or None
  bs = config.train.batch_size
  if not info.in_memory:
    return _load_grain_data(config, info)
  if config.data.mock:
    n = int(config.data.mock_num_examples)
    tr = _mock_arrays(name, info.train_split, n)
    ev = _mock_arrays(name, info.eval_split, n)
  else:
    tr = sources_lib.load_arrays(name, info.train_split, data_dir=data_dir,
                                 cache_dir=cache_dir)
    ev = sources_lib.load_arrays(name, info.eval_split, data_dir=data_dir,
                                 cache_dir=cache_dir)
  if config.data.train_subset:
    tr = (tr[0][:config.data.train_subset], tr[1][:config.data.train_subset])
  if config.data.eval_subset:
    ev = (ev[0][:config.data.eval_subset], ev[1][:config.data.eval_subset])
  augment = _augments(config, info)
  if tr[0].shape[0] < bs:
    raise ConfigError("train.batch_size", f"{bs} exceeds the "
                      f"{tr[0].shape[0]} training examples.")
  train = pipeline_lib.InMemoryPipeline(
      tr[0], tr[1], global_batch_size=bs, seed=config.seed, shuffle=True,
      drop_remainder=True, with_index=True, mean=info.mean, std=info.std)
  evalp = pipeline_lib.InMemoryPipeline(
      ev[0], ev[1], global_batch_size=config.train.eval_batch_size, seed=0,
      shuffle=False, drop_remainder=False, with_index=False, mean=info.mean,
      std=info.std)
  return _Data(info=info, train=_InMemoryTrain(train), eval_pipe=evalp,
               image_shape=tuple(tr[0].shape[1:]), mean=info.mean,
               std=info.std,
               crop_padding=info.crop_padding if augment else None,
               flip=info.flip and augment)


def _load_grain_data(config, info) -> _Data:
  """ImageNet: grain pipeline, per-record decode + crop in worker processes."""
  from kd_jax.data import imagenet as imagenet_lib  # pylint: disable=g-import-not-at-top
  mock = bool(config.data.mock)
  size = int(config.data.image_size)
  common = dict(
      data_dir=config.data.data_dir or None, decode_in_tfds=mock,
      image_size=size, resize_size=max(size, int(round(size * 256 / 224))),
      num_workers=0 if mock else int(config.data.num_workers),
      mean=info.mean, std=info.std)
  separate = (config.mode == "distill"
              and config.data.teacher_view == "separate")
  train = imagenet_lib.imagenet_pipeline(
      info.train_split, global_batch_size=config.train.batch_size, train=True,
      seed=config.seed, with_index=True, separate_teacher_view=separate,
      num_examples=config.data.train_subset or None, **common)
  evalp = imagenet_lib.imagenet_pipeline(
      info.eval_split, global_batch_size=config.train.eval_batch_size,
      train=False, num_examples=config.data.eval_subset or None, **common)
  return _Data(info=info, train=_GrainTrain(train), eval_pipe=evalp,
               image_shape=(size, size, 3), mean=info.mean, std=info.std,
               crop_padding=None, flip=False, host_teacher_view=separate)


def make_train_preprocess(data: _Data, *, steps_per_epoch: int,
                          separate_teacher_view: bool = False) -> Callable:
  """`fn(state, batch) -> batch`: augmentation + normalization on device.

  Per-example keys `fold_in(fold_in(fold_in(state.rng, AUG), epoch), index)`
  (epoch = `state.step // steps_per_epoch`), so a batch's augmentation is a
  pure function of the example, the epoch and the run's RNG -- independent
  of the device count, the chunking and of resumes.
  """
  def preprocess(state, batch):
    epoch = state.step // steps_per_epoch
    return _augment_batch(data, jax.random.fold_in(state.rng, _AUG_TAG),
                          epoch, batch, separate_teacher_view)

  return preprocess


def make_stage_preprocess(data: _Data, rng) -> Callable:
  """`fn(batch) -> batch` for a distiller's pretrain stage: the batch carries
  its epoch as `aug_epoch` (int32 `[B]`); keys as in `make_train_preprocess`
  from `rng`."""

  def preprocess(batch):
    batch = dict(batch)
    epoch = batch.pop("aug_epoch")[0]
    return _augment_batch(data, rng, epoch, batch, False)

  return preprocess


def _augment_batch(data: _Data, rng, epoch, batch, separate_teacher_view):
  """Per-example crop/flip (keys `fold_in(fold_in(rng, epoch), index)`) and
  normalization of `batch['image']` (and of a host-made `teacher_image`)."""
  mean, std = data.mean, data.std
  pad, flip = data.crop_padding, data.flip
  augments = bool(pad) or flip

  def view(keys, images):
    if augments and keys is not None:
      images = jax.vmap(lambda k, x: augment_lib.random_crop_flip(
          k, x[None], padding=pad, flip=flip)[0])(keys, images)
    return augment_lib.normalize(images, mean, std)

  batch = dict(batch)
  keys = None
  if augments:
    base = jax.random.fold_in(rng, epoch)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(batch["index"])
  images = batch["image"]
  batch["image"] = view(keys, images)
  if "teacher_image" in batch:  # the host pipeline made the teacher's view
    batch["teacher_image"] = view(None, batch["teacher_image"])
  elif separate_teacher_view:
    tkeys = (None if keys is None
             else jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys))
    batch["teacher_image"] = view(tkeys, images)
  return batch


def _eval_preprocess(data: _Data) -> Callable:
  def preprocess(batch):
    batch = dict(batch)
    batch["image"] = augment_lib.normalize(batch["image"], data.mean, data.std)
    return batch
  return preprocess


# ---------------------------------------------------------------------------
# Optimizer.


def make_optimizer(opt_cfg, *, steps_per_epoch: int, total_steps: int
                   ) -> Tuple[optax.GradientTransformation, Callable]:
  """optax transformation + LR schedule (in steps) from `config.optimizer`.

  `step`: LR × `decay_factor` after each of `decay_epochs` (mdistiller's
  `adjust_learning_rate`: epoch e (1-based) uses
  `lr * factor ** #{d : e > d}`); `cosine`: cosine decay to 0 over the run;
  optional linear warm-up over `warmup_epochs`. Weight decay is PyTorch's
  coupled L2 (`grad += wd * param`) for sgd/adam, decoupled for adamw.
  """
  lr = float(opt_cfg.learning_rate)
  if opt_cfg.schedule == "constant":
    sched = optax.constant_schedule(lr)
  elif opt_cfg.schedule == "step":
    bounds = {int(e) * steps_per_epoch: float(opt_cfg.decay_factor)
              for e in opt_cfg.decay_epochs}
    sched = optax.piecewise_constant_schedule(lr, bounds)
  else:
    sched = optax.cosine_decay_schedule(lr, max(total_steps, 1))
  warm = int(round(float(opt_cfg.get("warmup_epochs", 0) or 0)
                   * steps_per_epoch))
  if warm > 0:
    sched = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warm), sched], [warm])
  wd = float(opt_cfg.get("weight_decay", 0.0) or 0.0)
  if opt_cfg.name == "sgd":
    tx = optax.sgd(sched, momentum=float(opt_cfg.momentum) or None,
                   nesterov=bool(opt_cfg.nesterov))
  elif opt_cfg.name == "adam":
    tx = optax.adam(sched)
  else:
    tx = optax.adamw(sched, weight_decay=wd)
    wd = 0.0
  if wd:
    tx = optax.chain(optax.add_decayed_weights(wd), tx)
  return tx, sched


# ---------------------------------------------------------------------------
# Checkpoint <-> state.

_STATE_FIELDS = ("step", "params", "batch_stats", "opt_state",
                 "distiller_params", "distiller_state", "rng")


def _state_to_tree(host_state: state_lib.TrainState) -> Dict[str, Any]:
  return {f: getattr(host_state, f) for f in _STATE_FIELDS}


def _to_host(tree):
  """An un-replicated device pytree -> NumPy (PRNG keys as key data)."""
  def get(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype,
                                                   jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)
  return jax.tree_util.tree_map(get, tree)


def _tree_to_state(tree: Mapping[str, Any], impl) -> state_lib.TrainState:
  d = dict(tree)
  d["rng"] = jax.random.wrap_key_data(jnp.asarray(d["rng"]), impl=impl)
  return state_lib.TrainState(**d)


# ---------------------------------------------------------------------------
# Compiled programs, memoized across phases/seeds of one process (the programs
# do not depend on the seed: it only enters through the state and the data).

_PROGRAMS: Dict[str, Any] = {}


def _program_key(config, extra) -> str:
  parts = {k: config[k].to_dict() for k in ("model", "loss", "optimizer")}
  parts["teacher"] = {k: v for k, v in config.teacher.to_dict().items()
                      if k not in ("checkpoint",)}
  parts["data"] = {k: config.data[k] for k in ("name", "augment",
                                               "teacher_view")}
  parts["train"] = {k: config.train[k] for k in
                    ("batch_size", "eval_batch_size", "parallel",
                     "num_devices")}
  parts["mode"] = config.mode
  parts["extra"] = extra
  return json.dumps(parts, sort_keys=True, default=str)


def clear_program_cache():
  _PROGRAMS.clear()


# ---------------------------------------------------------------------------
# The run.


def _resolve_dtype(name):
  return DTYPES[name]


def _init_variables(model, rng, image_shape):
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  return model.init({"params": rng, "dropout": jax.random.fold_in(rng, 1)},
                    x, train=False)


def _teacher_variables(config, teacher, image_shape, rng):
  abstract = jax.eval_shape(lambda r: _init_variables(teacher, r, image_shape),
                            rng)
  path = config.teacher.checkpoint
  if not path:
    logging.warning("debug run: distilling from a randomly initialized "
                    "teacher (no teacher.checkpoint).")
    return jax.jit(lambda r: _init_variables(teacher, r, image_shape),
                   compiler_options=_INIT_COMPILER_OPTIONS)(
                       jax.random.fold_in(rng, 7))
  path = os.path.abspath(path)
  ck_dir = os.path.join(path, "checkpoints")
  if config.teacher.checkpoint_format == "orbax" and os.path.isdir(ck_dir):
    path = ck_dir  # a teacher-training run's workdir
  try:
    if config.teacher.checkpoint_format == "torch":
      # A .pth / .npz state_dict of the reference PyTorch definition.
      from kd_jax.models import convert  # pylint: disable=g-import-not-at-top
      sd = convert.unwrap_state_dict(convert.load_torch_checkpoint(path))
      tv = convert.from_torch_state_dict(
          config.teacher.name, sd, num_classes=config.teacher.num_classes)
      ckpt_lib.check_tree_matches(abstract, tv,
                                  what=f"converted teacher {path!r}")
      return tv
    return ckpt_lib.load_teacher_variables(path, abstract)
  except (ckpt_lib.CheckpointError, FileNotFoundError, ValueError) as e:
    raise ConfigError("teacher.checkpoint", str(e)) from None


def _weighted_eval(metrics_list: List[Dict[str, np.ndarray]]) -> Dict[str, float]:
  tot = sum(float(m["count"]) for m in metrics_list)
  out = {}
  for k in ("loss", "top1", "top5"):
    out[k] = (sum(float(m[k]) * float(m["count"]) for m in metrics_list)
              / max(tot, 1.0))
  out["count"] = tot
  return out


class _Progress:
  """tqdm bar (or nothing) with examples/s."""

  def __init__(self, enabled, total, initial, desc):
    self._bar = None
    if enabled:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                       dynamic_ncols=True, leave=False)

  def update(self, n, **postfix):
    if self._bar is not None:
      self._bar.update(n)
      if postfix:
        self._bar.set_postfix(postfix, refresh=False)

  def close(self):
    if self._bar is not None:
      self._bar.close()


def _distiller_init_fn(objective, student, teacher, teacher_vars, tx, data,
                       *, jit: bool = True):
  """`init_state(init_rng, state_rng)` for objectives with distiller terms:
  the student's variables, then the distillers' params/state from a first
  (normalized, un-augmented) batch through both networks."""
  from kd_jax import distillers as distillers_lib  # pylint: disable=g-import-not-at-top
  def maybe_jit(f):  # (no jit when traced by a dry run's eval_shape)
    return (jax.jit(f, compiler_options=_INIT_COMPILER_OPTIONS) if jit
            else f)
  init_vars = maybe_jit(lambda r: _init_variables(student, r,
                                                  data.image_shape))

  def dinit(v, tv, batch, r):
    return distillers_lib.init_distillers(
        objective, r, student_apply=student, teacher_apply=teacher,
        student_variables=v, teacher_variables=tv, batch=batch,
        preprocess=_eval_preprocess(data))
  dinit = maybe_jit(dinit)

  def make_state(v, dparams, dstate, r):
    return state_lib.create_train_state(v, tx, rng=r, distiller_params=dparams,
                                        distiller_state=dstate)
  make_state = maybe_jit(make_state)

  def init_state(init_rng, state_rng, tvars=None):
    v = init_vars(init_rng)
    first = {k: val for k, val in data.train.batch(0).items()
             if k != "teacher_image"}
    dparams, dstate = dinit(v, teacher_vars if tvars is None else tvars,
                            first, jax.random.fold_in(init_rng, 99))
    return make_state(v, dparams, dstate, state_rng)

  init_state.takes_teacher_vars = True
  return init_state


def _run_pretrain_stages(config, data, objective, student, teacher,
                         teacher_vars, state, spe, writer):
  """Runs the initialization stage of every distiller that has one (AB, FT,
  FSP, optionally FitNets) before the main training, on one device; returns
  the updated state and `{label: {'steps', 'first_loss', 'last_loss'}}`.

  Stage `s` uses the train batches of global steps `0..epochs*spe-1` (capped
  by `train.pretrain_max_steps` when > 0), the run's augmentation, and the
  configured optimizer with a constant LR (`stage.learning_rate` or
  `optimizer.learning_rate`). Not checkpointed: a run killed during a stage
  redoes it; a resumed run (step > 0) skips it (its result is in the state).
  """
  from kd_jax import distillers as distillers_lib  # pylint: disable=g-import-not-at-top
  info = {}
  for i, term in enumerate(objective.distiller_terms):
    stage = getattr(term.distiller, "pretrain", None)
    if stage is None or not stage.epochs:
      continue
    n = int(stage.epochs) * spe
    cap = int(config.train.get("pretrain_max_steps", 0) or 0)
    if cap:
      n = min(n, cap)
    ocfg = ml_collections.ConfigDict(config.optimizer.to_dict())
    ocfg.learning_rate = float(stage.learning_rate
                               or config.optimizer.learning_rate)
    ocfg.schedule, ocfg.warmup_epochs = "constant", 0
    stx, _ = make_optimizer(ocfg, steps_per_epoch=spe, total_steps=n)
    key = jax.random.fold_in(state.rng, 0x5747 + i)

    def batches():
      for g in range(n):
        b = {k: v for k, v in data.train.batch(g).items()
             if k != "teacher_image"}
        b["aug_epoch"] = np.full(b["label"].shape, g // spe, np.int32)
        yield b

    sv, mp, ms, losses = distillers_lib.run_pretrain_stage(
        stage, term.label, student_apply=student, teacher_apply=teacher,
        student_variables=state.variables, teacher_variables=teacher_vars,
        distiller_params=state.distiller_params[term.label],
        distiller_state=state.distiller_state[term.label], tx=stx,
        batches=batches(), rng=key,
        preprocess=make_stage_preprocess(data, jax.random.fold_in(key, 1)))
    state = state.replace(
        params=sv["params"], batch_stats=sv.get("batch_stats",
                                                state.batch_stats),
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


def _shape_tree(tree):
  return jax.tree_util.tree_map(lambda x: tuple(x.shape), tree)


def _dry_run(config, data, dp, init_state, train_step, eval_step, init_rng,
             state_rng, teacher_vars, precompute, spc, total_steps, timings,
             tick, on_device):
  """Traces init / train / eval programs with `jax.eval_shape` (no compile)."""
  distill = config.mode == "distill"
  abstract_tv = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), teacher_vars)
  if distill and getattr(init_state, "takes_teacher_vars", False):
    st = jax.eval_shape(init_state, init_rng, state_rng, abstract_tv)
  else:
    st = jax.eval_shape(init_state, init_rng, state_rng)
  n = min(spc, data.train.steps_per_epoch, total_steps)
  fn = steps_lib.make_multi_step(train_step)
  consts = {}
  if distill:
    tv = teacher_vars
    if precompute:
      tv = jax.ShapeDtypeStruct((data.train.num_examples,
                                 config.teacher.num_classes), jnp.float32)
    consts["teacher"] = tv
  if on_device:
    consts["data"] = {"image": data.train.images, "label": data.train.labels}
    batch = data.train.index_chunk(0, n)
  else:
    batch = data.train.chunk(0, n)
  tv = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), consts)
  eval_batch = next(iter(data.eval_batches()))
  if dp.mode == "pmap":
    k = dp.num_devices

    def split(x, axis):
      x = np.asarray(x)
      sh = x.shape
      x = x.reshape(sh[:axis] + (k, sh[axis] // k) + sh[axis + 1:])
      return np.moveaxis(x, axis, 0)

    batch = jax.tree_util.tree_map(lambda x: split(x, 1), batch)
    eval_batch = jax.tree_util.tree_map(lambda x: split(x, 0), eval_batch)
    fn = jax.vmap(fn, in_axes=(None, None, 0), axis_name=dp._axis)  # pylint: disable=protected-access
    eval_step = jax.vmap(eval_step, in_axes=(None, 0), axis_name=dp._axis)  # pylint: disable=protected-access
  _, metrics = jax.eval_shape(fn, st, tv, batch)
  eval_metrics = jax.eval_shape(eval_step, st, eval_batch)
  tick("traced")
  n_params = sum(int(np.prod(x.shape))
                 for x in jax.tree_util.tree_leaves(st.params))
  n_dparams = sum(int(np.prod(x.shape))
                  for x in jax.tree_util.tree_leaves(st.distiller_params))
  return {"dry_run": True, "mode": config.mode, "model": config.model.name,
          "teacher": config.teacher.name if distill else None,
          "num_params": n_params, "num_distiller_params": n_dparams,
          "steps": total_steps,
          "steps_per_epoch": data.train.steps_per_epoch,
          "metrics": _shape_tree(metrics),
          "eval_metrics": _shape_tree(eval_metrics), "timings": timings}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       dry_run: bool = False) -> Dict[str, Any]:
  """Runs one train / distill phase; returns (and writes) its report.

  Resumes from `<workdir>/checkpoints` when it holds a finalized checkpoint.

  `dry_run=True` does everything up to the first step -- validation, data
  loading, model/teacher/optimizer construction, building the step, eval
  and init programs -- and then traces them with `jax.eval_shape` on a real
  batch instead of compiling and running them: a cheap check that a config
  is consistent end to end. Returns `{'dry_run': True, 'metrics': {name:
  shape}, ...}` and writes nothing but `config.json`.
  """
  t_start = time.perf_counter()
  timings: Dict[str, float] = {}

  def tick(name):
    timings[name] = round(time.perf_counter() - t_start, 3)

  config = apply_debug(config)
  validate_config(config)
  if config.mode == "seed_experiment":
    raise ConfigError("mode", "use experiments.seed_experiment for mode "
                      "'seed_experiment'.")
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  with contextlib.ExitStack() as stack:
    if (config.data.mock
        and not sources_lib.dataset_info(config.data.name).in_memory):
      # Streaming pipelines read records lazily: keep the mock active.
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      stack.enter_context(tfds.testing.mock_data(
          num_examples=int(config.data.mock_num_examples)))
    data = _load_data(config)
    stack.callback(data.close)
    tick("data_loaded")
    return _run(config, workdir, data, dry_run=dry_run, timings=timings,
                tick=tick, t_start=t_start)


def _run(config, workdir, data, *, dry_run, timings, tick, t_start):
  """The body of `train_and_evaluate` once the data are loaded."""
  distill = config.mode == "distill"
  spe = data.train.steps_per_epoch
  total_steps = (int(config.train.num_steps) if config.train.num_steps
                 else int(config.train.num_epochs) * spe)

  dp = parallel_lib.DataParallel(
      PARALLEL[config.train.parallel],
      devices=(None if not config.train.num_devices or
               PARALLEL[config.train.parallel] == "single"
               else (jax.local_devices() if config.train.parallel == "pmap"
                     else jax.devices())[:config.train.num_devices]))

  student = models_lib.create(config.model.name,
                              num_classes=config.model.num_classes,
                              dtype=_resolve_dtype(config.model.dtype))
  rng = jax.random.key(int(config.seed))
  init_rng, state_rng, teacher_rng = jax.random.split(rng, 3)
  has_distillers = bool(objective_from_loss_config(config.loss).distiller_terms)
  tx, schedule = make_optimizer(config.optimizer, steps_per_epoch=spe,
                                total_steps=total_steps)

  teacher = teacher_vars = None
  teacher_acc = None
  precompute = distill and bool(config.teacher.precompute_logits)
  separate = distill and config.data.teacher_view == "separate"
  if distill:
    teacher = models_lib.create(config.teacher.name,
                                num_classes=config.teacher.num_classes,
                                dtype=_resolve_dtype(config.teacher.dtype))
    if dry_run and not config.teacher.checkpoint:
      teacher_vars = jax.eval_shape(
          lambda r: _init_variables(teacher, r, data.image_shape), teacher_rng)
    else:
      teacher_vars = _teacher_variables(config, teacher, data.image_shape,
                                        teacher_rng)
  # Distiller terms get what only the run knows (CRD: the training-set size
  # and labels; OFD: the teacher's BN parameters).
  # (A dry run has abstract teacher variables: OFD then estimates its margins
  # from data instead of the teacher's BN parameters.)
  abstract_teacher = dry_run and not config.teacher.checkpoint
  objective = objective_from_loss_config(
      config.loss, num_data=data.train.num_examples,
      dataset_labels=data.train.labels,
      teacher_variables=None if abstract_teacher else teacher_vars,
      placeholders=abstract_teacher)

  # ---- programs ----------------------------------------------------------
  spc = int(config.train.steps_per_call)
  # In-memory datasets are put on device once; the host then sends only the
  # example indices of each chunk and the gather runs inside the program.
  on_device = (bool(config.data.get("on_device", True))
               and isinstance(data.train, _InMemoryTrain))
  pkey = _program_key(config, {"spe": spe, "total": total_steps,
                               "precompute": precompute,
                               "shape": data.image_shape,
                               "pad": data.crop_padding, "flip": data.flip,
                               "spc": spc, "ndev": dp.num_devices,
                               "on_device": on_device})
  if has_distillers:
    # Their constants (CRD labels, OFD margins) depend on the data and the
    # teacher: do not share programs between runs.
    pkey = None
  progs = _PROGRAMS.get(pkey) if pkey is not None else None
  if progs is None:
    if not has_distillers:
      def init_state(init_rng, state_rng):
        variables = _init_variables(student, init_rng, data.image_shape)
        return state_lib.create_train_state(variables, tx, rng=state_rng)
      init_state = jax.jit(init_state, compiler_options=_INIT_COMPILER_OPTIONS)
    else:
      init_state = _distiller_init_fn(objective, student, teacher,
                                      teacher_vars, tx, data,
                                      jit=not dry_run)

    preprocess = make_train_preprocess(data, steps_per_epoch=spe,
                                       separate_teacher_view=separate)
    if distill:
      inner_teacher = None if (precompute or separate) else teacher
      inner = steps_lib.make_distill_step(
          student, inner_teacher, objective, tx, axis_name=dp.axis_name,
          steps_per_epoch=spe)

    else:
      inner_train = steps_lib.make_train_step(
          student, tx, objective=objective, axis_name=dp.axis_name)

    def train_step(st, consts, batch):
      """`consts`: {'teacher': variables | logits table, 'data': the
      device-resident dataset} (replicated); `batch`: host data, or just
      the example indices when the dataset lives on device."""
      if "data" in consts:
        idx = batch["index"]
        batch = {"image": consts["data"]["image"][idx],
                 "label": consts["data"]["label"][idx], "index": idx}
      batch = preprocess(st, batch)
      if not distill:
        return inner_train(st, batch)
      tv = consts["teacher"]
      if precompute:
        batch["teacher_logits"] = tv[batch["index"]]
        tv = None
      elif separate:
        logits, _ = steps_lib.teacher_forward(teacher, tv,
                                              batch.pop("teacher_image"))
        batch["teacher_logits"] = logits
        tv = None
      return inner(st, tv, batch)

    compiled_multi = dp.compile(steps_lib.make_multi_step(train_step),
                                stacked=True)
    compiled_single = dp.compile(train_step, stacked=False)
    eval_fn = dp.compile(
        steps_lib.make_eval_step(student, axis_name=dp.axis_name,
                                 preprocess=_eval_preprocess(data)),
        stacked=False, donate_state=False)
    teacher_eval_fn = None
    if distill:
      teacher_eval_fn = dp.compile(
          steps_lib.make_eval_step(teacher, axis_name=dp.axis_name,
                                   preprocess=_eval_preprocess(data)),
          stacked=False, donate_state=False)
    eval_step = steps_lib.make_eval_step(student, axis_name=dp.axis_name,
                                         preprocess=_eval_preprocess(data))
    progs = (init_state, compiled_multi, compiled_single, eval_fn,
             teacher_eval_fn, train_step, eval_step)
    if pkey is not None:
      _PROGRAMS[pkey] = progs
  (init_state, compiled_multi, compiled_single, eval_fn, teacher_eval_fn,
   raw_train_step, raw_eval_step) = progs
  if dry_run:
    return _dry_run(config, data, dp, init_state, raw_train_step,
                    raw_eval_step, init_rng, state_rng, teacher_vars,
                    precompute, spc, total_steps, timings, tick,
                    on_device)
  state = init_state(init_rng, state_rng)
  key_impl = jax.random.key_impl(state.rng)
  tick("state_initialized")

  def evaluate(fn, variables_dev):
    outs = []
    for b in data.eval_batches():
      outs.append(fn(variables_dev, dp.shard_batch(b)))
    return _weighted_eval([dp.fetch(o) for o in outs])

  # ---- teacher (and the dataset) on device, once ------------------------
  tv_dev = None
  data_dev = None
  if on_device:
    data_dev = dp.replicate({"image": data.train.images,
                             "label": data.train.labels})
  if distill:
    tv_dev = dp.replicate(teacher_vars)
    if config.teacher.get("evaluate", True):
      teacher_acc = evaluate(teacher_eval_fn, tv_dev)["top1"]
    if precompute:
      logits = steps_lib.precompute_teacher_logits(
          teacher, teacher_vars, data.train.images,  # in-memory (validated)
          batch_size=max(config.train.eval_batch_size, 256),
          preprocess=lambda x: augment_lib.normalize(x, data.mean, data.std))
      tv_dev = dp.replicate(jnp.asarray(logits, jnp.float32))
    tick("teacher_ready")

  # ---- checkpoints / resume ----------------------------------------------
  ck_cfg = config.checkpoint
  mgr = None
  start_step = 0
  if ck_cfg.enabled:
    mgr = ckpt_lib.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        save_every_steps=None, keep_last=int(ck_cfg.keep),
        keep_best=1 if ck_cfg.keep_best else 0, best_metric="accuracy",
        async_save=bool(ck_cfg.async_save))
    template = _state_to_tree(_to_host(state))
    restored = mgr.restore(template)
    if restored is not None:
      state = _tree_to_state(jax.device_get(restored.state), key_impl)
      start_step = int(restored.step)
      if int(state.step) != start_step:
        raise ckpt_lib.CheckpointError(
            f"checkpoint step {start_step} holds a state at step "
            f"{int(state.step)}.")
      logging.info("resumed from step %d", start_step)
  writer = metrics_io.MetricsWriter(
      workdir, tensorboard=True,
      resume_step=start_step if start_step else None)
  pretrain_info = {}
  if has_distillers and start_step == 0:
    state, pretrain_info = _run_pretrain_stages(
        config, data, objective, student, teacher, teacher_vars, state, spe,
        writer)
    if pretrain_info:
      tick("pretrain_done")
  prior = [r for r in metrics_io.read_jsonl(writer.path)
           if r.get("split") == "eval"]
  evals: List[Dict[str, Any]] = list(prior)

  state_dev = dp.replicate(state)
  del state
  consts_dev = {}
  if distill:
    consts_dev["teacher"] = tv_dev
  if on_device:
    consts_dev["data"] = data_dev
  tick("train_start")

  def save(step, st_dev, metrics=None, force=True):
    if mgr is None:
      return
    host = dp.fetch(st_dev)
    mgr.save(step, _state_to_tree(host),
             data_state={"epoch": step // spe, "step": step % spe},
             metrics=metrics, force=force)

  # ---- train -------------------------------------------------------------
  bs = config.train.batch_size
  progress = _Progress(bool(config.train.progress_bar), total_steps,
                       start_step, f"{config.mode} {config.model.name}")
  step = start_step
  pending: List[Tuple[int, Any, int]] = []  # (n_steps, metrics, end step)
  log_every = max(int(config.train.log_every_steps), 1)
  last_log = start_step
  ck_every = int(ck_cfg.every_steps or 0)
  last_ck = start_step
  # Timing: the loop's wall time minus evaluation = train time (data
  # gathering, transfers, compilation of the first call, checkpoint saves
  # included); "steady" also excludes the first call (compilation) and the
  # checkpoint saves. Work is dispatched asynchronously; the clocks are read
  # after blocking on the device.
  eval_time = 0.0
  ckpt_time = 0.0
  first_call_s = None
  first_steps = 0
  t_loop = time.perf_counter()
  t_first_end = None
  overhead_after_first = 0.0

  def flush_logs(keep_last: bool = False):
    """Writes the mean train metrics of the pending chunks. With `keep_last`
    the most recently dispatched chunk stays pending, so fetching the others
    does not idle the device (the host waits for chunk k-1 while chunk k
    runs)."""
    nonlocal pending
    todo = pending[:-1] if keep_last else pending
    if not todo:
      return
    pending = pending[len(todo):]
    upto_step = todo[-1][2]
    ms = [(n, dp.fetch(m)) for n, m, _ in todo]
    agg: Dict[str, float] = {}
    tot = 0
    for n, m in ms:
      for k, v in m.items():
        v = np.asarray(v, np.float64)
        agg[k] = agg.get(k, 0.0) + float(v.sum() if v.ndim else v * n)
      tot += n
    rec = {k: v / tot for k, v in agg.items()}
    rec["lr"] = float(schedule(max(upto_step - 1, 0)))
    writer.write(upto_step, rec, split="train", epoch=upto_step / spe)

  def timed_save(step, st_dev, metrics=None):
    nonlocal ckpt_time, overhead_after_first
    tc = time.perf_counter()
    save(step, st_dev, metrics=metrics)
    dt = time.perf_counter() - tc
    ckpt_time += dt
    if t_first_end is not None:
      overhead_after_first += dt

  try:
    while step < total_steps:
      epoch, in_epoch = divmod(step, spe)
      n = min(spc, spe - in_epoch, total_steps - step)
      if n == 1 and spc == 1:
        batch = (data.train.index_batch(step) if on_device
                 else data.train.batch(step))
        fn = compiled_single
      else:
        batch = (data.train.index_chunk(step, n) if on_device
                 else data.train.chunk(step, n))
        fn = compiled_multi
      batch = dp.shard_batch(batch, stacked=fn is compiled_multi)
      state_dev, m = fn(state_dev, consts_dev, batch)
      if first_call_s is None:
        jax.block_until_ready(m)
        t_first_end = time.perf_counter()
        first_call_s = t_first_end - t_loop
        first_steps = n
      step += n
      pending.append((n, m, step))
      elapsed = time.perf_counter() - t_loop - eval_time
      progress.update(n, ex_per_s=f"{(step - start_step) * bs / elapsed:.0f}")
      epoch_end = step % spe == 0 or step == total_steps
      if epoch_end:
        flush_logs()
        last_log = step
      elif step - last_log >= log_every and len(pending) > 1:
        flush_logs(keep_last=True)
        last_log = pending[0][2] - pending[0][0]
      if epoch_end:
        cur_epoch = math.ceil(step / spe)
        if (cur_epoch % max(int(config.train.eval_every_epochs), 1) == 0
            or step == total_steps):
          jax.block_until_ready(state_dev)
          te = time.perf_counter()
          ev = evaluate(eval_fn, state_dev)
          dt = time.perf_counter() - te
          eval_time += dt
          overhead_after_first += dt
          rec = {"step": step, "epoch": step / spe, **ev}
          evals.append(rec)
          writer.write(step, ev, split="eval", epoch=step / spe)
          timed_save(step, state_dev, metrics={"accuracy": ev["top1"]})
          last_ck = step
        elif ck_cfg.every_epochs and cur_epoch % int(ck_cfg.every_epochs) == 0:
          timed_save(step, state_dev)
          last_ck = step
      elif ck_every and step // ck_every > last_ck // ck_every:
        timed_save(step, state_dev)
        last_ck = step
    jax.block_until_ready(state_dev)
    t_end = time.perf_counter()
    if step > last_ck:
      timed_save(step, state_dev)
  finally:
    progress.close()
    flush_logs()
    writer.close()
    if mgr is not None:
      mgr.close()

  tick("train_end")
  final_state = dp.fetch(state_dev)
  records = metrics_io.read_jsonl(os.path.join(workdir,
                                               metrics_io.METRICS_FILE))
  title = (f"{config.mode}: {config.model.name}"
           + (f" <- {config.teacher.name}" if distill else ""))
  try:
    metrics_io.plot_curves(records, os.path.join(workdir, metrics_io.PLOT_FILE),
                           title=title)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("could not plot curves: %s", e)
  last = evals[-1] if evals else None
  best = max(evals, key=lambda r: r["top1"]) if evals else None
  trained = total_steps - start_step
  train_time = (t_end - t_loop - eval_time) if trained else 0.0
  steady_steps = trained - first_steps
  steady_time = ((t_end - t_first_end - overhead_after_first)
                 if t_first_end is not None else 0.0)
  steady_eps = (steady_steps * bs / steady_time
                if steady_steps > 0 and steady_time > 0 else None)
  report = {
      "mode": config.mode,
      "model": config.model.name,
      "teacher": config.teacher.name if distill else None,
      "dataset": config.data.name,
      "seed": int(config.seed),
      "steps": int(total_steps),
      "epochs": total_steps / spe,
      "resumed_from_step": int(start_step),
      "batch_size": int(bs),
      "parallel": config.train.parallel,
      "num_devices": dp.num_devices,
      "steps_per_call": spc,
      "last_top1": last["top1"] if last else None,
      "last_top5": last["top5"] if last else None,
      "last_loss": last["loss"] if last else None,
      "best_top1": best["top1"] if best else None,
      "best_epoch": best["epoch"] if best else None,
      "teacher_top1": teacher_acc,
      "wall_s": time.perf_counter() - t_start,
      "train_s": train_time,
      "eval_s": eval_time,
      "checkpoint_s": ckpt_time,
      "first_call_s": first_call_s,
      "examples_per_sec": (trained * bs / train_time if train_time else None),
      "steady_examples_per_sec": steady_eps,
      "pretrain": pretrain_info or None,
      "paper": config.report.paper.to_dict(),
      "notes": config.report.notes,
      "convention": "last_top1: after the final epoch; best_top1: max over "
                    "evaluated epochs (test set)",
  }
  tick("done")
  report["timings"] = timings
  metrics_io.write_json(os.path.join(workdir, "report.json"), report)
  report["_final_state"] = final_state
  return report
