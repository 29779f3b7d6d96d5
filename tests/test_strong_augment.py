"""`kd_jax.data.strong_augment` against PIL (the authors' RandAugment ops
are PIL operations, Jin-Ying/Multi-Level-Logit-Distillation
`mdistiller/dataset/cifar100.py`), plus determinism / per-example checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.data import strong_augment as sa

PIL = pytest.importorskip("PIL")
from PIL import Image, ImageEnhance, ImageOps  # noqa: E402

RS = np.random.RandomState(0)
IMG = RS.randint(0, 256, (10, 12, 3)).astype(np.uint8)
IMG[:3, :4] = 40  # some repeated values (histograms, autocontrast)


def pil_op(name, img, v):
  im = Image.fromarray(img)
  out = {
      "AutoContrast": lambda: ImageOps.autocontrast(im),
      "Brightness": lambda: ImageEnhance.Brightness(im).enhance(v),
      "Color": lambda: ImageEnhance.Color(im).enhance(v),
      "Contrast": lambda: ImageEnhance.Contrast(im).enhance(v),
      "Equalize": lambda: ImageOps.equalize(im),
      "Identity": lambda: im,
      "Posterize": lambda: ImageOps.posterize(im, max(1, int(v))),
      "Rotate": lambda: im.rotate(v),
      "Sharpness": lambda: ImageEnhance.Sharpness(im).enhance(v),
      "ShearX": lambda: im.transform(im.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
      "ShearY": lambda: im.transform(im.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
      "Solarize": lambda: ImageOps.solarize(im, v),
      "TranslateX": lambda: im.transform(
          im.size, Image.AFFINE, (1, 0, v * im.size[0], 0, 1, 0)),
      "TranslateY": lambda: im.transform(
          im.size, Image.AFFINE, (1, 0, 0, 0, 1, v * im.size[1])),
  }[name]()
  return np.asarray(out, np.float64)


@pytest.mark.parametrize("op", range(len(sa.OPS)))
def test_ops_match_pil(op):
  name, lo, hi = sa.OPS[op]
  fn = jax.jit(sa.apply_op)
  for v in (lo + 0.3 * (hi - lo), lo + 0.85 * (hi - lo)):
    if name == "Solarize":
      v = float(int(v))
    got = np.asarray(fn(jnp.asarray(IMG, jnp.float32), op, v))
    want = pil_op(name, IMG, v)
    diff = np.abs(got - want)
    # at most one grey level apart, and only at a few pixels (rounding of
    # PIL's float32 blends / nearest-neighbour coordinates)
    assert np.mean(diff > 0) <= 0.05, (name, v, np.mean(diff > 0))
    if name not in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
      assert diff.max() <= 1, (name, v, diff.max())


def test_strong_augment_batch_semantics():
  x = np.stack([IMG] * 4)
  k = jax.random.PRNGKey(3)
  a = np.asarray(jax.jit(sa.strong_augment)(k, x))
  b = np.asarray(sa.strong_augment(k, x))
  assert a.dtype == np.uint8 and a.shape == x.shape
  np.testing.assert_array_equal(a, b)                    # pure in (rng, x)
  assert len({ai.tobytes() for ai in a}) == 4            # per-example draws
  c = np.asarray(sa.strong_augment(jax.random.PRNGKey(4), x))
  assert not np.array_equal(a, c)
  f = np.asarray(sa.strong_augment(k, x.astype(np.float32)))
  assert f.dtype == np.float32
  # one key per example: an example's output depends on its key only
  keys = jax.random.split(jax.random.PRNGKey(5), 4)
  d = np.asarray(sa.strong_augment(keys, x))
  e = np.asarray(jax.jit(sa.strong_augment)(keys[2:3], x[2:3]))  # (eager: ~10 s)
  np.testing.assert_array_equal(d[2:3], e)
  with pytest.raises(ValueError, match="NHWC"):
    sa.strong_augment(k, x[..., :1])


def test_crop_flip_is_a_padded_window_or_its_mirror():
  img = np.arange(6 * 5 * 3, dtype=np.float32).reshape(6, 5, 3) + 1
  pad = np.pad(img, ((2, 2), (2, 2), (0, 0)))
  windows = [pad[i:i + 6, j:j + 5] for i in range(5) for j in range(5)]
  windows += [w[:, ::-1] for w in windows]
  for seed in range(6):
    out = np.asarray(sa.crop_flip(jax.random.PRNGKey(seed), img, 2))
    assert any(np.array_equal(out, w) for w in windows)


def test_cutout_fills_a_square_with_the_reference_colour():
  img = jnp.zeros((16, 16, 3))
  out = np.asarray(sa.cutout(jax.random.PRNGKey(0), img, 5.0))
  filled = np.all(out == np.array(sa.CUTOUT_COLOR), axis=-1)
  ys, xs = np.nonzero(filled)
  # PIL rectangle with inclusive corners: 6x6 unless clipped at the border
  assert 1 <= np.ptp(ys) + 1 <= 6 and 1 <= np.ptp(xs) + 1 <= 6
  assert filled.sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1)
