"""In-memory input pipeline with exact, checkpointable position.

Design: the batch at position `(epoch, step)` is a pure function of
`(seed, epoch, step, process_index, process_count)`:

* each epoch draws a permutation of all `N` examples from
  `SeedSequence([seed, epoch])` (the same on every process);
* global batch `step` is the slice `perm[step*G : (step+1)*G]` (`G` = global
  batch size) and process `p` of `P` takes its contiguous `G/P` part.

So the processes' shards are disjoint and their union is exactly the global
batch a single-process run would see: results do not depend on how many hosts
feed the run. The iterator's whole state is the JSON-able position
`{'epoch': e, 'step': s}` (the next batch to produce); saving it next to the
train state and restarting from it reproduces the stream bit for bit.

Batches are dicts of host NumPy arrays: `image` uint8 `[L, H, W, C]` (raw: the
train step augments/normalizes on device with `pipeline.preprocess_fn(...)`),
`label` int32 `[L]`, plus `index` int32 `[L]` (dataset example index, for CRD)
when `with_index=True`, and `mask` bool `[L]` when the pipeline does not drop
the last partial batch (eval): padded slots repeat example 0 and have
`mask=False`.

Same-class pairs (CS-KD, `same_class_pairs=True`): every example also gets a
partner of its class, drawn uniformly per `(seed, epoch, example index)`
(`same_class_partners`), so the pairs are as deterministic as the order and
do not depend on the process count either; batches then carry
`pair_index`, `image_pair` and `label_pair` `[L]` next to the anchors.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np

from kd_jax.data import augment as augment_lib
from kd_jax.data import sources

Batch = Dict[str, np.ndarray]
Position = Dict[str, int]


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The example order of `epoch`: a permutation of `range(n)` (int64).

  A pure function of `(seed, epoch, n)` via NumPy's `SeedSequence`, so it is
  identical on every process and after a restart.

  Example:
    >>> p = epoch_permutation(0, 3, 10)
    >>> sorted(p.tolist()) == list(range(10)), bool((p == epoch_permutation(0, 3, 10)).all())
    (True, True)
  """
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)]))
  return rng.permutation(n)


PAIR_TAG = 0x50414952  # "PAIR": the partner draw's SeedSequence entry


def _class_groups(labels: np.ndarray):
  """(order, start, count, class of each example): examples sorted by class
  (stable), where each class starts in `order` and its size."""
  order = np.argsort(labels, kind="stable")
  classes, start, count = np.unique(labels[order], return_index=True,
                                    return_counts=True)
  return order, start, count, np.searchsorted(classes, labels)


def same_class_partners(seed: int, epoch: int, labels: np.ndarray, *,
                        exclude_self: bool = False) -> np.ndarray:
  """A partner of the same class for every example, for one epoch (int64 `[N]`).

  `partners[i]` is uniform over the examples labelled `labels[i]` -- the
  CS-KD authors' `random.choice(classwise_indices[y])`, which may return `i`
  itself; with `exclude_self` uniform over the *other* ones. A pure function
  of `(seed, epoch, labels)` (NumPy `SeedSequence([seed, epoch, PAIR_TAG])`),
  the same on every process and after a restart.

  Example:
    >>> y = np.array([0, 1, 0, 1, 1])
    >>> p = same_class_partners(0, 0, y, exclude_self=True)
    >>> bool((y[p] == y).all()), bool((p != np.arange(5)).all())
    (True, True)
  """
  labels = np.asarray(labels)
  n = labels.shape[0]
  order, start, count, cls = _class_groups(labels)
  size = count[cls]
  rng = np.random.default_rng(np.random.SeedSequence(
      [int(seed), int(epoch), PAIR_TAG]))
  u = rng.random(n)
  if exclude_self:
    if np.any(count < 2):
      bad = int(labels[order[start[np.argmax(count < 2)]]])
      raise ValueError(
          f"same-class pairs without the example itself need >= 2 examples "
          f"per class; class {bad} has 1 (use pair_exclude_self=False).")
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - np.repeat(start, count)
    r = np.minimum((u * (size - 1)).astype(np.int64), size - 2)
    r = r + (r >= rank)
  else:
    r = np.minimum((u * size).astype(np.int64), size - 1)
  return order[start[cls] + r]


def _resolve_process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not (isinstance(process_count, (int, np.integer)) and process_count >= 1):
    raise ValueError(f"`process_count` must be a positive int; got {process_count!r}.")
  if not (isinstance(process_index, (int, np.integer))
          and 0 <= process_index < process_count):
    raise ValueError(f"`process_index` must be in [0, {process_count}); got "
                     f"{process_index!r}.")
  return int(process_index), int(process_count)


def check_position(position: Any) -> Position:
  """Validates a `{'epoch': int >= 0, 'step': int >= 0}` dict (or JSON str)."""
  if isinstance(position, str):
    position = json.loads(position)
  if (not isinstance(position, dict) or set(position) != {"epoch", "step"}
      or not all(isinstance(position[k], (int, np.integer)) and position[k] >= 0
                 for k in ("epoch", "step"))):
    raise ValueError("`position` must be a dict {'epoch': int >= 0, 'step': "
                     f"int >= 0}}; got {position!r}.")
  return {"epoch": int(position["epoch"]), "step": int(position["step"])}


class InMemoryPipeline:
  """Batches from in-memory arrays; see the module docstring for the design.

  Args:
    images: uint8 `[N, H, W, C]`.
    labels: int `[N]`.
    global_batch_size: examples per step over all processes; must be
      divisible by `process_count`.
    seed: shuffling seed.
    shuffle: reshuffle every epoch (default: `train`-style, i.e. True).
    drop_remainder: drop the last partial global batch (default True). With
      False the last batch is padded and batches carry a `mask`.
    process_index, process_count: this process's shard; default
      `jax.process_index()` / `jax.process_count()` (pass them to simulate
      multi-host runs in tests).
    with_index: add `batch['index']` (example index in the split).
    mean, std, crop_padding, flip: the on-device preprocessing returned by
      `preprocess_fn` (see `kd_jax.data.augment.make_preprocess_fn`).
    same_class_pairs: give every example a partner of its class
      (`same_class_partners`, CS-KD): batches carry `pair_index`,
      `image_pair`, `label_pair`.
    pair_exclude_self: partners never are the example itself (the CS-KD
      paper's "another sample"; the authors' sampler allows it).

  Example:
    >>> import numpy as np
    >>> x = np.zeros((10, 4, 4, 1), np.uint8); y = np.arange(10)
    >>> p = InMemoryPipeline(x, y, global_batch_size=4, seed=0, mean=(0.,), std=(1.,))
    >>> p.steps_per_epoch, p.local_batch_size
    (2, 4)
    >>> it = p.iterator()
    >>> b = next(it); sorted(b), b['image'].shape, it.position
    (['image', 'label'], (4, 4, 4, 1), {'epoch': 0, 'step': 1})
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, *,
               global_batch_size: int, seed: int = 0,
               shuffle: bool = True, drop_remainder: bool = True,
               process_index: Optional[int] = None,
               process_count: Optional[int] = None, with_index: bool = False,
               mean=(0.0,), std=(1.0,), crop_padding: Optional[int] = None,
               flip: bool = False, same_class_pairs: bool = False,
               pair_exclude_self: bool = False):
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4:
      raise ValueError(f"`images` must be [N, H, W, C]; got shape {images.shape}.")
    if labels.shape != images.shape[:1]:
      raise ValueError(f"`labels` must have shape [{images.shape[0]}]; got "
                       f"{labels.shape}.")
    self.process_index, self.process_count = _resolve_process(
        process_index, process_count)
    if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size < 1:
      raise ValueError("`global_batch_size` must be a positive int; got "
                       f"{global_batch_size!r}.")
    if global_batch_size % self.process_count:
      raise ValueError(f"`global_batch_size` ({global_batch_size}) must be "
                       f"divisible by `process_count` ({self.process_count}).")
    n = images.shape[0]
    if drop_remainder and global_batch_size > n:
      raise ValueError(f"`global_batch_size` ({global_batch_size}) exceeds the "
                       f"dataset size ({n}) with drop_remainder=True.")
    self.images = images
    self.labels = labels.astype(np.int32)
    self.num_examples = n
    self.global_batch_size = int(global_batch_size)
    self.local_batch_size = self.global_batch_size // self.process_count
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self.drop_remainder = bool(drop_remainder)
    self.with_index = bool(with_index)
    self.steps_per_epoch = (n // self.global_batch_size if drop_remainder
                            else -(-n // self.global_batch_size))
    self._aug = dict(mean=tuple(mean), std=tuple(std),
                     crop_padding=crop_padding, flip=flip)
    self._perm_cache = (None, None)
    self.same_class_pairs = bool(same_class_pairs)
    self.pair_exclude_self = bool(pair_exclude_self)
    self._pair_cache = (None, None)
    if self.same_class_pairs:
      self.partners(0)  # validates the classes now (one clear error)

  # -- index math -----------------------------------------------------------
  def _order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_examples)
    if self._perm_cache[0] != epoch:
      self._perm_cache = (epoch, epoch_permutation(self.seed, epoch,
                                                   self.num_examples))
    return self._perm_cache[1]

  def local_indices(self, epoch: int, step: int) -> np.ndarray:
    """Example indices of this process's batch at `(epoch, step)`; -1 = pad."""
    if not 0 <= step < self.steps_per_epoch:
      raise ValueError(f"`step` must be in [0, {self.steps_per_epoch}); got {step}.")
    order = self._order(epoch)
    lo = step * self.global_batch_size + self.process_index * self.local_batch_size
    idx = order[lo:lo + self.local_batch_size]
    if idx.shape[0] < self.local_batch_size:
      idx = np.concatenate([idx, np.full(self.local_batch_size - idx.shape[0],
                                         -1, idx.dtype)])
    return idx

  def partners(self, epoch: int) -> np.ndarray:
    """Same-class partner of every example in `epoch` (`[N]`, see
    `same_class_partners`)."""
    if not self.same_class_pairs:
      raise ValueError("this pipeline was built without same_class_pairs.")
    if self._pair_cache[0] != epoch:
      self._pair_cache = (epoch, same_class_partners(
          self.seed, epoch, self.labels,
          exclude_self=self.pair_exclude_self))
    return self._pair_cache[1]

  def local_pair_indices(self, epoch: int, step: int) -> np.ndarray:
    """Partners of `local_indices(epoch, step)` (-1 stays padding)."""
    idx = self.local_indices(epoch, step)
    return np.where(idx >= 0, self.partners(epoch)[np.maximum(idx, 0)], -1)

  def batch_at(self, idx: np.ndarray,
               pair_idx: Optional[np.ndarray] = None) -> Batch:
    """Gathers a batch (any leading shape) from indices (-1 = padding), and
    the partners' `image_pair` / `label_pair` / `pair_index` from
    `pair_idx` when given."""
    valid = idx >= 0
    safe = np.where(valid, idx, 0)
    batch = {"image": self.images[safe], "label": self.labels[safe]}
    if self.with_index:
      batch["index"] = safe.astype(np.int32)
    if pair_idx is not None:
      pair = np.where(valid, pair_idx, 0)
      batch["pair_index"] = pair.astype(np.int32)
      batch["image_pair"] = self.images[pair]
      batch["label_pair"] = self.labels[pair]
    if not self.drop_remainder:
      batch["mask"] = valid
    return batch

  def get_batch(self, epoch: int, step: int) -> Batch:
    """This process's batch at `(epoch, step)` (pure function of them)."""
    pair = (self.local_pair_indices(epoch, step) if self.same_class_pairs
            else None)
    return self.batch_at(self.local_indices(epoch, step), pair)

  # -- iteration -------------------------------------------------------------
  def iterator(self, position: Optional[Position] = None, *,
               num_epochs: Optional[int] = None) -> "BatchIterator":
    """Iterator starting at `position` (default the start); see `BatchIterator`."""
    return BatchIterator(self, position, num_epochs=num_epochs)

  def epoch(self, epoch: int, *, start_step: int = 0,
            steps_per_chunk: Optional[int] = None) -> Iterator[Batch]:
    """Yields one epoch from `start_step`: single batches, or with
    `steps_per_chunk=n` stacked `[n, L, ...]` chunks (the last one shorter
    when `n` does not divide the remaining steps)."""
    it = BatchIterator(self, {"epoch": epoch, "step": start_step},
                       num_epochs=epoch + 1)
    while True:
      remaining = self.steps_per_epoch - it.position["step"]
      if it.position["epoch"] > epoch or remaining <= 0:
        return
      if steps_per_chunk is None:
        yield next(it)
      else:
        yield it.next_chunk(min(steps_per_chunk, remaining))

  def preprocess_fn(self, *, train: bool = True,
                    separate_teacher_view: bool = False) -> Callable:
    """Jittable `fn(rng, batch) -> batch` (see `augment.make_preprocess_fn`):
    the dataset's train augmentation + normalization when `train`, just the
    normalization otherwise."""
    a = self._aug
    return augment_lib.make_preprocess_fn(
        mean=a["mean"], std=a["std"],
        crop_padding=a["crop_padding"] if train else None,
        flip=a["flip"] and train, separate_teacher_view=separate_teacher_view)


class BatchIterator:
  """Python iterator over an `InMemoryPipeline` with an exact position.

  `position` / `get_state()` is `{'epoch': e, 'step': s}`: the next batch to
  be produced. `set_state()` (or the constructor) jumps to any position in
  O(1). `num_epochs=None` iterates forever.
  """

  def __init__(self, pipeline: InMemoryPipeline,
               position: Optional[Position] = None, *,
               num_epochs: Optional[int] = None):
    self._p = pipeline
    self.num_epochs = num_epochs
    self.set_state(position or {"epoch": 0, "step": 0})

  @property
  def position(self) -> Position:
    return dict(self._pos)

  def get_state(self) -> Position:
    """JSON-able position; store it in the checkpoint."""
    return dict(self._pos)

  def set_state(self, state: Position) -> None:
    pos = check_position(state)
    if pos["step"] > self._p.steps_per_epoch:
      raise ValueError(f"position step {pos['step']} exceeds steps_per_epoch "
                       f"({self._p.steps_per_epoch}).")
    if pos["step"] == self._p.steps_per_epoch:
      pos = {"epoch": pos["epoch"] + 1, "step": 0}
    self._pos = pos

  def __iter__(self):
    return self

  def _advance(self):
    e, s = self._pos["epoch"], self._pos["step"]
    if self.num_epochs is not None and e >= self.num_epochs:
      raise StopIteration
    s += 1
    if s == self._p.steps_per_epoch:
      e, s = e + 1, 0
    cur = (self._pos["epoch"], self._pos["step"])
    self._pos = {"epoch": e, "step": s}
    return cur

  def __next__(self) -> Batch:
    e, s = self._advance()
    return self._p.get_batch(e, s)

  def next_chunk(self, n: int) -> Batch:
    """The next `n` batches stacked as `[n, L, ...]` (may cross epochs).

    One vectorized gather, for a scanned multi-step train function. Raises
    `StopIteration` if fewer than `n` batches remain before `num_epochs`.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
      raise ValueError(f"`n` must be a positive int; got {n!r}.")
    saved = dict(self._pos)
    try:
      pos = [self._advance() for _ in range(n)]
    except StopIteration:
      self._pos = saved
      raise
    idx = np.stack([self._p.local_indices(*p) for p in pos])
    pair = (np.stack([self._p.local_pair_indices(*p) for p in pos])
            if self._p.same_class_pairs else None)
    return self._p.batch_at(idx, pair)


def create_pipeline(name: str, split: str, *, global_batch_size: int,
                    train: bool, seed: int = 0, data_dir: Optional[str] = None,
                    cache_dir: Optional[str] = None, use_cache: bool = True,
                    process_index: Optional[int] = None,
                    process_count: Optional[int] = None,
                    with_index: bool = False,
                    num_examples: Optional[int] = None,
                    same_class_pairs: bool = False) -> InMemoryPipeline:
  """The standard pipeline for an in-memory dataset (mnist/cifar10/cifar100).

  `train=True`: per-epoch reshuffling, drop remainder, and `preprocess_fn()`
  applies the dataset's standard augmentation (CIFAR: 4-pixel-padded random
  crop + horizontal flip; MNIST: none) and normalization. `train=False`: fixed
  order, padded last batch with `mask`, normalization only.
  `num_examples` keeps only the first `n` examples (debug runs).
  `same_class_pairs` adds a same-class partner per example (CS-KD; see
  `InMemoryPipeline`).

  Example (real MNIST, when available):
    >>> import os
    >>> d = os.environ.get('KD_JAX_TEST_TFDS_DIR')
    >>> p = create_pipeline('mnist', 'test', global_batch_size=1000, train=False,
    ...                     data_dir=d, process_index=0, process_count=1) if d else None
    >>> p.steps_per_epoch if p else 10
    10
  """
  info = sources.dataset_info(name)
  images, labels = sources.load_arrays(name, split, data_dir=data_dir,
                                       cache_dir=cache_dir, use_cache=use_cache)
  if num_examples is not None:
    images, labels = images[:num_examples], labels[:num_examples]
  return InMemoryPipeline(
      images, labels, global_batch_size=global_batch_size, seed=seed,
      shuffle=train, drop_remainder=train, process_index=process_index,
      process_count=process_count, with_index=with_index, mean=info.mean,
      std=info.std, crop_padding=info.crop_padding, flip=info.flip,
      same_class_pairs=same_class_pairs)
