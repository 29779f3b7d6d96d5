"""Batches: the datasets of a run and what the compiled step receives.

* In-memory datasets (MNIST / CIFAR): decoded once (`kd_jax.data`); batches
  of global steps are gathered on the host in chunks of
  `train.steps_per_call`, or -- with `data.on_device` -- the split is put on
  the devices once and the host sends only the example indices.
* ImageNet: the grain pipeline (host crops in worker processes).

On device, `kd_jax.data.augment.augment_batch` augments with per-example keys
`fold_in(fold_in(fold_in(rng, AUG_TAG), epoch), example_index)`, so a batch's
views do not depend on the number of devices or on where a run was resumed.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import numpy as np

from kd_jax.data import augment as augment_lib
from kd_jax.data import pipeline as pipeline_lib
from kd_jax.data import sources as sources_lib
from kd_jax.data import views as views_lib
from kd_jax.data import subsets as subsets_lib
from kd_jax.train import steps as steps_lib
from kd_jax.trainer import classify_config
from kd_jax.trainer.errors import ConfigError


class InMemoryFeed:
  """Train batches gathered from in-memory arrays (MNIST / CIFAR)."""

  def __init__(self, pipe: pipeline_lib.InMemoryPipeline):
    self.pipe = pipe
    self.steps_per_epoch = pipe.steps_per_epoch
    self.num_examples = pipe.num_examples
    self.images = pipe.images
    self.labels = pipe.labels

  def _indices(self, step: int, n: int) -> np.ndarray:
    spe = self.steps_per_epoch
    return np.stack([self.pipe.local_indices(*divmod(step + j, spe))
                     for j in range(n)])

  def _pair_indices(self, step: int, n: int) -> Optional[np.ndarray]:
    """Same-class partners `[n, local_batch]` (None without pairs)."""
    if not self.pipe.same_class_pairs:
      return None
    spe = self.steps_per_epoch
    return np.stack([self.pipe.local_pair_indices(*divmod(step + j, spe))
                     for j in range(n)])

  def chunk(self, step: int, n: int) -> Dict[str, np.ndarray]:
    """Stacked `[n, local_batch, ...]` batches of global steps [step, step+n)
    (with the partners' `image_pair` / `label_pair` / `pair_index` when the
    pipeline pairs same-class examples)."""
    return self.pipe.batch_at(self._indices(step, n),
                              self._pair_indices(step, n))

  def batch(self, step: int) -> Dict[str, np.ndarray]:
    return self.pipe.get_batch(*divmod(step, self.steps_per_epoch))

  def index_chunk(self, step: int, n: int) -> Dict[str, np.ndarray]:
    """Only the example indices `[n, local_batch]` (data on device), and the
    partners' `pair_index` with same-class pairs."""
    out = {"index": self._indices(step, n).astype(np.int32)}
    pair = self._pair_indices(step, n)
    if pair is not None:
      out["pair_index"] = pair.astype(np.int32)
    return out

  def index_batch(self, step: int) -> Dict[str, np.ndarray]:
    return {k: v[0] for k, v in self.index_chunk(step, 1).items()}

  def close(self):
    pass


class GrainFeed:
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
class Data:
  """A run's datasets and how its images are augmented / normalized."""
  info: Any                        # sources.DatasetInfo
  train: Any                       # InMemoryFeed | GrainFeed
  eval_pipe: Any
  image_shape: Tuple[int, int, int]
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  crop_padding: Optional[int]      # on-device augmentation (in-memory data)
  flip: bool
  host_teacher_view: bool = False  # the pipeline emits `teacher_image`
  # Per-model input views (`data.views`, `kd_jax.data.views` specs; None:
  # the image as is). `image_shape` is then the student's view's shape and
  # `teacher_shape` the teacher's.
  student_view: Any = None
  teacher_view: Any = None
  teacher_shape: Optional[Tuple[int, int, int]] = None
  distill: bool = False
  # `evaluation.validation_size`: the held-out part of the training split
  # (an un-shuffled InMemoryPipeline like `eval_pipe`; None: off).
  val_pipe: Any = None

  @property
  def has_views(self) -> bool:
    return self.student_view is not None or self.teacher_view is not None

  def train_views(self) -> Optional[Callable]:
    """`view(batch, rng) -> batch` of the train step (None without views):
    distillation puts the student's view in `image` and the teacher's in
    `teacher_image`; a supervised run applies the student's view."""
    if not self.has_views:
      return None
    if self.distill:
      return views_lib.model_views(student=self.student_view,
                                   teacher=self.teacher_view)
    return views_lib.make_view(self.student_view)
  jitter: Optional[int] = None     # random translation (`data.jitter`)

  def eval_batches(self):
    if isinstance(self.eval_pipe, pipeline_lib.InMemoryPipeline):
      yield from self.eval_pipe.epoch(0)
      return
    it = self.eval_pipe.iterator(num_epochs=1)
    try:
      yield from it
    finally:
      it.close()

  def val_batches(self):
    """The validation split's batches (`evaluation.validation_size`;
    None when off)."""
    if self.val_pipe is None:
      return None
    return self.val_pipe.epoch(0)

  def first_batch(self) -> Dict[str, np.ndarray]:
    """The first train batch without a host-made teacher view."""
    return {k: v for k, v in self.train.batch(0).items()
            if k != "teacher_image"}

  def close(self):
    if self.train is not None:
      self.train.close()


def _mock_arrays(name: str, split: str, n: int):
  """Arrays from TFDS `mock_data` (random records; never the network)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  info = sources_lib.dataset_info(name)
  with tfds.testing.mock_data(num_examples=n):
    # (The builder's own data source: the same records as
    # `tfds.data_source`, without its "is it prepared?" probe, which warns
    # that the mock's metadata folder has no dataset_info.json.)
    src = tfds.builder(name).as_data_source(split=split)
    recs = [src[i] for i in range(len(src))]
  images = np.stack([np.asarray(r["image"], np.uint8) for r in recs])
  labels = np.asarray([int(r["label"]) % info.num_classes for r in recs],
                      np.int32)
  return images, labels


def load_data(rc: Any) -> Data:
  """Train/eval data of a run (TFDS mock data when `data.mock`)."""
  info = sources_lib.dataset_info(rc.data.name)
  if not info.in_memory:
    return _load_grain_data(rc, info)
  d = rc.data
  if d.mock:
    tr = _mock_arrays(d.name, info.train_split, int(d.mock_num_examples))
    ev = _mock_arrays(d.name, info.eval_split, int(d.mock_num_examples))
  else:
    kw = dict(data_dir=d.data_dir or None, cache_dir=d.cache_dir or None)
    tr = sources_lib.load_arrays(d.name, info.train_split, **kw)
    ev = sources_lib.load_arrays(d.name, info.eval_split, **kw)
  val = None
  vs = classify_config.evaluation(rc).validation_size
  if vs:  # held out BEFORE the classes are removed: it holds them all
    if vs >= tr[1].shape[0]:
      raise ConfigError("evaluation.validation_size", f"{vs} leaves none of "
                        f"the {tr[1].shape[0]} training examples to train on.")
    keep_idx, val_idx = subsets_lib.split_validation(tr[1], vs, seed=0)
    val = (tr[0][val_idx], tr[1][val_idx])
    tr = (tr[0][keep_idx], tr[1][keep_idx])
  if d.omit_classes or d.keep_classes:  # a transfer set without classes
    tr = subsets_lib.transfer_set(tr[0], tr[1], omit=d.omit_classes or None,
                                  keep=d.keep_classes or None)[:2]
  if d.train_subset:
    take = np.arange(d.train_subset)
    if d.subset == "random":  # N examples drawn with the run's seed
      take = np.sort(np.random.RandomState(int(rc.seed)).permutation(
          tr[0].shape[0])[:d.train_subset])
    tr = (tr[0][take], tr[1][take])
  if d.eval_subset:
    ev = (ev[0][:d.eval_subset], ev[1][:d.eval_subset])
  mean, std = _normalization(rc, info)
  bs = rc.train.batch_size
  if tr[0].shape[0] < bs:
    raise ConfigError("train.batch_size", f"{bs} exceeds the "
                                 f"{tr[0].shape[0]} training examples.")
  train = pipeline_lib.InMemoryPipeline(
      tr[0], tr[1], global_batch_size=bs, seed=rc.seed, shuffle=True,
      drop_remainder=True, with_index=True, mean=mean, std=std,
      same_class_pairs=classify_config.same_class_pairs(rc))
  evalp = pipeline_lib.InMemoryPipeline(
      ev[0], ev[1], global_batch_size=rc.train.eval_batch_size, seed=0,
      shuffle=False, drop_remainder=False, with_index=False, mean=mean,
      std=std)
  valp = None if val is None else pipeline_lib.InMemoryPipeline(
      val[0], val[1], global_batch_size=rc.train.eval_batch_size, seed=0,
      shuffle=False, drop_remainder=False, with_index=False, mean=mean,
      std=std)
  augment = bool(d.augment) and bool(info.crop_padding or info.flip)
  views = dict(d.views or {})
  sv, tv = views.get("student"), views.get("teacher")
  raw = tuple(tr[0].shape[1:])
  shape = views_lib.view_output_shape(sv, raw) if sv is not None else raw
  return Data(info=info, train=InMemoryFeed(train), eval_pipe=evalp,
              image_shape=shape, mean=mean,
              std=std, crop_padding=info.crop_padding if augment else None,
              flip=info.flip and augment, student_view=sv, teacher_view=tv,
              teacher_shape=(views_lib.view_output_shape(tv, raw)
                             if tv is not None else raw),
              distill=bool(rc.distill), jitter=int(d.jitter) or None,
              val_pipe=valp)


def _normalization(rc: Any, info):
  """(mean, std) of `data.normalization` ('unit': pixels / 255)."""
  if rc.data.normalization == "unit":
    return (0.0,) * len(info.mean), (1.0,) * len(info.std)
  return info.mean, info.std


def load_eval_data(rc: Any) -> Data:
  """Only the eval split of an in-memory dataset (`train` is None): what a
  data-free run (task 'dafl') reads -- never the training images."""
  info = sources_lib.dataset_info(rc.data.name)
  d = rc.data
  if d.mock:
    ev = _mock_arrays(d.name, info.eval_split, int(d.mock_num_examples))
  else:
    ev = sources_lib.load_arrays(d.name, info.eval_split,
                                 data_dir=d.data_dir or None,
                                 cache_dir=d.cache_dir or None)
  if d.eval_subset:
    ev = (ev[0][:d.eval_subset], ev[1][:d.eval_subset])
  mean, std = _normalization(rc, info)
  evalp = pipeline_lib.InMemoryPipeline(
      ev[0], ev[1], global_batch_size=rc.train.eval_batch_size, seed=0,
      shuffle=False, drop_remainder=False, with_index=False, mean=mean,
      std=std)
  sv = dict(d.views or {}).get("student")
  raw = tuple(ev[0].shape[1:])
  shape = views_lib.view_output_shape(sv, raw) if sv is not None else raw
  return Data(info=info, train=None, eval_pipe=evalp, image_shape=shape,
              mean=mean, std=std, crop_padding=None, flip=False,
              student_view=sv)


def _load_grain_data(rc: Any, info) -> Data:
  """ImageNet: grain pipeline, per-record decode + crop in worker processes."""
  from kd_jax.data import imagenet as imagenet_lib  # pylint: disable=g-import-not-at-top
  d = rc.data
  size = int(d.image_size)
  common = dict(
      data_dir=d.data_dir or None, decode_in_tfds=bool(d.mock),
      image_size=size, resize_size=max(size, int(round(size * 256 / 224))),
      num_workers=0 if d.mock else int(d.num_workers),
      mean=info.mean, std=info.std)
  separate = rc.distill and d.teacher_view == "separate"
  train = imagenet_lib.imagenet_pipeline(
      info.train_split, global_batch_size=rc.train.batch_size, train=True,
      seed=rc.seed, with_index=True, separate_teacher_view=separate,
      num_examples=d.train_subset or None, **common)
  evalp = imagenet_lib.imagenet_pipeline(
      info.eval_split, global_batch_size=rc.train.eval_batch_size,
      train=False, num_examples=d.eval_subset or None, **common)
  return Data(info=info, train=GrainFeed(train), eval_pipe=evalp,
              image_shape=(size, size, 3), mean=info.mean, std=info.std,
              crop_padding=None, flip=False, host_teacher_view=separate)


# ---------------------------------------------------------------------------
# On-device preprocessing.


def strong_augment_fn(label: str) -> Callable:
  """`kd_jax.data.strong_augment.strong_augment`, or a `ConfigError` naming
  the term that asked for a strong view when it is not available."""
  try:
    mod = importlib.import_module("kd_jax.data.strong_augment")
  except ImportError:
    mod = None
  fn = getattr(mod, "strong_augment", None)
  if fn is None:
    raise ConfigError(
        f"loss.terms.{label}", "this method needs a strong augmentation view "
        "(views=('strong',)), but kd_jax.data.strong_augment.strong_augment "
        "is not available.")
  return fn


VIEW_TAG = 0x7669  # the views' keys: fold_in(fold_in(rng, epoch), VIEW_TAG)


def _augment(data: Data, rng, epoch, batch, separate_teacher_view: bool,
             strong: Optional[Callable]):
  """Augmentation + normalization, then the per-model views (with views,
  the teacher's input comes from them, not from a second augmentation)."""
  views = data.train_views()
  key = jax.random.fold_in(rng, epoch)
  out = augment_lib.augment_batch(
      key, batch, mean=data.mean, std=data.std,
      crop_padding=data.crop_padding, flip=data.flip,
      separate_teacher_view=separate_teacher_view and views is None,
      strong_augment=strong, jitter=data.jitter)
  if views is not None:
    out = views(out, jax.random.fold_in(key, VIEW_TAG))
  return out


def make_train_preprocess(data: Data, *, steps_per_epoch: int,
                          separate_teacher_view: bool = False,
                          strong: Optional[Callable] = None) -> Callable:
  """`fn(state, batch) -> batch`: augmentation + normalization on device,
  keys from `fold_in(state.rng, AUG_TAG)` and the epoch
  `state.step // steps_per_epoch` (see `kd_jax.data.augment.augment_batch`)."""
  def preprocess(state, batch):
    epoch = state.step // steps_per_epoch
    rng = jax.random.fold_in(state.rng, augment_lib.AUG_TAG)
    return _augment(data, rng, epoch, batch, separate_teacher_view, strong)

  return preprocess


def make_stage_preprocess(data: Data, rng) -> Callable:
  """`fn(batch) -> batch` for a distiller's pretrain stage: the batch carries
  its epoch as `aug_epoch` (int32 `[B]`); keys from `rng` as in
  `make_train_preprocess`."""
  def preprocess(batch):
    batch = dict(batch)
    epoch = batch.pop("aug_epoch")[0]
    return _augment(data, rng, epoch, batch, False, None)

  return preprocess


def eval_preprocess(data: Data, model: str = "student") -> Callable:
  """`fn(batch) -> batch`: normalization, then `model`'s view ('student' |
  'teacher'; random views draw from a fixed key)."""
  spec = data.student_view if model == "student" else data.teacher_view
  view = None if spec is None else views_lib.make_view(spec)

  def preprocess(batch):
    batch = dict(batch)
    batch["image"] = augment_lib.normalize(batch["image"], data.mean, data.std)
    if view is not None:
      batch = view(batch, jax.random.key(VIEW_TAG))
    return batch
  return preprocess


def make_step_batch(data: Data, *, steps_per_epoch: int, teacher_apply,
                    precomputed_logits: bool, separate_teacher_view: bool,
                    strong: Optional[Callable] = None) -> Callable:
  """`fn(state, consts, batch) -> (batch, teacher_variables | None)`: the
  batch the engine's step sees.

  `consts` (replicated): `'data'` the device-resident dataset (then `batch`
  holds only example indices), `'teacher'` the teacher's variables -- or, with
  precomputed logits, the `[num_examples, classes]` logits table. The teacher
  logits of precomputed tables and of a separate teacher view go into
  `batch['teacher_logits']` (the step is then built with
  `make_distill_step(teacher_apply=None)`).
  """
  preprocess = make_train_preprocess(
      data, steps_per_epoch=steps_per_epoch,
      separate_teacher_view=separate_teacher_view, strong=strong)

  def step_batch(state, consts, batch):
    if "data" in consts:
      idx, data_ = batch["index"], consts["data"]
      out = {"image": data_["image"][idx], "label": data_["label"][idx],
             "index": idx}
      if "pair_index" in batch:  # same-class partners (CS-KD)
        pidx = batch["pair_index"]
        out.update(image_pair=data_["image"][pidx],
                   label_pair=data_["label"][pidx], pair_index=pidx)
      batch = out
    batch = preprocess(state, batch)
    tv = consts.get("teacher")
    if precomputed_logits:
      batch["teacher_logits"] = tv[batch["index"]]
      tv = None
    elif separate_teacher_view:
      batch["teacher_logits"], _ = steps_lib.teacher_forward(
          teacher_apply, tv, batch.pop("teacher_image"))
      tv = None
    return batch, tv

  return step_batch
