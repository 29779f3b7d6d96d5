r"""Per-model input views: the teacher and the student see different views of
one example.

Generalized distillation (Lopez-Paz et al., ICLR 2016) trains the teacher on
privileged features :math:`x^\star` and the student on regular features
:math:`x` of the *same* examples -- on MNIST, the 28x28 image and the same
image downscaled to 7x7. Cross-modal distillation is the same pattern with
two modalities. A *view* is a pure, jittable function

    view(batch, rng) -> batch

that rewrites the batch's `'image'` (it may read other keys, e.g. a second
modality) and leaves the rest alone; `rng` is a PRNG key (unused by
deterministic views, may be None for them). Views are built by name from a
registry (`make_view('downscale', size=7)`, or a config entry
`{'name': 'downscale', 'size': 7}`), and `model_views(student=...,
teacher=...)` combines two of them into one batch transformation that puts
the student's view in `batch['image']` and the teacher's in
`batch['teacher_image']` -- the key through which the engine already feeds a
separate teacher input (`kd_jax.data.augment.augment_batch`'s
`separate_teacher_view`, the trainer's `teacher_image` -> teacher logits).

Views act on the float, normalized batch inside the compiled step. The
resizing views are linear with weights that sum to one, so they commute with
the per-channel normalization `(x / 255 - mean) / std`: resizing normalized
pixels equals normalizing resized pixels.

>>> import jax.numpy as jnp
>>> v = model_views(student="downscale", teacher=None)
>>> out = v({"image": jnp.ones((2, 28, 28, 1)), "label": jnp.zeros(2)}, None)
>>> out["image"].shape, out["teacher_image"].shape
((2, 7, 7, 1), (2, 28, 28, 1))
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp

Batch = Dict[str, Any]
ViewFn = Callable[[Batch, Optional[jax.Array]], Batch]
ViewSpec = Union[None, str, Mapping[str, Any], ViewFn]

__all__ = ["VIEWS", "register_view", "available_views", "make_view",
           "model_views", "view_output_shape", "resize", "downscale",
           "gaussian_noise", "identity", "select"]


def _image(batch, key, name):
  if not isinstance(batch, Mapping) or key not in batch:
    keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
    raise KeyError(f"view {name!r}: the batch has no {key!r} entry; it has "
                   f"{keys}.")
  x = batch[key]
  if getattr(x, "ndim", 0) != 4:
    raise ValueError(f"view {name!r}: batch[{key!r}] must be NHWC [B, H, W, "
                     f"C]; got shape {tuple(getattr(x, 'shape', ()))}.")
  return x


def identity() -> ViewFn:
  """The unchanged batch (the default view of a model)."""
  def view(batch, rng):
    del rng
    return dict(batch)
  return view


def resize(size, *, method: str = "linear", antialias: bool = True,
           key: str = "image") -> ViewFn:
  """Resizes `batch[key]` to `size` (int or `(H, W)`), per channel.

  `method='linear'` with `antialias=True` is PIL's `BILINEAR` resampling
  (a triangle filter widened by the scale factor when downscaling; equal to
  `PIL.Image.resize(..., BILINEAR)` of a float image to float32 rounding, a
  property the tests check) -- what `scipy.misc.imresize(x, 25, mode='F')`
  (Lopez-Paz et al.'s 7x7 MNIST) and torchvision's `Resize((32, 32))`
  (DAFL's 32x32 MNIST; torchvision then rounds to uint8, up to one gray
  level of difference) compute. Output dtype: the input's floating dtype
  (integer images become float32).
  """
  hw = (size, size) if isinstance(size, int) else tuple(size)
  if len(hw) != 2 or any(not isinstance(s, int) or s < 1 for s in hw):
    raise ValueError(f"resize: `size` must be a positive int or (H, W); got "
                     f"{size!r}.")
  if method not in ("linear", "nearest", "cubic", "lanczos3", "lanczos5"):
    raise ValueError(f"resize: unknown `method` {method!r}.")

  def view(batch, rng):
    del rng
    x = _image(batch, key, "resize")
    dt = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    out = dict(batch)
    out[key] = jax.image.resize(
        x.astype(dt), (x.shape[0],) + hw + (x.shape[3],), method=method,
        antialias=antialias)
    return out
  return view


def downscale(size=7, *, method: str = "linear", antialias: bool = True,
              key: str = "image") -> ViewFn:
  """`resize` to a smaller `size` (default 7: Lopez-Paz et al.'s 7x7 MNIST)."""
  return resize(size, method=method, antialias=antialias, key=key)


def gaussian_noise(std: float = 1.0, *, key: str = "image") -> ViewFn:
  r"""Adds :math:`\mathcal{N}(0, \mathrm{std}^2)` noise to every pixel.

  Lopez-Paz et al.'s CIFAR-10 regular features (`x + randn`, on [0, 1]
  pixels). Example `i` uses the key `fold_in(rng, batch['index'][i])` when
  the batch carries dataset indices (its noise is then a pure function of
  `(rng, example)`), else `fold_in(rng, i)`.
  """
  if not isinstance(std, (int, float)) or std < 0:
    raise ValueError(f"gaussian_noise: `std` must be a number >= 0; got "
                     f"{std!r}.")

  def view(batch, rng):
    x = _image(batch, key, "gaussian_noise")
    if rng is None:
      raise ValueError("view 'gaussian_noise' needs a PRNG key `rng`.")
    idx = batch.get("index")
    idx = jnp.arange(x.shape[0]) if idx is None else jnp.reshape(idx, (-1,))
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(idx)
    dt = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], dt))(keys)
    out = dict(batch)
    out[key] = x.astype(dt) + std * noise
    return out
  return view


def select(key: str) -> ViewFn:
  """The model sees `batch[key]` as its `'image'` (another modality of the
  same example, e.g. `teacher={'name': 'select', 'key': 'depth'}` for
  cross-modal distillation)."""
  if not isinstance(key, str) or not key:
    raise ValueError(f"select: `key` must be a non-empty string; got {key!r}.")

  def view(batch, rng):
    del rng
    if key not in batch:
      raise KeyError(f"view 'select': the batch has no {key!r} entry; it has "
                     f"{sorted(batch)}.")
    out = dict(batch)
    out["image"] = batch[key]
    return out
  return view


VIEWS: Dict[str, Callable[..., ViewFn]] = {
    "identity": identity,
    "select": select,
    "resize": resize,
    "downscale": downscale,
    "gaussian_noise": gaussian_noise,
}
"""Name -> view factory `factory(**kwargs) -> view(batch, rng) -> batch`."""


def register_view(name: str, factory: Callable[..., ViewFn]):
  """Adds a view factory under `name` (returns `factory`; usable as a
  decorator via `functools.partial(register_view, name)`)."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"register_view: `name` must be a non-empty string; got "
                     f"{name!r}.")
  if not callable(factory):
    raise TypeError(f"register_view: the factory of {name!r} must be callable.")
  if name in VIEWS and VIEWS[name] is not factory:
    raise ValueError(f"view name {name!r} is already registered.")
  VIEWS[name] = factory
  return factory


def available_views() -> Tuple[str, ...]:
  return tuple(sorted(VIEWS))


def make_view(spec: ViewSpec = None, **kwargs) -> ViewFn:
  """A view from a name, a `{'name': ..., **kwargs}` mapping, a callable
  `view(batch, rng)` (returned as is) or None (identity).

  >>> make_view({'name': 'downscale', 'size': 14}) is not None
  True
  """
  if spec is None:
    if kwargs:
      raise ValueError(f"make_view(None) takes no arguments; got {kwargs}.")
    return identity()
  if callable(spec) and not isinstance(spec, str):
    if kwargs:
      raise ValueError("make_view: arguments are for named views only.")
    return spec
  if isinstance(spec, Mapping):
    spec = dict(spec)
    if "name" not in spec:
      raise ValueError(f"a view entry needs a 'name' (one of "
                       f"{', '.join(available_views())}); got {spec}.")
    name = spec.pop("name")
    kwargs = {**spec, **kwargs}
  elif isinstance(spec, str):
    name = spec
  else:
    raise TypeError(f"a view is a name, a {{'name': ...}} mapping or a "
                    f"callable; got {type(spec).__name__}.")
  if name not in VIEWS:
    raise ValueError(f"unknown view {name!r}; available views: "
                     f"{', '.join(available_views())}.")
  factory = VIEWS[name]
  try:
    inspect.signature(factory).bind(**kwargs)
  except TypeError as e:
    raise ValueError(f"view {name!r}: bad arguments {kwargs} ({e}).") from None
  return factory(**kwargs)


def model_views(student: ViewSpec = None, teacher: ViewSpec = None, *,
                teacher_key: str = "teacher_image") -> ViewFn:
  """One batch transformation giving each model its view of the examples.

  Both views start from the same batch (`batch['image']`); the teacher's
  `'image'` lands in `batch[teacher_key]`, the student's in `batch['image']`.
  Their keys are `fold_in(rng, 1)` (teacher) and `fold_in(rng, 0)`
  (student). Evaluate the student on `make_view(student)` of the test batch
  (it never sees the teacher's view).
  """
  s_view, t_view = make_view(student), make_view(teacher)

  def view(batch, rng):
    _image(batch, "image", "model_views")
    ks = kt = None
    if rng is not None:
      ks, kt = jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1)
    out = s_view(dict(batch), ks)
    out[teacher_key] = t_view(dict(batch), kt)["image"]
    return out
  return view


def view_output_shape(view: ViewSpec, shape, dtype=jnp.float32) -> Tuple:
  """Per-example `(H, W, C)` a view produces from `shape` (to build the
  model that consumes it, e.g. `model.init` on the student's view)."""
  fn = make_view(view)
  out = jax.eval_shape(
      lambda x: fn({"image": x}, jax.random.key(0))["image"],
      jax.ShapeDtypeStruct((1,) + tuple(shape), dtype))
  return tuple(out.shape[1:])
