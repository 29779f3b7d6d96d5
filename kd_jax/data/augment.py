"""On-device (jittable) augmentation and normalization.

The in-memory pipelines yield raw uint8 batches; the train step calls the
function from `make_preprocess_fn` inside its compiled program, so random crops,
flips and normalization are fused XLA ops instead of host NumPy work, and the
host->device transfer stays uint8 (4x smaller than float32).

Randomness comes from an explicit `jax.random` key (e.g. folded from the
`TrainState.rng` with the step), so an augmented batch is a pure function of
(key, batch): exact resume needs nothing beyond the checkpointed train state.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp


def _check_images(images, arg="images"):
  if images.ndim != 4:
    raise ValueError(f"`{arg}` must be a [B, H, W, C] batch; got shape "
                     f"{tuple(images.shape)}.")


def random_crop_flip(rng: jax.Array, images: jax.Array, *,
                     padding: Optional[int] = 4, flip: bool = True) -> jax.Array:
  r"""Per-example random crop with zero padding and horizontal flip.

  torchvision's `RandomCrop(H, padding=p)` + `RandomHorizontalFlip()`: each
  image is zero-padded by `p` pixels on every side and an `H x W` window is
  taken at an offset drawn uniformly from $\{0, \dots, 2p\}^2$; then, with
  probability 1/2, it is mirrored along the width axis. Dtype is preserved
  (apply to uint8 before normalization, as torchvision does: padding is black).

  Args:
    rng: a `jax.random` key.
    images: `[B, H, W, C]`, any dtype.
    padding: zero padding `p` on each side; `None` or 0 for no crop.
    flip: whether to apply the random horizontal flip.

  Returns:
    `[B, H, W, C]` array of the same dtype.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.uint8).reshape(2, 4, 4, 1)
    >>> random_crop_flip(jax.random.key(0), x, padding=1).shape
    (2, 4, 4, 1)

  References:
    He et al., "Deep Residual Learning for Image Recognition", CVPR 2016
    (the CIFAR recipe: 4-pixel padding, 32x32 crop, flip).
  """
  _check_images(images)
  b, h, w, _ = images.shape
  if padding is not None and (not isinstance(padding, int) or padding < 0):
    raise ValueError(f"`padding` must be a non-negative int; got {padding!r}.")
  k_crop, k_flip = jax.random.split(rng)
  pad = padding or 0
  rows = jnp.broadcast_to(jnp.arange(h), (b, h))
  cols = jnp.broadcast_to(jnp.arange(w), (b, w))
  if pad:
    offs = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
    rows = rows + offs[:, :1]
    cols = cols + offs[:, 1:]
  if flip:
    do_flip = jax.random.bernoulli(k_flip, 0.5, (b, 1))
    cols = jnp.where(do_flip, cols[:, ::-1], cols)
  if not pad and not flip:
    return images
  x = images
  if pad:  # zero padding, as torchvision's RandomCrop(padding=p, fill=0).
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  # Two gathers (rows, then columns) instead of a per-example dynamic slice:
  # cheap on every backend, and the flip is folded into the column index.
  x = jnp.take_along_axis(x, rows[:, :, None, None], axis=1)
  return jnp.take_along_axis(x, cols[:, None, :, None], axis=2)


def normalize(images: jax.Array, mean: Sequence[float],
              std: Sequence[float]) -> jax.Array:
  r"""uint8 (or `[0, 255]`-valued) images -> float32 $(x/255 - \mu_c)/\sigma_c$.

  Example:
    >>> import jax.numpy as jnp
    >>> normalize(jnp.full((1, 1, 1, 1), 255, jnp.uint8), (0.5,), (0.5,))
    Array([[[[1.]]]], dtype=float32)
  """
  _check_images(images)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  if mean.shape != (images.shape[-1],) or std.shape != (images.shape[-1],):
    raise ValueError(
        f"`mean`/`std` must have one value per channel ({images.shape[-1]}); "
        f"got {mean.shape} and {std.shape}.")
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def make_preprocess_fn(*, mean: Sequence[float], std: Sequence[float],
                       crop_padding: Optional[int] = None, flip: bool = False,
                       separate_teacher_view: bool = False
                       ) -> Callable[[jax.Array, Dict[str, jax.Array]],
                                     Dict[str, jax.Array]]:
  """Builds `preprocess(rng, batch) -> batch` for use inside a jitted step.

  The returned function replaces the uint8 `batch['image']` by the augmented,
  normalized float32 image; other keys (`label`, `index`, `mask`) pass through
  unchanged. By default the teacher sees the same augmented view as the
  student ("consistent teaching"); with `separate_teacher_view=True` a second,
  independently augmented view is added as `batch['teacher_image']`; a
  `teacher_image` already in the batch (a second view made on the host, e.g.
  by the ImageNet pipeline) is processed the same way as `image`. Without
  augmentation (`crop_padding` falsy and `flip=False`, e.g. evaluation) `rng`
  is unused and may be `None`.

  Works on any leading shape `[..., B, H, W, C]` (e.g. `[n_steps, B, ...]`
  chunks for a scanned multi-step: each step gets its own key).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> f = make_preprocess_fn(mean=(0.5,), std=(0.5,), crop_padding=2,
    ...                        flip=True, separate_teacher_view=True)
    >>> batch = {'image': jnp.zeros((4, 8, 8, 1), jnp.uint8),
    ...          'label': jnp.zeros((4,), jnp.int32)}
    >>> out = jax.jit(f)(jax.random.key(0), batch)
    >>> out['image'].dtype, out['teacher_image'].shape
    (dtype('float32'), (4, 8, 8, 1))
  """
  mean, std = tuple(mean), tuple(std)
  augments = bool(crop_padding) or flip

  def view(rng, images):
    flat = images.reshape((-1,) + images.shape[-3:])  # all leading dims
    if augments:  # independent draws for every example of every step
      flat = random_crop_flip(rng, flat, padding=crop_padding, flip=flip)
    return normalize(flat, mean, std).reshape(images.shape)

  def preprocess(rng, batch):
    if "image" not in batch:
      raise ValueError(f"`batch` must have an 'image' entry; got keys "
                       f"{sorted(batch)}.")
    images = batch["image"]
    if images.ndim < 4:
      raise ValueError("`batch['image']` must be [..., B, H, W, C]; got shape "
                       f"{tuple(images.shape)}.")
    if augments and rng is None:
      raise ValueError("`rng` is required when augmenting.")
    out = dict(batch)
    host_view = batch.get("teacher_image")
    if separate_teacher_view or host_view is not None:
      k_s, k_t = jax.random.split(rng) if augments else (None, None)
      out["image"] = view(k_s, images)
      out["teacher_image"] = view(k_t, images if host_view is None else host_view)
    else:
      out["image"] = view(rng, images)
    return out

  return preprocess
