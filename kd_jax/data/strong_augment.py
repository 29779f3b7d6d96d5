r"""Strong augmentation (RandAugment + Cutout) as a jittable, per-example op.

`strong_augment(rng, images)` is the strong view of MLKD: the authors'
`get_cifar100_train_transform_strong` applies `RandomCrop(32, padding=4)`,
`RandomHorizontalFlip()`, then FixMatch's `RandAugment(2, 10)`: two
operations drawn uniformly *with replacement* from the 14 below, each with a
magnitude drawn uniformly from its range, then `Cutout` of a square with side
`U(0, 0.5) * W` filled with the colour (125, 123, 114).

=============  ==================  ======================================
operation      magnitude range     what it does (PIL semantics)
=============  ==================  ======================================
AutoContrast   --                  per-channel min/max stretched to 0..255
Brightness     [0.05, 0.95]        blend with black
Color          [0.05, 0.95]        blend with the grayscale image
Contrast       [0.05, 0.95]        blend with the mean gray level
Equalize       --                  per-channel histogram equalization
Identity       --
Posterize      [4, 8]              keep the top `int(v)` bits
Rotate         [-30, 30] degrees   about the centre, fill 0
Sharpness      [0.05, 0.95]        blend with the 3x3 SMOOTH filter
ShearX/Y       [-0.3, 0.3]         affine shear, fill 0
Solarize       [0, 256]            invert the pixels >= v
TranslateX/Y   [-0.3, 0.3] x size  affine shift, fill 0
=============  ==================  ======================================

Simplifications (kd_jax): geometric operations sample with nearest
neighbours at the output pixel centres (as PIL's default `NEAREST`) and the
blends, the grayscale conversion and the histogram equalization follow PIL's
integer formulas; results match PIL up to one grey level at a few pixels
(tested). Randomness is per example: example `b` uses `fold_in(rng, b)`
(or its own key when `rng` holds one key per example), so a batch is a pure
function of `(rng, images)`.

Input: NHWC `[B, H, W, 3]`, uint8 (or float in 0..255); the output has the
input's dtype. Apply before normalization, as torchvision does.

References:
  Jin, Wang & Lin, "Multi-Level Logit Distillation", CVPR 2023 -- authors'
  code github.com/Jin-Ying/Multi-Level-Logit-Distillation
  (`mdistiller/dataset/cifar100.py`, `RandAugment`, `augment_list`).
  Sohn et al., "FixMatch", NeurIPS 2020; Cubuk et al., "RandAugment",
  CVPRW 2020.
"""

from __future__ import annotations

import math
from typing import Tuple

import jax
import jax.numpy as jnp


# (name, min, max) in the authors' `augment_list()` order.
OPS: Tuple[Tuple[str, float, float], ...] = (
    ("AutoContrast", 0, 1), ("Brightness", 0.05, 0.95),
    ("Color", 0.05, 0.95), ("Contrast", 0.05, 0.95), ("Equalize", 0, 1),
    ("Identity", 0, 1), ("Posterize", 4, 8), ("Rotate", -30, 30),
    ("Sharpness", 0.05, 0.95), ("ShearX", -0.3, 0.3), ("ShearY", -0.3, 0.3),
    ("Solarize", 0, 256), ("TranslateX", -0.3, 0.3),
    ("TranslateY", -0.3, 0.3))
CUTOUT_COLOR = (125.0, 123.0, 114.0)


def _blend(degenerate, img, v):
  """PIL `Image.blend(degenerate, img, v)`: truncation to an integer."""
  return jnp.clip(jnp.floor(degenerate + v * (img - degenerate)), 0, 255)


def _gray(img):
  """PIL RGB -> L: `(19595 R + 38470 G + 7471 B + 2^15) >> 16`."""
  r, g, b = img[..., 0], img[..., 1], img[..., 2]
  return jnp.floor((19595 * r + 38470 * g + 7471 * b + 32768) / 65536)


def _autocontrast(img, v):
  del v
  lo = jnp.min(img, axis=(0, 1))
  hi = jnp.max(img, axis=(0, 1))
  # PIL's LUT: int(i * 255 / (hi - lo) - lo * 255 / (hi - lo)); the exact
  # values are multiples of 1 / (hi - lo) >= 1/255, so a 1e-3 guard makes
  # float32 floor() agree with PIL's float64 truncation.
  out = (img - lo) * 255.0 / jnp.maximum(hi - lo, 1.0)
  out = jnp.clip(jnp.floor(out + 1e-3), 0, 255)
  return jnp.where(hi > lo, out, img)


def _contrast(img, v):
  mean = jnp.floor(jnp.mean(_gray(img)) + 0.5)
  return _blend(jnp.full_like(img, mean), img, v)


def _equalize_channel(c):
  """PIL `ImageOps.equalize` for one uint8-valued channel `[H, W]`."""
  ci = c.astype(jnp.int32)
  hist = jnp.zeros((256,), jnp.int32).at[ci.reshape(-1)].add(1)
  last = hist[jnp.max(jnp.where(hist > 0, jnp.arange(256), 0))]
  step = (jnp.sum(hist) - last) // 255
  safe = jnp.maximum(step, 1)
  lut = (step // 2 + jnp.cumsum(hist) - hist) // safe
  lut = jnp.clip(lut, 0, 255).astype(c.dtype)
  return jnp.where(step > 0, lut[ci], c)


def _equalize(img, v):
  del v
  return jnp.stack([_equalize_channel(img[..., k])
                    for k in range(img.shape[-1])], axis=-1)


def _posterize(img, v):
  bits = jnp.clip(jnp.floor(v), 1, 8).astype(jnp.int32)
  mask = 255 - (2 ** (8 - bits) - 1)
  return (img.astype(jnp.int32) & mask).astype(img.dtype)


def _sharpness(img, v):
  k = jnp.array([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0
  h, w = img.shape[0], img.shape[1]
  pad = jnp.pad(img, ((1, 1), (1, 1), (0, 0)))
  smooth = sum(k[i, j] * pad[i:i + h, j:j + w]
               for i in range(3) for j in range(3))
  smooth = jnp.clip(jnp.floor(smooth + 0.5), 0, 255)
  inner = jnp.zeros((h, w, 1), bool).at[1:-1, 1:-1].set(True)
  return _blend(jnp.where(inner, smooth, img), img, v)


def _solarize(img, v):
  return jnp.where(img < v, img, 255.0 - img)


def _affine(img, m):
  """PIL `Image.transform(AFFINE, m, NEAREST)`, fill 0: output pixel
  `(x, y)` takes the input at `floor(m @ (x + .5, y + .5, 1))`."""
  h, w = img.shape[0], img.shape[1]
  ys, xs = jnp.meshgrid(jnp.arange(h) + 0.5, jnp.arange(w) + 0.5,
                        indexing="ij")
  sx = jnp.floor(m[0] * xs + m[1] * ys + m[2]).astype(jnp.int32)
  sy = jnp.floor(m[3] * xs + m[4] * ys + m[5]).astype(jnp.int32)
  ok = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
  out = img[jnp.clip(sy, 0, h - 1), jnp.clip(sx, 0, w - 1)]
  return jnp.where(ok[..., None], out, 0.0)


def _rotate_matrix(v, h, w):
  """PIL `Image.rotate(v)` (counter-clockwise degrees, about the centre)."""
  a = -v * math.pi / 180.0
  cos, sin = jnp.cos(a), jnp.sin(a)
  cx, cy = w / 2.0, h / 2.0
  return jnp.stack([cos, sin, cos * -cx + sin * -cy + cx,
                    -sin, cos, -sin * -cx + cos * -cy + cy])


def apply_op(img, op: int, v):
  """Applies operation `op` (index into `OPS`) with magnitude `v` to one
  float image `[H, W, 3]` with values in 0..255 (jittable; `op` traced)."""
  h, w = img.shape[0], img.shape[1]
  zero, one = jnp.zeros(()), jnp.ones(())

  def aff(m):
    return lambda x, v: _affine(x, jnp.stack([jnp.asarray(e, jnp.float32)
                                              for e in m(v)]))

  branches = [
      _autocontrast,
      lambda x, v: _blend(jnp.zeros_like(x), x, v),
      lambda x, v: _blend(jnp.broadcast_to(_gray(x)[..., None], x.shape),
                          x, v),
      _contrast, _equalize, lambda x, v: x, _posterize,
      lambda x, v: _affine(x, _rotate_matrix(v, h, w)),
      _sharpness,
      aff(lambda v: (one, v, zero, zero, one, zero)),
      aff(lambda v: (one, zero, zero, v, one, zero)),
      _solarize,
      aff(lambda v: (one, zero, v * w, zero, one, zero)),
      aff(lambda v: (one, zero, zero, zero, one, v * h)),
  ]
  return jax.lax.switch(op, branches, img, jnp.asarray(v, jnp.float32))


def cutout(rng, img, size):
  """FixMatch `CutoutAbs`: a `size`-pixel square (PIL rectangle, inclusive
  corners) at a uniform random centre, filled with `CUTOUT_COLOR`."""
  h, w = img.shape[0], img.shape[1]
  kx, ky = jax.random.split(rng)
  x0 = jnp.floor(jnp.maximum(0.0, jax.random.uniform(kx) * w - size / 2))
  y0 = jnp.floor(jnp.maximum(0.0, jax.random.uniform(ky) * h - size / 2))
  x1, y1 = jnp.minimum(w, x0 + size), jnp.minimum(h, y0 + size)
  ys, xs = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
  inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1) & (size > 0)
  color = jnp.asarray(CUTOUT_COLOR[:img.shape[-1]], img.dtype)
  return jnp.where(inside[..., None], color, img)


def crop_flip(rng, img, padding: int = 4, flip: bool = True):
  """torchvision `RandomCrop(H, padding)` + `RandomHorizontalFlip()` on one
  image `[H, W, C]`: zero padding, a uniform offset in `[0, 2p]^2`, a mirror
  with probability 1/2."""
  h, w, c = img.shape
  k_off, k_flip = jax.random.split(rng)
  if padding:
    pad = jnp.pad(img, ((padding, padding), (padding, padding), (0, 0)))
    off = jax.random.randint(k_off, (2,), 0, 2 * padding + 1)
    img = jax.lax.dynamic_slice(pad, (off[0], off[1], 0), (h, w, c))
  if flip:
    img = jnp.where(jax.random.bernoulli(k_flip), img[:, ::-1], img)
  return img


def _one(rng, img, num_ops, cutout_max, padding, flip):
  k_crop, k_ops, k_mag, k_cut, k_size = jax.random.split(rng, 5)
  img = crop_flip(k_crop, img, padding, flip)
  ops = jax.random.randint(k_ops, (num_ops,), 0, len(OPS))
  lo = jnp.array([o[1] for o in OPS], jnp.float32)[ops]
  hi = jnp.array([o[2] for o in OPS], jnp.float32)[ops]
  mags = lo + (hi - lo) * jax.random.uniform(k_mag, (num_ops,))
  for i in range(num_ops):
    img = apply_op(img, ops[i], mags[i])
  size = jax.random.uniform(k_size) * cutout_max * img.shape[1]
  return cutout(k_cut, img, size)


def _example_keys(rng, n):
  """`[n]` keys: `rng` itself when it is already one key per example (typed
  `[n]` or raw `[n, 2]`), else `fold_in(rng, b)` for example `b`."""
  rng = rng if hasattr(rng, "dtype") else jnp.asarray(rng)
  typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
  if rng.ndim == (1 if typed else 2):          # one key per example
    if rng.shape[0] != n:
      raise ValueError(f"strong_augment: got {rng.shape[0]} keys for {n} "
                       "images.")
    return rng
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n))


def strong_augment(rng: jax.Array, images: jax.Array, *, num_ops: int = 2,
                   cutout_max: float = 0.5, padding: int = 4,
                   flip: bool = True) -> jax.Array:
  """Crop + flip + RandAugment(`num_ops`) + Cutout, per example (see module).

  Args:
    rng: a `jax.random` key (example `b` uses `fold_in(rng, b)`), or one key
      per example (`[B]` typed keys or `[B, 2]` raw keys) -- e.g. keys of the
      examples' dataset indices, so that an example's augmentation does not
      depend on the batch it lands in.
    images: NHWC `[B, H, W, 3]`, uint8 or float with values in 0..255.
    num_ops: RandAugment's `n` (2).
    cutout_max: Cutout side at most `cutout_max * W` (0.5).
    padding / flip: the random crop and flip before RandAugment.

  Returns:
    the augmented batch, same shape and dtype.
  """
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"strong_augment: `images` must be NHWC [B, H, W, 3]; "
                     f"got shape {tuple(images.shape)}.")
  keys = _example_keys(rng, images.shape[0])
  out = jax.vmap(lambda k, im: _one(k, im, num_ops, cutout_max, padding,
                                    flip))(keys, images.astype(jnp.float32))
  if jnp.issubdtype(images.dtype, jnp.integer):
    return jnp.clip(jnp.round(out), 0, 255).astype(images.dtype)
  return out.astype(images.dtype)
