"""Tests for kd_jax.data: in-memory pipelines, on-device augmentation, sources.

Synthetic arrays whose pixels encode the example index let every check be an
independent NumPy computation; CIFAR/ImageNet sources come from
`tfds.testing.mock_data`; the real MNIST is used when `KD_JAX_TEST_TFDS_DIR`
is set. Nothing touches the network.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import data
from kd_jax.data import pipeline as pipeline_lib

tfds = pytest.importorskip("tensorflow_datasets")


def _indexed_arrays(n, hw=4, c=1):
  """images[i] == i % 256 everywhere (+ a second channel i // 256); labels i."""
  images = np.zeros((n, hw, hw, c), np.uint8)
  images[..., 0] = (np.arange(n) % 256)[:, None, None]
  if c > 1:
    images[..., 1] = (np.arange(n) // 256)[:, None, None]
  return images, np.arange(n, dtype=np.int64)


def _pipe(n=50, batch=8, **kw):
  x, y = _indexed_arrays(n, c=2)
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  return data.InMemoryPipeline(x, y, global_batch_size=batch,
                               mean=(0.0, 0.0), std=(1.0, 1.0), **kw)


# --- index math / iteration ------------------------------------------------------

def test_epoch_permutation_deterministic_and_distinct():
  p0 = data.epoch_permutation(7, 0, 1000)
  assert np.array_equal(np.sort(p0), np.arange(1000))
  assert np.array_equal(p0, data.epoch_permutation(7, 0, 1000))
  assert not np.array_equal(p0, data.epoch_permutation(7, 1, 1000))
  assert not np.array_equal(p0, data.epoch_permutation(8, 0, 1000))


def test_train_epoch_covers_each_example_once_with_consistent_content():
  p = _pipe(n=50, batch=8, seed=3, with_index=True)
  assert p.steps_per_epoch == 6  # drop remainder: 48 of 50
  seen = []
  for b in p.epoch(0):
    assert b["image"].dtype == np.uint8 and b["image"].shape == (8, 4, 4, 2)
    assert b["label"].dtype == np.int32 and b["index"].dtype == np.int32
    assert "mask" not in b
    # image / label / index all refer to the same example.
    np.testing.assert_array_equal(b["label"], b["index"])
    np.testing.assert_array_equal(b["image"][:, 0, 0, 0], b["index"] % 256)
    seen.append(b["index"])
  seen = np.concatenate(seen)
  assert len(set(seen.tolist())) == 48
  # Order is the documented permutation; epochs differ.
  np.testing.assert_array_equal(seen, data.epoch_permutation(3, 0, 50)[:48])
  e1 = np.concatenate([b["index"] for b in p.epoch(1)])
  assert not np.array_equal(seen, e1)


def test_same_seed_same_stream_other_seed_differs():
  a = [b["label"] for b in _pipe(seed=1).epoch(0)]
  b = [b["label"] for b in _pipe(seed=1).epoch(0)]
  c = [b["label"] for b in _pipe(seed=2).epoch(0)]
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  assert not np.array_equal(np.stack(a), np.stack(c))


@pytest.mark.parametrize("count", [2, 4])
def test_process_shards_disjoint_and_union_is_global_batch(count):
  single = _pipe(n=70, batch=8, seed=5)
  shards = [_pipe(n=70, batch=8, seed=5, process_index=i, process_count=count)
            for i in range(count)]
  assert all(s.local_batch_size == 8 // count for s in shards)
  for epoch in (0, 1):
    for step in range(single.steps_per_epoch):
      parts = [s.get_batch(epoch, step)["label"] for s in shards]
      flat = np.concatenate(parts)
      assert len(set(flat.tolist())) == flat.size  # disjoint
      np.testing.assert_array_equal(flat, single.get_batch(epoch, step)["label"])


def test_resume_from_position_is_exact():
  p = _pipe(n=30, batch=4, seed=11)  # 7 steps per epoch
  it = p.iterator()
  stream = [next(it)["label"] for _ in range(20)]  # crosses 2 epochs
  it2 = p.iterator()
  for _ in range(9):
    next(it2)
  state = it2.get_state()
  assert state == {"epoch": 1, "step": 2}
  # A fresh pipeline object (as after a restart) resumes from the JSON state.
  import json
  it3 = _pipe(n=30, batch=4, seed=11).iterator(json.loads(json.dumps(state)))
  rest = [next(it3)["label"] for _ in range(11)]
  np.testing.assert_array_equal(np.stack(rest), np.stack(stream[9:]))


def test_next_chunk_stacks_consecutive_batches():
  p = _pipe(n=30, batch=4, seed=2)
  ref = p.iterator()
  expected = [next(ref) for _ in range(10)]
  it = p.iterator()
  c1 = it.next_chunk(3)
  c2 = it.next_chunk(7)  # crosses the epoch boundary (7 steps / epoch)
  assert c1["image"].shape == (3, 4, 4, 4, 2) and c2["label"].shape == (7, 4)
  got = np.concatenate([c1["label"], c2["label"]])
  np.testing.assert_array_equal(got, np.stack([b["label"] for b in expected]))
  assert it.position == ref.position == {"epoch": 1, "step": 3}
  # Chunks within one epoch.
  chunks = list(p.epoch(0, steps_per_chunk=3))
  assert [c["label"].shape[0] for c in chunks] == [3, 3, 1]


def test_num_epochs_stops_and_chunk_does_not_overrun():
  p = _pipe(n=20, batch=4)
  it = p.iterator(num_epochs=2)
  assert len(list(it)) == 10
  it = p.iterator({"epoch": 1, "step": 3}, num_epochs=2)
  with pytest.raises(StopIteration):
    it.next_chunk(3)
  assert it.position == {"epoch": 1, "step": 3}  # unchanged
  assert it.next_chunk(2)["label"].shape == (2, 4)


def test_eval_pipeline_padding_and_mask():
  p = _pipe(n=10, batch=4, shuffle=False, drop_remainder=False,
            process_index=1, process_count=2)
  assert p.steps_per_epoch == 3
  batches = list(p.epoch(0))
  # Process 1 of 2 takes the second half of each global batch of 4.
  np.testing.assert_array_equal(batches[0]["label"], [2, 3])
  np.testing.assert_array_equal(batches[1]["label"], [6, 7])
  # Last global batch = examples 8, 9 then 2 pads: process 1 gets only pads.
  assert batches[2]["mask"].tolist() == [False, False]
  assert all(b["mask"].dtype == bool for b in batches)
  p0 = _pipe(n=10, batch=4, shuffle=False, drop_remainder=False,
             process_index=0, process_count=2)
  last = list(p0.epoch(0))[-1]
  assert last["mask"].tolist() == [True, True]
  np.testing.assert_array_equal(last["label"], [8, 9])


def test_bad_arguments():
  x, y = _indexed_arrays(10)
  with pytest.raises(ValueError, match=r"`global_batch_size` \(6\) must be divisible "
                                       r"by `process_count` \(4\)"):
    data.InMemoryPipeline(x, y, global_batch_size=6, process_index=0, process_count=4)
  with pytest.raises(ValueError, match=r"`process_index` must be in \[0, 2\)"):
    data.InMemoryPipeline(x, y, global_batch_size=2, process_index=2, process_count=2)
  with pytest.raises(ValueError, match=r"exceeds the dataset size \(10\)"):
    data.InMemoryPipeline(x, y, global_batch_size=16, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"`labels` must have shape \[10\]"):
    data.InMemoryPipeline(x, y[:5], global_batch_size=2)
  p = _pipe()
  with pytest.raises(ValueError, match="`position` must be a dict"):
    p.iterator({"epoch": 0})
  with pytest.raises(ValueError, match="exceeds steps_per_epoch"):
    p.iterator({"epoch": 0, "step": 99})


def test_default_process_is_jax_process():
  x, y = _indexed_arrays(10)
  p = data.InMemoryPipeline(x, y, global_batch_size=2)
  assert (p.process_index, p.process_count) == (jax.process_index(),
                                                jax.process_count())


# --- on-device augmentation -------------------------------------------------------

def _np_crop_candidates(img, pad):
  """All (dy, dx, flip) views of `img` under pad+crop+flip, float64 NumPy."""
  h, w = img.shape[:2]
  padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
  out = {}
  for dy in range(2 * pad + 1):
    for dx in range(2 * pad + 1):
      v = padded[dy:dy + h, dx:dx + w]
      out[(dy, dx, 0)] = v
      out[(dy, dx, 1)] = v[:, ::-1]
  return out


def test_random_crop_flip_is_a_valid_view_and_covers_all_offsets():
  rng = np.random.default_rng(0)
  imgs = rng.integers(1, 256, (64, 6, 6, 2)).astype(np.uint8)  # no zeros
  out = np.asarray(jax.jit(lambda k, x: data.random_crop_flip(k, x, padding=2))(
      jax.random.key(1), imgs))
  assert out.dtype == np.uint8 and out.shape == imgs.shape
  found = []
  for i in range(len(imgs)):
    matches = [k for k, v in _np_crop_candidates(imgs[i], 2).items()
               if np.array_equal(v, out[i])]
    assert matches, f"example {i} is not a padded crop/flip of its input"
    found.append(matches[0])
  found = np.array(found)
  assert set(found[:, 0]) == set(range(5)) and set(found[:, 1]) == set(range(5))
  assert 10 < found[:, 2].sum() < 54  # flip probability 1/2 (64 draws)
  # Same key -> same output; different key -> different.
  again = data.random_crop_flip(jax.random.key(1), imgs, padding=2)
  np.testing.assert_array_equal(out, np.asarray(again))
  other = data.random_crop_flip(jax.random.key(2), imgs, padding=2)
  assert not np.array_equal(out, np.asarray(other))


def test_normalize_matches_numpy():
  x = np.random.default_rng(0).integers(0, 256, (2, 3, 3, 3)).astype(np.uint8)
  mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
  ref = (x.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
  got = data.normalize(jnp.asarray(x), mean, std)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="one value per channel"):
    data.normalize(jnp.asarray(x), (0.5,), (0.5,))


def test_preprocess_views_and_chunks():
  rng = np.random.default_rng(1)
  batch = {"image": rng.integers(1, 256, (2, 5, 6, 6, 1)).astype(np.uint8),
           "label": np.arange(10).reshape(2, 5).astype(np.int32)}
  shared = jax.jit(data.make_preprocess_fn(mean=(0.0,), std=(1.0 / 255,),
                                           crop_padding=1, flip=True))
  out = shared(jax.random.key(0), batch)
  assert set(out) == {"image", "label"} and out["image"].shape == (2, 5, 6, 6, 1)
  np.testing.assert_array_equal(out["label"], batch["label"])
  img = np.asarray(out["image"])  # std 1/255 -> values are the raw pixels
  for s in range(2):
    for i in range(5):
      cands = _np_crop_candidates(batch["image"][s, i], 1).values()
      assert any(np.array_equal(v.astype(np.float32), img[s, i]) for v in cands)
  # Steps of a chunk get different augmentations of identical inputs.
  same = {"image": np.repeat(batch["image"][:1], 2, axis=0), "label": batch["label"]}
  o2 = np.asarray(shared(jax.random.key(3), same)["image"])
  assert not np.array_equal(o2[0], o2[1])
  # Separate teacher view: both valid, different from each other.
  sep = jax.jit(data.make_preprocess_fn(mean=(0.0,), std=(1.0 / 255,),
                                        crop_padding=1, flip=True,
                                        separate_teacher_view=True))
  o3 = sep(jax.random.key(0), batch)
  assert o3["teacher_image"].shape == o3["image"].shape
  assert not np.array_equal(np.asarray(o3["teacher_image"]), np.asarray(o3["image"]))
  # No augmentation: rng unused, pure normalization.
  plain = data.make_preprocess_fn(mean=(0.5,), std=(0.25,))
  o4 = plain(None, {"image": batch["image"][0]})
  np.testing.assert_allclose(
      np.asarray(o4["image"]),
      (batch["image"][0].astype(np.float64) / 255 - 0.5) / 0.25, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="must have an 'image' entry"):
    plain(None, {"label": batch["label"]})


# --- TFDS sources (mock) ------------------------------------------------------------

@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_mock_arrays_cache_and_pipeline(tmp_path, name, classes):
  with tfds.testing.mock_data(num_examples=40,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    x, y = data.load_arrays(name, "train", cache_dir=str(tmp_path))
    src = tfds.data_source(name, split="train")
    ref_x = np.stack([src[i]["image"] for i in range(len(src))])
    ref_y = np.array([src[i]["label"] for i in range(len(src))])
  assert x.shape == (40, 32, 32, 3) and x.dtype == np.uint8
  assert y.dtype == np.int32 and y.min() >= 0 and y.max() < classes
  np.testing.assert_array_equal(x, ref_x)
  np.testing.assert_array_equal(y, ref_y)
  cached = list((tmp_path / name).glob("kd_jax_cache_train.npz"))
  assert len(cached) == 1
  # Second load comes from the cache (no TFDS mock active any more).
  x2, y2 = data.load_arrays(name, "train", cache_dir=str(tmp_path),
                            data_dir=str(tmp_path / "unused"))
  np.testing.assert_array_equal(x2, x)

  with tfds.testing.mock_data(num_examples=40,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    p = data.create_pipeline(name, "train", global_batch_size=16, train=True,
                             seed=0, use_cache=False, process_index=0,
                             process_count=1, with_index=True)
  b = next(p.iterator())
  np.testing.assert_array_equal(b["image"], x[b["index"]])
  out = jax.jit(p.preprocess_fn())(jax.random.key(0), b)
  info = data.dataset_info(name)
  lo = (0.0 - np.array(info.mean)) / np.array(info.std)
  hi = (1.0 - np.array(info.mean)) / np.array(info.std)
  img = np.asarray(out["image"])
  assert img.dtype == np.float32 and img.shape == (16, 32, 32, 3)
  assert (img >= lo - 1e-5).all() and (img <= hi + 1e-5).all()
  # Each augmented image is a 4-pixel-padded crop (+flip) of its source.
  raw = b["image"][0].astype(np.float64)
  cands = [(v / 255 - np.array(info.mean)) / np.array(info.std)
           for v in _np_crop_candidates(raw, 4).values()]
  assert min(np.abs(c - img[0]).max() for c in cands) < 1e-4
  # Eval preprocessing is normalization only.
  ev = p.preprocess_fn(train=False)(None, b)
  np.testing.assert_allclose(
      np.asarray(ev["image"]),
      (b["image"] / 255.0 - np.array(info.mean)) / np.array(info.std), atol=1e-5)


def test_unknown_dataset():
  with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
    data.dataset_info("svhn")
  with pytest.raises(ValueError, match="does not fit in memory"):
    data.load_arrays("imagenet2012", "train")


# --- real MNIST ----------------------------------------------------------------------

_MNIST_DIR = os.environ.get("KD_JAX_TEST_TFDS_DIR")


@pytest.mark.skipif(not _MNIST_DIR, reason="KD_JAX_TEST_TFDS_DIR (real MNIST in "
                    "TFDS format) not set")
def test_real_mnist_test_split(tmp_path):
  p = data.create_pipeline("mnist", "test", global_batch_size=1000, train=False,
                           data_dir=_MNIST_DIR, cache_dir=str(tmp_path),
                           process_index=0, process_count=1)
  assert p.num_examples == 10000 and p.steps_per_epoch == 10
  labels = np.concatenate([b["label"] for b in p.epoch(0)])
  # Label counts published in shared/data/README.md (computed from the IDX files).
  np.testing.assert_array_equal(
      np.bincount(labels, minlength=10),
      [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
  b = next(p.iterator())
  assert b["image"].shape == (1000, 28, 28, 1) and b["image"].dtype == np.uint8
  assert b["mask"].all()
  out = p.preprocess_fn(train=False)(None, b)
  ref = (b["image"].astype(np.float64) / 255 - 0.1307) / 0.3081
  np.testing.assert_allclose(np.asarray(out["image"]), ref, atol=1e-5)


# --- ImageNet (grain) ----------------------------------------------------------------

def _mock_imagenet(**kw):
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  kw.setdefault("image_size", 24)
  kw.setdefault("resize_size", 28)
  split = "train" if kw["train"] else "validation"
  with tfds.testing.mock_data(num_examples=24,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    return data.imagenet_pipeline(split, decode_in_tfds=True, **kw)


def test_imagenet_mock_train_batches():
  p = _mock_imagenet(global_batch_size=8, train=True, seed=1, with_index=True)
  assert p.steps_per_epoch == 3
  it = p.iterator()
  batches = [next(it) for _ in range(4)]  # crosses into epoch 1
  b = batches[0]
  assert b["image"].shape == (8, 24, 24, 3) and b["image"].dtype == np.uint8
  assert b["label"].dtype == np.int32 and b["index"].dtype == np.int32
  assert ((b["label"] >= 0) & (b["label"] < 1000)).all()
  idx0 = np.concatenate([x["index"] for x in batches[:3]])
  assert sorted(idx0.tolist()) == list(range(24))  # epoch 0 covers everything
  np.testing.assert_array_equal(idx0, data.epoch_permutation(1, 0, 24))
  labels = [p.source[int(i)]["label"] for i in b["index"]]
  np.testing.assert_array_equal(b["label"], labels)
  # Normalized output lies in the ImageNet-normalized pixel range.
  out = np.asarray(jax.jit(p.preprocess_fn())(None, b)["image"])
  mean, std = np.array(data.dataset_info("imagenet2012").mean), np.array(
      data.dataset_info("imagenet2012").std)
  assert out.dtype == np.float32
  assert (out >= -mean / std - 1e-5).all() and (out <= (1 - mean) / std + 1e-5).all()
  # Determinism: same seed -> identical stream; other seed -> different.
  again = _mock_imagenet(global_batch_size=8, train=True, seed=1, with_index=True)
  it2 = again.iterator()
  for ref in batches:
    got = next(it2)
    np.testing.assert_array_equal(got["image"], ref["image"])
    np.testing.assert_array_equal(got["index"], ref["index"])
  other = next(_mock_imagenet(global_batch_size=8, train=True, seed=2,
                              with_index=True).iterator())
  assert not np.array_equal(other["index"], b["index"])
  # Exact resume from a JSON position.
  it3 = p.iterator({"epoch": 0, "step": 2})
  np.testing.assert_array_equal(next(it3)["image"], batches[2]["image"])
  assert it3.position == {"epoch": 1, "step": 0}
  chunk = it3.next_chunk(1)
  np.testing.assert_array_equal(chunk["image"][0], batches[3]["image"])


def test_imagenet_mock_process_shards_and_eval():
  single = _mock_imagenet(global_batch_size=8, train=True, seed=3, with_index=True)
  shards = [_mock_imagenet(global_batch_size=8, train=True, seed=3,
                           with_index=True, process_index=i, process_count=2)
            for i in range(2)]
  for step in range(3):
    parts = [s.get_batch(0, step) for s in shards]
    flat = np.concatenate([x["index"] for x in parts])
    assert len(set(flat.tolist())) == 8
    ref = single.get_batch(0, step)
    np.testing.assert_array_equal(flat, ref["index"])
    np.testing.assert_array_equal(
        np.concatenate([x["image"] for x in parts]), ref["image"])
  ev = _mock_imagenet(global_batch_size=10, train=False, with_index=True)
  batches = list(ev.iterator(num_epochs=1))
  assert len(batches) == 3
  assert [int(b["mask"].sum()) for b in batches] == [10, 10, 4]
  np.testing.assert_array_equal(
      np.concatenate([b["index"][b["mask"]] for b in batches]), np.arange(24))


def test_imagenet_worker_processes_match_in_process():
  p = _mock_imagenet(global_batch_size=4, train=True, seed=0, num_workers=1,
                     separate_teacher_view=True)
  it = p.iterator({"epoch": 1, "step": 2})
  try:
    got = [next(it) for _ in range(3)]
  finally:
    it.close()
  for k, g in enumerate(got):
    e, s = divmod(p.steps_per_epoch + 2 + k, p.steps_per_epoch)
    ref = p.get_batch(e, s)
    np.testing.assert_array_equal(g["image"], ref["image"])
    np.testing.assert_array_equal(g["teacher_image"], ref["teacher_image"])
  # The teacher's own view is a different random crop of the same examples.
  assert not np.array_equal(got[0]["image"], got[0]["teacher_image"])
  out = p.preprocess_fn()(None, got[0])
  assert out["teacher_image"].dtype == jnp.float32


def test_eval_crop_is_exact_center_slice_when_no_resize():
  from kd_jax.data import imagenet
  img = np.random.default_rng(0).integers(0, 256, (40, 36, 3)).astype(np.uint8)
  out = imagenet.eval_crop(img, size=32, resize_size=36)  # shorter side 36
  np.testing.assert_array_equal(out, img[4:36, 2:34])
  with pytest.raises(ValueError, match=r"`resize_size` \(30\) must be >= `size` \(32\)"):
    imagenet.eval_crop(img, size=32, resize_size=30)


def test_train_crop_full_image_is_identity_or_flip():
  from kd_jax.data import imagenet
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
  flips = 0
  for _ in range(20):
    out = imagenet.train_crop(img, rng, size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    if np.array_equal(out, img[:, ::-1]):
      flips += 1
    else:
      np.testing.assert_array_equal(out, img)
  assert 0 < flips < 20


def test_random_resized_crop_box_bounds():
  from kd_jax.data import imagenet
  rng = np.random.default_rng(0)
  for _ in range(300):
    h, w = int(rng.integers(20, 300)), int(rng.integers(20, 300))
    top, left, ch, cw = imagenet.random_resized_crop_box(rng, h, w)
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
    assert ch > 0 and cw > 0
  # Rounded sides: area fraction / aspect within the ranges up to rounding.
  for _ in range(300):
    top, left, ch, cw = imagenet.random_resized_crop_box(rng, 400, 400)
    assert 0.08 * 400 ** 2 * 0.9 <= ch * cw <= 400 ** 2
    assert 3 / 4 * 0.95 <= cw / ch <= 4 / 3 * 1.05
  # Impossible requests fall back to the central crop with clamped aspect.
  assert imagenet.random_resized_crop_box(rng, 100, 400, scale=(2.0, 3.0)) == (
      0, 133, 100, 133)


def test_jpeg_draft_decoding_matches_full_decode():
  import io as io_lib
  from PIL import Image
  from kd_jax.data import imagenet
  yy, xx = np.mgrid[0:480, 0:640]
  img = np.stack([xx * 255 // 639, yy * 255 // 479, (xx + yy) * 255 // 1118],
                 -1).astype(np.uint8)
  buf = io_lib.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=95)
  jpeg = buf.getvalue()
  for seed in range(3):
    fast = imagenet.train_crop(jpeg, np.random.default_rng(seed), size=32,
                               jpeg_draft=True)
    full = imagenet.train_crop(jpeg, np.random.default_rng(seed), size=32,
                               jpeg_draft=False)
    assert fast.shape == full.shape == (32, 32, 3)
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 3.0
  ev_fast = imagenet.eval_crop(jpeg, size=32, resize_size=36, jpeg_draft=True)
  ev_full = imagenet.eval_crop(jpeg, size=32, resize_size=36, jpeg_draft=False)
  assert np.abs(ev_fast.astype(int) - ev_full.astype(int)).mean() < 3.0
