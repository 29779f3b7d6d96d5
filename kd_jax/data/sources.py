"""Dataset registry and in-memory array loading (TFDS `data_source`, no TF).

MNIST, CIFAR-10 and CIFAR-100 fit in host memory (47 MB / 184 MB as uint8),
so each split is decoded from TFDS's `array_record` files once, cached as an
`.npz` file and served as plain uint8 arrays. Augmentation then runs on the
fly (on device, see `kd_jax.data.augment`), never the per-record PNG decoding
that dominates slow JAX input pipelines.

Normalization constants are the ones the reference distillation code uses
(RepDistiller / mdistiller for CIFAR-100, torchvision for ImageNet).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import zipfile
import zlib
from typing import Optional, Tuple

import numpy as np

from kd_jax import logs
from kd_jax import metrics_io


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset.

  Attributes:
    name: TFDS name.
    num_classes: number of labels.
    image_shape: `(H, W, C)` of one decoded (train) example; `None` when
      images have variable size (ImageNet).
    mean, std: per-channel normalization on `[0, 1]` pixel values.
    train_split, eval_split: TFDS split names.
    in_memory: whether the whole dataset is decoded once into arrays.
    crop_padding: zero padding of the standard train random crop (CIFAR: 4),
      `None` for no crop augmentation.
    flip: whether the standard train augmentation has a horizontal flip.
  """
  name: str
  num_classes: int
  image_shape: Optional[Tuple[int, int, int]]
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  train_split: str
  eval_split: str
  in_memory: bool
  crop_padding: Optional[int]
  flip: bool


MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# RepDistiller / mdistiller `get_cifar100_dataloaders`.
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

DATASETS = {
    "mnist": DatasetInfo("mnist", 10, (28, 28, 1), MNIST_MEAN, MNIST_STD,
                         "train", "test", True, None, False),
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3), CIFAR10_MEAN,
                           CIFAR10_STD, "train", "test", True, 4, True),
    "cifar100": DatasetInfo("cifar100", 100, (32, 32, 3), CIFAR100_MEAN,
                            CIFAR100_STD, "train", "test", True, 4, True),
    "imagenet2012": DatasetInfo("imagenet2012", 1000, None, IMAGENET_MEAN,
                                IMAGENET_STD, "train", "validation", False,
                                None, True),
}


def dataset_info(name: str) -> DatasetInfo:
  """Returns the `DatasetInfo` for a supported dataset name."""
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; supported: "
                     f"{', '.join(sorted(DATASETS))}.")
  return DATASETS[name]


def _cache_file(base: str, name: str, split: str) -> str:
  safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", split)
  return os.path.join(base, name, f"kd_jax_cache_{safe}.npz")


def _read_records(source, indices):
  """`source.__getitems__` with a per-record fallback (TFDS mocks lack it)."""
  try:
    return source.__getitems__(list(indices))
  except TypeError:
    return [source[i] for i in indices]


class DatasetNotFoundError(FileNotFoundError):
  """A dataset that is not in the TFDS data dir and could not be prepared."""


def _is_prepared(name: str, data_dir: Optional[str]) -> bool:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder(name, data_dir=data_dir).is_prepared()
  except Exception:  # pylint: disable=broad-except
    return False


def _data_source(name: str, split: str, data_dir: Optional[str]):
  """`tfds.data_source`, with a `DatasetNotFoundError` naming the dataset,
  the folder searched and how to prepare it when it is absent and TFDS
  cannot prepare it (no network, missing download dependencies)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    if _is_prepared(name, data_dir):
      raise
    folder = data_dir or tfds.core.constants.DATA_DIR
    cause = (str(e).strip().splitlines() or [""])[0]
    raise DatasetNotFoundError(
        f"dataset {name!r} not found in folder {folder!r} and TFDS could not "
        f"prepare it ({type(e).__name__}: {cause}). Prepare it on a machine "
        f"with network access with `tfds build {name} --data_dir={folder}` "
        "(or `python -c \"import tensorflow_datasets as tfds; "
        f"tfds.builder('{name}', data_dir='{folder}').download_and_prepare()"
        "\"`), or point TFDS_DATA_DIR / --config.data.data_dir at a folder "
        "that holds it.") from None


def _read_cache(path: str, info):
  """The cached `(images, labels)`, or None after setting a damaged cache
  aside (renamed, with one warning): it is then rebuilt from the dataset."""
  try:
    with np.load(path) as f:
      images, labels = f["image"], f["label"]
    if images.shape[1:] != tuple(info.image_shape) or len(images) != len(
        labels):
      raise ValueError(f"shapes {images.shape} / {labels.shape}")
    return images, labels
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile,
          zlib.error) as e:
    moved = metrics_io.set_aside(path)
    logging.warning("data cache %s is damaged (%s: %s); moved to %s and "
                    "rebuilt from the dataset.", path, type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "", moved)
    return None


def load_arrays(name: str, split: str, *, data_dir: Optional[str] = None,
                cache_dir: Optional[str] = None, use_cache: bool = True
                ) -> Tuple[np.ndarray, np.ndarray]:
  """Decodes a whole TFDS split to `(images uint8 [N,H,W,C], labels int32 [N])`.

  Records keep TFDS's order (so example `i` is TFDS record `i`, the index
  CRD-style methods use). Every dataset is
  cached as `<cache_dir or data_dir>/<name>/kd_jax_cache_<split>.npz` (the
  cache is trusted as is: delete it after changing the TFDS data; a cache
  that does not load is set aside with one warning and rebuilt). An
  unwritable cache location just disables caching.

  Args:
    name: `'mnist'`, `'cifar10'` or `'cifar100'`.
    split: a TFDS split string (`'train'`, `'test'`, `'train[:10%]'`, ...).
    data_dir: TFDS data dir (default: `$TFDS_DATA_DIR`, then TFDS's default).
    cache_dir: where to put the `.npz` cache (default: next to the data).
    use_cache: read/write the `.npz` cache.

  Returns:
    `(images, labels)` as NumPy arrays.
  """
  info = dataset_info(name)
  if not info.in_memory:
    raise ValueError(f"dataset {name!r} does not fit in memory; use "
                     "`kd_jax.data.imagenet_pipeline` instead.")
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
  base = cache_dir or data_dir
  path = _cache_file(base, name, split) if (use_cache and base) else None
  if path and os.path.exists(path):
    cached = _read_cache(path, info)
    if cached is not None:
      return cached
  source = _data_source(name, split, data_dir)
  n = len(source)
  images = np.empty((n,) + info.image_shape, np.uint8)
  labels = np.empty((n,), np.int32)
  chunk = 4096
  # TFDS decodes PNGs with PIL when OpenCV is absent (same pixels) and says so.
  with logs.quiet_absl("OpenCV is not installed"):
    for start in range(0, n, chunk):
      recs = _read_records(source, range(start, min(n, start + chunk)))
      for j, r in enumerate(recs):
        images[start + j] = r["image"]
        labels[start + j] = r["label"]
  if path:
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = path + f".tmp{os.getpid()}.npz"
      np.savez(tmp, image=images, label=labels)
      os.replace(tmp, path)
    except OSError:
      pass  # read-only location: just don't cache.
  return images, labels
