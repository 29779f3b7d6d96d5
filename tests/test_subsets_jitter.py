"""Transfer sets without some classes, validation splits
(`kd_jax.data.subsets`) and the input jitter (`random_translate`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import data
from kd_jax.data import augment


def _np_shift(img, dy, dx):
  """Float64-free NumPy transcription: out[i, j] = img[i - dy, j - dx], 0
  outside."""
  h, w = img.shape[:2]
  out = np.zeros_like(img)
  for i in range(h):
    for j in range(w):
      si, sj = i - dy, j - dx
      if 0 <= si < h and 0 <= sj < w:
        out[i, j] = img[si, sj]
  return out


def _matching_shifts(x, y, k):
  return [(dy, dx) for dy in range(-k, k + 1) for dx in range(-k, k + 1)
          if np.array_equal(_np_shift(x, dy, dx), y)]


def test_random_translate_is_a_shift_and_covers_all_shifts():
  k, b = 2, 400
  rng = np.random.default_rng(0)
  x = rng.integers(1, 256, (b, 9, 8, 1)).astype(np.uint8)  # no zero pixels
  y = np.asarray(augment.random_translate(jax.random.key(3), jnp.asarray(x),
                                          max_shift=k))
  assert y.dtype == np.uint8 and y.shape == x.shape
  seen = []
  for i in range(b):
    m = _matching_shifts(x[i], y[i], k)
    assert len(m) == 1, (i, m)
    seen.append(m[0])
  counts = {s: seen.count(s) for s in set(seen)}
  assert len(counts) == (2 * k + 1) ** 2  # every shift in [-k, k]^2 occurs
  assert max(counts.values()) < 3 * b / (2 * k + 1) ** 2


def test_random_translate_zero_shift_and_bad_arguments():
  x = jnp.ones((2, 4, 4, 1))
  assert augment.random_translate(jax.random.key(0), x, max_shift=0) is x
  for bad in (-1, 1.5, True):
    with pytest.raises(ValueError, match="max_shift"):
      augment.random_translate(jax.random.key(0), x, max_shift=bad)


def test_augment_batch_jitter_uses_per_example_keys():
  rng = np.random.default_rng(1)
  imgs = rng.integers(1, 256, (6, 10, 10, 1)).astype(np.uint8)
  idx = np.array([5, 9, 2, 7, 11, 3], np.int32)
  key = jax.random.key(7)
  full = augment.augment_batch(key, {"image": jnp.asarray(imgs),
                                     "index": jnp.asarray(idx)},
                               mean=(0.0,), std=(1.0,), jitter=2)
  # the same examples in another batch (other order, other companions)
  perm = np.array([3, 0, 5])
  part = augment.augment_batch(key, {"image": jnp.asarray(imgs[perm]),
                                     "index": jnp.asarray(idx[perm])},
                               mean=(0.0,), std=(1.0,), jitter=2)
  np.testing.assert_array_equal(np.asarray(full["image"])[perm],
                                np.asarray(part["image"]))
  out = np.rint(np.asarray(full["image"]) * 255).astype(np.uint8)
  assert all(len(_matching_shifts(imgs[i], out[i], 2)) == 1 for i in range(6))
  assert any(not np.array_equal(imgs[i], out[i]) for i in range(6))
  plain = augment.augment_batch(None, {"image": jnp.asarray(imgs)},
                                mean=(0.0,), std=(1.0,), jitter=None)
  np.testing.assert_allclose(np.asarray(plain["image"]), imgs / 255.0,
                             rtol=1e-6)
  with pytest.raises(ValueError, match="jitter"):
    augment.augment_batch(key, {"image": jnp.asarray(imgs), "index": idx},
                          mean=(0.0,), std=(1.0,), jitter=-2)


def test_preprocess_fn_jitter_over_chunks():
  f = augment.make_preprocess_fn(mean=(0.0,), std=(1.0,), jitter=1)
  imgs = np.random.default_rng(2).integers(1, 256, (2, 3, 6, 6, 1)).astype(
      np.uint8)
  out = jax.jit(f)(jax.random.key(0), {"image": jnp.asarray(imgs)})
  assert out["image"].shape == imgs.shape
  got = np.rint(np.asarray(out["image"]) * 255).astype(np.uint8)
  for c in range(2):
    for i in range(3):
      assert len(_matching_shifts(imgs[c, i], got[c, i], 1)) == 1


def test_class_subset_and_transfer_set():
  labels = np.random.default_rng(3).integers(0, 10, 500).astype(np.int32)
  images = np.arange(500)[:, None]
  idx = data.class_subset(labels, omit=[3], num_classes=10)
  np.testing.assert_array_equal(idx, np.flatnonzero(labels != 3))
  x, y, idx2 = data.transfer_set(images, labels, keep=(7, 8))
  np.testing.assert_array_equal(idx2, np.flatnonzero((labels == 7) |
                                                     (labels == 8)))
  np.testing.assert_array_equal(x[:, 0], idx2)
  assert set(y.tolist()) == {7, 8}
  assert data.class_subset(labels).tolist() == list(range(500))
  with pytest.raises(ValueError, match="not both"):
    data.class_subset(labels, omit=[3], keep=[7])
  with pytest.raises(ValueError, match="omit"):
    data.class_subset(labels, omit=[10], num_classes=10)
  with pytest.raises(ValueError, match="empty"):
    data.class_subset(np.array([1, 2]), keep=[3])
  with pytest.raises(ValueError, match="1-D integer"):
    data.class_subset(np.zeros((2, 2), np.int32), omit=[1])
  with pytest.raises(ValueError, match="length"):
    data.transfer_set(images[:3], labels, omit=[3])


def test_split_validation():
  labels = np.random.default_rng(4).integers(0, 10, 1000)
  tr, va = data.split_validation(labels, 100, seed=0)
  assert len(va) == 100 and len(tr) == 900
  assert np.intersect1d(tr, va).size == 0
  np.testing.assert_array_equal(np.union1d(tr, va), np.arange(1000))
  per = np.bincount(labels[va], minlength=10)
  want = np.bincount(labels, minlength=10) * 0.1
  assert np.all(np.abs(per - want) < 1.0)  # stratified: each class its share
  tr2, va2 = data.split_validation(labels, 100, seed=0)
  np.testing.assert_array_equal(va, va2)
  _, va3 = data.split_validation(labels, 100, seed=1)
  assert not np.array_equal(va, va3)
  _, va4 = data.split_validation(labels, 100, seed=0, stratified=False)
  assert len(np.unique(va4)) == 100
  for bad in (0, 1000, 2.5):
    with pytest.raises(ValueError, match="num_validation"):
      data.split_validation(labels, bad, seed=0)
