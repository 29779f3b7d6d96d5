"""Same-class pairs of the in-memory pipeline (CS-KD's `PairBatchSampler`).

Pixels encode the example index, labels are a known function of it, so every
check is an independent NumPy computation: partners share the anchor's
class, images / labels / indices of a partner agree, the draw is a pure
function of (seed, epoch) (restarts, chunks and process shards see the same
pairs) and uniform over the class (the authors' `random.choice`).
"""

import numpy as np
import pytest

from kd_jax import data


def _arrays(n, classes):
  images = np.zeros((n, 2, 2, 2), np.uint8)
  images[..., 0] = (np.arange(n) % 256)[:, None, None]
  images[..., 1] = (np.arange(n) // 256)[:, None, None]
  labels = (np.arange(n) * 7) % classes  # interleaved, unequal classes
  return images, labels


def _pipe(n=60, classes=7, batch=8, **kw):
  x, y = _arrays(n, classes)
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  return data.InMemoryPipeline(x, y, global_batch_size=batch,
                               mean=(0.0, 0.0), std=(1.0, 1.0),
                               same_class_pairs=True, with_index=True, **kw)


def _decode(img):
  return (img[:, 0, 0, 0].astype(np.int64)
          + 256 * img[:, 0, 0, 1].astype(np.int64))


def test_batches_carry_consistent_same_class_partners():
  p = _pipe(seed=3)
  _, y = _arrays(60, 7)
  for epoch in range(2):
    for b in p.epoch(epoch):
      assert b["pair_index"].dtype == np.int32
      np.testing.assert_array_equal(_decode(b["image_pair"]), b["pair_index"])
      np.testing.assert_array_equal(b["label_pair"], y[b["pair_index"]])
      np.testing.assert_array_equal(b["label_pair"], b["label"])
      np.testing.assert_array_equal(_decode(b["image"]), b["index"])


def test_partners_are_a_pure_function_of_seed_and_epoch():
  a, b = _pipe(seed=5), _pipe(seed=5)
  np.testing.assert_array_equal(a.partners(2), b.partners(2))
  assert not np.array_equal(a.partners(2), a.partners(3))
  assert not np.array_equal(a.partners(2), _pipe(seed=6).partners(2))
  # Resuming from a position reproduces the pairs; chunks equal steps.
  it = a.iterator({"epoch": 1, "step": 3})
  first = next(it)
  np.testing.assert_array_equal(first["pair_index"],
                                b.get_batch(1, 3)["pair_index"])
  chunk = a.iterator({"epoch": 0, "step": 5}).next_chunk(4)  # crosses epochs
  steps = [b.get_batch(0, 5), b.get_batch(0, 6), b.get_batch(1, 0),
           b.get_batch(1, 1)]
  assert b.steps_per_epoch == 7
  for j, s in enumerate(steps):
    for k in ("index", "pair_index", "image_pair", "label_pair"):
      np.testing.assert_array_equal(chunk[k][j], s[k])


@pytest.mark.parametrize("count", [2, 4])
def test_process_shards_see_the_global_batchs_pairs(count):
  single = _pipe(seed=1, batch=8)
  shards = [_pipe(seed=1, batch=8, process_index=i, process_count=count)
            for i in range(count)]
  for step in range(single.steps_per_epoch):
    want = single.get_batch(4, step)["pair_index"]
    got = np.concatenate([s.get_batch(4, step)["pair_index"] for s in shards])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_partner_draw_is_uniform_over_the_class(exclude_self):
  # 4 classes of sizes 5, 5, 5, 5 -> interleaved labels; 2000 epochs of draws.
  y = np.arange(20) % 4
  counts = np.zeros((20, 20))
  for epoch in range(2000):
    part = data.same_class_partners(0, epoch, y, exclude_self=exclude_self)
    assert np.all(y[part] == y)
    counts[np.arange(20), part] += 1
  same = y[:, None] == y[None, :]
  assert np.all(counts[~same] == 0)
  diag = np.diag(counts)
  if exclude_self:
    assert np.all(diag == 0)
    expected = 2000 / 4
  else:  # the authors' random.choice: the example itself 1 time in 5
    expected = 2000 / 5
    assert np.all(np.abs(diag - expected) < 0.2 * expected)
  off = counts[same & ~np.eye(20, dtype=bool)]
  assert np.all(np.abs(off - expected) < 0.2 * expected), off


def test_padding_and_errors():
  x, y = _arrays(10, 3)
  ev = data.InMemoryPipeline(x, y, global_batch_size=4, shuffle=False,
                             drop_remainder=False, same_class_pairs=True,
                             process_index=0, process_count=1)
  last = ev.get_batch(0, 2)  # examples 8, 9 then two pads
  np.testing.assert_array_equal(last["mask"], [True, True, False, False])
  np.testing.assert_array_equal(last["label_pair"][:2], y[8:10])
  np.testing.assert_array_equal(last["pair_index"][2:], [0, 0])
  y1 = y.copy()
  y1[0] = 9  # class 9 has a single example
  with pytest.raises(ValueError, match="class 9 has 1"):
    data.InMemoryPipeline(x, y1, global_batch_size=2, same_class_pairs=True,
                          pair_exclude_self=True, process_index=0,
                          process_count=1)
  # Allowed with the authors' sampler: the example is its own partner.
  p = data.InMemoryPipeline(x, y1, global_batch_size=2, same_class_pairs=True,
                            process_index=0, process_count=1)
  assert p.partners(0)[0] == 0
  plain = data.InMemoryPipeline(x, y, global_batch_size=2, process_index=0,
                                process_count=1)
  assert "image_pair" not in plain.get_batch(0, 0)
  with pytest.raises(ValueError, match="without same_class_pairs"):
    plain.partners(0)
