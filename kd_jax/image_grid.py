"""Synthesized images as one PNG grid (DAFL / DeepInversion outputs).

Like `torchvision.utils.save_image(x, normalize=True, scale_each=True,
nrow=n)`, which the authors use: each image is min-max scaled to [0, 1] on
its own, images are tiled row-major with a 2-pixel border.

>>> import numpy as np
>>> image_grid(np.zeros((3, 4, 4, 1)), nrow=2).shape
(14, 14, 3)
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["image_grid", "save_image_grid"]


def image_grid(images, *, nrow: int = 8, padding: int = 2,
               scale_each: bool = True) -> np.ndarray:
  """NHWC float images -> one uint8 `[H', W', 3]` grid (gray images repeated
  to RGB), `nrow` images per row."""
  x = np.asarray(images, np.float64)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"image_grid expects NHWC images with 1 or 3 channels; "
                     f"got shape {x.shape}.")
  if not isinstance(nrow, int) or nrow < 1:
    raise ValueError(f"`nrow` must be a positive int; got {nrow!r}.")
  if scale_each:
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    hi = x.max(axis=(1, 2, 3), keepdims=True)
  else:
    lo, hi = x.min(), x.max()
  x = (x - lo) / np.maximum(hi - lo, 1e-5)
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  n, h, w, _ = x.shape
  cols = min(nrow, n)
  rows = -(-n // cols)
  grid = np.zeros((rows * (h + padding) + padding,
                   cols * (w + padding) + padding, 3))
  for i in range(n):
    r, c = divmod(i, cols)
    y0, x0 = padding + r * (h + padding), padding + c * (w + padding)
    grid[y0:y0 + h, x0:x0 + w] = x[i]
  return np.clip(np.round(grid * 255), 0, 255).astype(np.uint8)


def save_image_grid(path: str, images, **kwargs) -> str:
  """Writes `image_grid(images, **kwargs)` as a PNG; returns `path`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  d = os.path.dirname(path)
  if d:
    os.makedirs(d, exist_ok=True)
  Image.fromarray(image_grid(images, **kwargs)).save(path)
  return path
