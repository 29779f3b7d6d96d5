"""ImageNet input pipeline: TFDS `data_source` + grain worker processes.

ImageNet does not fit in host memory decoded, so each record is read and
JPEG-decoded per example, in grain worker processes (`num_workers`) with
reader threads (`num_threads`) -- never in the training loop's thread. The
host produces uint8 crops; normalization runs on device
(`pipeline.preprocess_fn()`), which keeps the host->device transfer uint8.

Augmentation (torchvision's standard recipe, used by the KD papers' ImageNet
runs):

* train: `RandomResizedCrop(224, scale=(0.08, 1), ratio=(3/4, 4/3))` +
  `RandomHorizontalFlip()`;
* eval: `Resize(256)` (shorter side, bilinear) + `CenterCrop(224)`.

With `jpeg_draft=True` (default) PIL decodes JPEGs at a reduced DCT scale
when the crop will be downscaled by 2x or more anyway (the same pixels up to
resampling, several times cheaper).

Positions and determinism follow `kd_jax.data.pipeline`: the batch at
`(epoch, step)` is a pure function of `(seed, epoch, step, process_index,
process_count)`; each record's random crop is drawn from
`SeedSequence([seed, epoch, record_index])`, so the stream does not depend on
`num_workers` / `num_threads` and resumes exactly from the JSON position.
"""

from __future__ import annotations

import io
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from kd_jax.data import augment as augment_lib
from kd_jax.data import pipeline as pipeline_lib
from kd_jax.data import sources

Position = Dict[str, int]


# ---------------------------------------------------------------------------
# Per-record image ops (PIL; run in worker processes)
# ---------------------------------------------------------------------------

def _open_image(image):
  """bytes (JPEG/PNG) or uint8 array -> PIL image (not yet decoded for bytes)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(image, (bytes, bytearray)):
    return Image.open(io.BytesIO(image))
  arr = np.asarray(image)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  return Image.fromarray(arr)


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            *, scale: Tuple[float, float] = (0.08, 1.0),
                            ratio: Tuple[float, float] = (3 / 4, 4 / 3)
                            ) -> Tuple[int, int, int, int]:
  """torchvision `RandomResizedCrop.get_params`: `(top, left, h, w)`.

  Up to 10 tries of area fraction ~ U(scale) and log-aspect ~ U(log ratio);
  falls back to the largest central crop with aspect clamped to `ratio`.

  Example:
    >>> import numpy as np
    >>> random_resized_crop_box(np.random.default_rng(0), 100, 100,
    ...                         scale=(1.0, 1.0), ratio=(1.0, 1.0))
    (0, 0, 100, 100)
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _draft(img, box, out_size, enabled):
  """JPEG DCT-domain downscale when the crop shrinks >= 2x; rescales box."""
  if not enabled or getattr(img, "format", None) != "JPEG":
    return img, box
  left, top, right, bottom = box
  f = max(out_size[0] / max(right - left, 1e-6),
          out_size[1] / max(bottom - top, 1e-6))
  if f > 0.5:
    return img, box
  w0, h0 = img.size
  img.draft("RGB", (max(1, math.ceil(w0 * f)), max(1, math.ceil(h0 * f))))
  sx, sy = img.size[0] / w0, img.size[1] / h0
  return img, (left * sx, top * sy, right * sx, bottom * sy)


def _to_rgb_array(img) -> np.ndarray:
  if img.mode != "RGB":
    img = img.convert("RGB")
  return np.asarray(img, dtype=np.uint8)


def train_crop(image, rng: np.random.Generator, *, size: int,
               scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True,
               jpeg_draft: bool = True) -> np.ndarray:
  """RandomResizedCrop(size) + RandomHorizontalFlip -> uint8 `[size, size, 3]`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img = _open_image(image)
  w0, h0 = img.size
  top, left, h, w = random_resized_crop_box(rng, h0, w0, scale=scale, ratio=ratio)
  img, box = _draft(img, (left, top, left + w, top + h), (size, size), jpeg_draft)
  img = img.convert("RGB") if img.mode != "RGB" else img
  out = img.resize((size, size), Image.BILINEAR, box=box)
  arr = _to_rgb_array(out)
  if flip and rng.random() < 0.5:
    arr = arr[:, ::-1]
  return np.ascontiguousarray(arr)


def eval_crop(image, *, size: int, resize_size: int,
              jpeg_draft: bool = True) -> np.ndarray:
  """Resize(shorter side -> resize_size) + CenterCrop(size) -> uint8."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img = _open_image(image)
  w0, h0 = img.size
  s = resize_size / min(w0, h0)
  rw, rh = max(1, int(round(w0 * s))), max(1, int(round(h0 * s)))
  # The center crop in resized coordinates, mapped back to the source.
  left, top = (rw - size) // 2, (rh - size) // 2
  if left < 0 or top < 0:
    raise ValueError(f"`resize_size` ({resize_size}) must be >= `size` ({size}).")
  box = (left / s, top / s, (left + size) / s, (top + size) / s)
  img, box = _draft(img, box, (size, size), jpeg_draft)
  img = img.convert("RGB") if img.mode != "RGB" else img
  if (rw, rh) == (w0, h0):  # no resampling needed: an exact slice.
    return np.ascontiguousarray(_to_rgb_array(img)[top:top + size,
                                                   left:left + size])
  return _to_rgb_array(img.resize((size, size), Image.BILINEAR, box=box))


# ---------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------

class _LoadRecord:
  """Picklable grain map: flat local position -> processed example."""

  def __init__(self, p: "GrainImagePipeline"):
    self.source = p.source
    self.n = p.num_examples
    self.seed = p.seed
    self.shuffle = p.shuffle
    self.train = p.train
    self.spe = p.steps_per_epoch
    self.gbs = p.global_batch_size
    self.lbs = p.local_batch_size
    self.pidx = p.process_index
    self.with_index = p.with_index
    self.pad = not p.drop_remainder
    self.teacher_view = p.separate_teacher_view
    self.crop = dict(size=p.image_size, resize_size=p.resize_size,
                     scale=p.scale, ratio=p.ratio, jpeg_draft=p.jpeg_draft)
    self._perm = (None, None)

  def __getstate__(self):
    d = dict(self.__dict__)
    d["_perm"] = (None, None)
    return d

  def record_index(self, flat: int) -> Tuple[int, int]:
    step_global, j = divmod(flat, self.lbs)
    epoch, step = divmod(step_global, self.spe)
    pos = step * self.gbs + self.pidx * self.lbs + j
    if pos >= self.n:
      return epoch, -1
    if not self.shuffle:
      return epoch, pos
    if self._perm[0] != epoch:
      self._perm = (epoch, pipeline_lib.epoch_permutation(self.seed, epoch, self.n))
    return epoch, int(self._perm[1][pos])

  def __call__(self, flat: int) -> Dict[str, np.ndarray]:
    epoch, idx = self.record_index(int(flat))
    valid = idx >= 0
    idx = max(idx, 0)
    rec = self.source[idx]
    c = self.crop
    if self.train:
      rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, idx]))
      kw = dict(size=c["size"], scale=c["scale"], ratio=c["ratio"],
                jpeg_draft=c["jpeg_draft"])
      out = {"image": train_crop(rec["image"], rng, **kw)}
      if self.teacher_view:
        out["teacher_image"] = train_crop(rec["image"], rng, **kw)
    else:
      out = {"image": eval_crop(rec["image"], size=c["size"],
                                resize_size=c["resize_size"],
                                jpeg_draft=c["jpeg_draft"])}
      if self.teacher_view:
        out["teacher_image"] = out["image"]
    out["label"] = np.int32(rec["label"])
    if self.with_index:
      out["index"] = np.int32(idx)
    if self.pad:
      out["mask"] = np.bool_(valid)
    return out


class GrainImagePipeline:
  """Per-record decode + crop pipeline over a random-access image source.

  Args:
    source: random-access records `{'image': JPEG bytes | uint8 [H,W,C],
      'label': int}` (a TFDS `data_source` split, or any sequence).
    global_batch_size: examples per step over all processes.
    train: random-resized-crop + flip and reshuffling per epoch (and drop
      remainder) when True; resize + center crop, fixed order and a padded,
      masked last batch when False.
    seed: shuffling and augmentation seed.
    image_size, resize_size: output crop size; eval resize of the shorter side.
    scale, ratio: RandomResizedCrop parameters.
    num_workers: grain worker processes (0: decode in the calling process).
    num_threads: reader threads per process (grain `ReadOptions`; at most
      `prefetch_batches` of them, the read-ahead it holds).
    prefetch_batches: batches buffered per worker.
    process_index, process_count: this process's shard (default: JAX's).
    with_index: add `batch['index']`.
    separate_teacher_view: add `batch['teacher_image']`, an independent
      random crop (train) of the same example.
    jpeg_draft: PIL DCT-domain downscaling for large crops.
    mean, std: per-channel normalization applied by `preprocess_fn`.
  """

  def __init__(self, source: Any, *, global_batch_size: int, train: bool,
               seed: int = 0, image_size: int = 224, resize_size: int = 256,
               scale: Tuple[float, float] = (0.08, 1.0),
               ratio: Tuple[float, float] = (3 / 4, 4 / 3),
               num_workers: int = 0, num_threads: int = 16,
               prefetch_batches: int = 2,
               process_index: Optional[int] = None,
               process_count: Optional[int] = None, with_index: bool = False,
               separate_teacher_view: bool = False, jpeg_draft: bool = True,
               mean: Sequence[float] = sources.IMAGENET_MEAN,
               std: Sequence[float] = sources.IMAGENET_STD):
    self.process_index, self.process_count = pipeline_lib._resolve_process(  # pylint: disable=protected-access
        process_index, process_count)
    if not isinstance(global_batch_size, int) or global_batch_size < 1:
      raise ValueError("`global_batch_size` must be a positive int; got "
                       f"{global_batch_size!r}.")
    if global_batch_size % self.process_count:
      raise ValueError(f"`global_batch_size` ({global_batch_size}) must be "
                       f"divisible by `process_count` ({self.process_count}).")
    if not isinstance(num_workers, int) or num_workers < 0:
      raise ValueError(f"`num_workers` must be an int >= 0; got {num_workers!r}.")
    if resize_size < image_size:
      raise ValueError(f"`resize_size` ({resize_size}) must be >= `image_size` "
                       f"({image_size}).")
    self.source = source
    self.num_examples = n = len(source)
    self.train = bool(train)
    self.shuffle = self.train
    self.drop_remainder = self.train
    if self.drop_remainder and global_batch_size > n:
      raise ValueError(f"`global_batch_size` ({global_batch_size}) exceeds the "
                       f"dataset size ({n}).")
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // self.process_count
    self.steps_per_epoch = (n // global_batch_size if self.drop_remainder
                            else -(-n // global_batch_size))
    self.seed = int(seed)
    self.image_size, self.resize_size = int(image_size), int(resize_size)
    self.scale, self.ratio = tuple(scale), tuple(ratio)
    self.num_workers, self.num_threads = num_workers, num_threads
    self.prefetch_batches = prefetch_batches
    self.with_index = bool(with_index)
    self.separate_teacher_view = bool(separate_teacher_view)
    self.jpeg_draft = bool(jpeg_draft)
    self.mean, self.std = tuple(mean), tuple(std)

  def dataset(self, start_step: int = 0, stop_step: Optional[int] = None):
    """The grain `MapDataset` of local batches for global steps
    `[start_step, stop_step)` (counted across epochs)."""
    import grain  # pylint: disable=g-import-not-at-top
    if stop_step is None:
      stop_step = start_step + 10 ** 9  # lazily "infinite"
    lbs = self.local_batch_size
    ds = grain.MapDataset.range(start_step * lbs, stop_step * lbs)
    ds = ds.map(_LoadRecord(self))
    return ds.batch(lbs, drop_remainder=True)

  def iterator(self, position: Optional[Position] = None, *,
               num_epochs: Optional[int] = None) -> "GrainBatchIterator":
    """Iterator from `position` (default the start), `num_epochs` total."""
    return GrainBatchIterator(self, position, num_epochs=num_epochs)

  def get_batch(self, epoch: int, step: int) -> Dict[str, np.ndarray]:
    """This process's batch at `(epoch, step)`, computed in this process."""
    return self.dataset(epoch * self.steps_per_epoch + step)[0]

  def preprocess_fn(self, *, train: bool = True,
                    separate_teacher_view: Optional[bool] = None) -> Callable:
    """Jittable `fn(rng, batch) -> batch`: normalization of the host crops
    (`image`, and `teacher_image` when present). `rng` is unused."""
    del train, separate_teacher_view  # crops/flips are done on the host.
    return augment_lib.make_preprocess_fn(mean=self.mean, std=self.std)


def _ensure_absl_flags_parsed():
  """grain's worker processes read absl flags; outside `absl.app.run` (tests,
  notebooks) they are unparsed, which grain reports as an error. Mark them
  parsed with their defaults (a later `app.run` still parses argv)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class GrainBatchIterator:
  """Iterator over a `GrainImagePipeline` with a JSON position.

  Same contract as `kd_jax.data.BatchIterator` (`position`, `get_state`,
  `set_state`, `next_chunk`). Setting the state rebuilds the grain iterator
  (restarting the worker processes). Call `close()` to stop the workers.
  """

  def __init__(self, pipeline: GrainImagePipeline,
               position: Optional[Position] = None, *,
               num_epochs: Optional[int] = None):
    self._p = pipeline
    self.num_epochs = num_epochs
    self._it = None
    self.set_state(position or {"epoch": 0, "step": 0})

  def _global(self) -> int:
    return self._pos["epoch"] * self._p.steps_per_epoch + self._pos["step"]

  @property
  def position(self) -> Position:
    return dict(self._pos)

  def get_state(self) -> Position:
    return dict(self._pos)

  def set_state(self, state: Position) -> None:
    import grain  # pylint: disable=g-import-not-at-top
    pos = pipeline_lib.check_position(state)
    spe = self._p.steps_per_epoch
    if pos["step"] > spe:
      raise ValueError(f"position step {pos['step']} exceeds steps_per_epoch ({spe}).")
    self._pos = {"epoch": pos["epoch"] + pos["step"] // spe, "step": pos["step"] % spe}
    self.close()
    start = self._global()
    stop = None if self.num_epochs is None else max(start, self.num_epochs * spe)
    self._stop = stop
    # (grain's read-ahead holds `prefetch_buffer_size` elements, here
    # batches: more reader threads than that would sit idle.)
    buffer = max(1, self._p.prefetch_batches)
    ds = self._p.dataset(start, stop).to_iter_dataset(grain.ReadOptions(
        num_threads=min(self._p.num_threads, buffer),
        prefetch_buffer_size=buffer))
    if self._p.num_workers > 0:
      _ensure_absl_flags_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self._p.num_workers,
          per_worker_buffer_size=self._p.prefetch_batches))
    self._it = iter(ds)

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    if self._stop is not None and self._global() >= self._stop:
      raise StopIteration
    batch = next(self._it)
    g = self._global() + 1
    self._pos = {"epoch": g // self._p.steps_per_epoch,
                 "step": g % self._p.steps_per_epoch}
    return batch

  def next_chunk(self, n: int) -> Dict[str, np.ndarray]:
    """The next `n` batches stacked as `[n, L, ...]`."""
    if self._stop is not None and self._global() + n > self._stop:
      raise StopIteration
    batches = [next(self) for _ in range(n)]
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}

  def close(self) -> None:
    it, self._it = getattr(self, "_it", None), None
    if it is not None and hasattr(it, "close"):
      it.close()


def imagenet_pipeline(split: str, *, global_batch_size: int, train: bool,
                      data_dir: Optional[str] = None, decode_in_tfds: bool = False,
                      num_examples: Optional[int] = None,
                      **kwargs) -> GrainImagePipeline:
  """`GrainImagePipeline` over TFDS `imagenet2012` (`'train'`/`'validation'`).

  The TFDS source returns raw JPEG bytes (`SkipDecoding`) so decoding happens
  once per record in the workers, with `jpeg_draft`. `decode_in_tfds=True`
  lets TFDS decode instead (needed for `tfds.testing.mock_data`, whose
  `SkipDecoding` path requires TensorFlow). `num_examples` keeps the first
  `n` records (debug runs). Other kwargs go to `GrainImagePipeline`.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  decoders = None if decode_in_tfds else {"image": tfds.decode.SkipDecoding()}
  source = tfds.data_source("imagenet2012", split=split, data_dir=data_dir,
                            decoders=decoders)
  if num_examples is not None:
    source = _Head(source, num_examples)
  return GrainImagePipeline(source, global_batch_size=global_batch_size,
                            train=train, **kwargs)


class _Head:
  """The first `n` records of a random-access source."""

  def __init__(self, source, n):
    if not 0 < n <= len(source):
      raise ValueError(f"`num_examples` must be in [1, {len(source)}]; got {n}.")
    self.source, self.n = source, n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.source[i]
