"""On-device (jittable) augmentation and normalization.

The in-memory pipelines yield raw uint8 batches; the train step augments and
normalizes them inside its compiled program (`augment_batch`, or
`make_preprocess_fn` for any leading shape), so random crops, flips and
normalization are fused XLA ops instead of host NumPy work, and the
host->device transfer stays uint8 (4x smaller than float32).

One augmentation path, with per-example keys: example `i` of a batch uses
`fold_in(rng, index_i)` (its dataset index), so its view is a pure function
of (rng, example) -- independent of the batch it lands in, the number of
devices and where a run was resumed. The trainer uses
`rng = fold_in(fold_in(state.rng, AUG_TAG), epoch)`.
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


AUG_TAG = 0x6175  # fold-in tag of a run's augmentation stream


def example_keys(rng: jax.Array, index: jax.Array) -> jax.Array:
  """Per-example keys `fold_in(rng, index[i])` (`index`: int `[B]`)."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(index)


def augment_batch(rng: Optional[jax.Array], batch: Dict[str, jax.Array], *,
                  mean: Sequence[float], std: Sequence[float],
                  crop_padding: Optional[int] = None, flip: bool = False,
                  separate_teacher_view: bool = False,
                  strong_augment: Optional[Callable] = None
                  ) -> Dict[str, jax.Array]:
  r"""Per-example augmentation + normalization of a `[B, H, W, C]` batch.

  Example `i` is cropped/flipped with the key
  $k_i = \mathrm{fold\_in}(\text{rng}, \text{index}_i)$, where `index` is
  `batch['index']` (the example's position in the dataset) -- so an
  example's view depends only on `rng` and the example, not on the batch it
  lands in, the number of devices or where a run was resumed. A run derives
  `rng = fold_in(fold_in(run_rng, AUG_TAG), epoch)`: a new view every epoch.

  * `separate_teacher_view`: a second view, keys `fold_in(k_i, 1)`, as
    `batch['teacher_image']`; a `teacher_image` already in the batch (made
    on the host, e.g. by the ImageNet pipeline) is only normalized;
  * `strong_augment(key, images[1, H, W, C])`: a strong view of the same
    (un-augmented) images, keys `fold_in(k_i, 2)`, as `batch['image_strong']`
    (weak/strong pairs, e.g. MLKD);
  * `batch['image_pair']` (same-class partners, CS-KD) is augmented like
    `image` with keys `fold_in(k_i, 3)` of the *anchor* `i`: a partner is a
    slot of its own (the authors' loader transforms every slot
    independently), so a partner that is also an anchor of the batch does
    not share the anchor's crop.

  Without augmentation (`crop_padding` falsy, `flip=False`, no strong view)
  `rng` is unused and may be `None`, and `index` is not needed.
  """
  if "image" not in batch:
    raise ValueError(f"`batch` must have an 'image' entry; got keys "
                     f"{sorted(batch)}.")
  _check_images(batch["image"], "batch['image']")
  augments = bool(crop_padding) or flip
  keyed = augments or strong_augment is not None
  if keyed and (rng is None or "index" not in batch):
    raise ValueError("augmentation needs `rng` and `batch['index']` (the "
                     "examples' dataset indices: per-example keys).")

  def view(keys, images):
    if augments and keys is not None:
      images = jax.vmap(lambda k, x: random_crop_flip(
          k, x[None], padding=crop_padding, flip=flip)[0])(keys, images)
    return normalize(images, mean, std)

  out = dict(batch)
  keys = example_keys(rng, batch["index"]) if keyed else None
  images = batch["image"]
  out["image"] = view(keys, images)
  if "teacher_image" in batch:  # the host pipeline made the teacher's view
    out["teacher_image"] = view(None, batch["teacher_image"])
  elif separate_teacher_view:
    tkeys = (None if keys is None
             else jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys))
    out["teacher_image"] = view(tkeys, images)
  if "image_pair" in batch:
    _check_images(batch["image_pair"], "batch['image_pair']")
    pkeys = (None if keys is None
             else jax.vmap(lambda k: jax.random.fold_in(k, 3))(keys))
    out["image_pair"] = view(pkeys, batch["image_pair"])
  if strong_augment is not None:
    skeys = jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys)
    strong = jax.vmap(lambda k, x: strong_augment(k, x[None])[0])(skeys, images)
    out["image_strong"] = normalize(strong, mean, std)
  return out


def make_preprocess_fn(*, mean: Sequence[float], std: Sequence[float],
                       crop_padding: Optional[int] = None, flip: bool = False,
                       separate_teacher_view: bool = False
                       ) -> Callable[[jax.Array, Dict[str, jax.Array]],
                                     Dict[str, jax.Array]]:
  """Builds `preprocess(rng, batch) -> batch` for use inside a jitted step.

  `augment_batch` (per-example keys) over any leading shape
  `[..., B, H, W, C]` (e.g. `[n_steps, B, ...]` chunks for a scanned
  multi-step). The examples' keys come from `batch['index']` when present
  (the pipelines' `with_index=True`), else from their position in the
  flattened batch. Other keys (`label`, `index`, `mask`) pass through. By
  default the teacher sees the student's view ("consistent teaching");
  `separate_teacher_view=True` adds an independent `batch['teacher_image']`.
  Without augmentation `rng` is unused and may be `None`.

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
    lead = images.shape[:-3]
    flat = {k: v.reshape((-1,) + v.shape[len(lead):]) for k, v in batch.items()
            if k in ("image", "teacher_image")}
    n = flat["image"].shape[0]
    if "index" in batch:
      flat["index"] = jnp.reshape(batch["index"], (-1,))
    else:
      flat["index"] = jnp.arange(n, dtype=jnp.int32)
    out = augment_batch(rng if augments else None, flat, mean=mean, std=std,
                        crop_padding=crop_padding, flip=flip,
                        separate_teacher_view=separate_teacher_view)
    res = dict(batch)
    for k in ("image", "teacher_image"):
      if k in out:
        res[k] = out[k].reshape(lead + out[k].shape[1:])
    return res

  return preprocess
