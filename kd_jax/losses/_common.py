"""Shared input validation and numerics for kd_jax losses.

Every public loss validates its inputs at trace time (shapes and dtypes are
static under ``jit``), casts to float32, and stops gradients into the teacher.
Error messages name the offending argument and the expected shape/dtype.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = Any

FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def _dtype(x):
  return jnp.result_type(x)


def check_float(x: Array, name: str) -> None:
  """Raises TypeError unless `x` has a floating dtype."""
  dt = _dtype(x)
  if not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(
        f"`{name}` must have a floating dtype (float16, bfloat16, float32 or "
        f"float64); got {dt}.")


def check_rank(x: Array, name: str, *, min_ndim: int = 1,
               ndim: Optional[int] = None, what: str = "") -> None:
  shape = jnp.shape(x)
  if ndim is not None and len(shape) != ndim:
    raise ValueError(
        f"`{name}` must have rank {ndim}{(' ' + what) if what else ''}; "
        f"got shape {tuple(shape)}.")
  if len(shape) < min_ndim:
    raise ValueError(
        f"`{name}` must have at least {min_ndim} dimension(s)"
        f"{(' ' + what) if what else ''}; got shape {tuple(shape)}.")


def check_same_shape(a: Array, b: Array, name_a: str, name_b: str) -> None:
  if jnp.shape(a) != jnp.shape(b):
    raise ValueError(
        f"`{name_a}` and `{name_b}` must have the same shape; got "
        f"{name_a}.shape={tuple(jnp.shape(a))} and "
        f"{name_b}.shape={tuple(jnp.shape(b))}.")


def check_positive(value: Any, name: str) -> None:
  """Checks `value > 0` when it is a concrete Python/NumPy number."""
  if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
    if not value > 0:
      raise ValueError(f"`{name}` must be > 0; got {value}.")


def check_nonnegative(value: Any, name: str) -> None:
  if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
    if not value >= 0:
      raise ValueError(f"`{name}` must be >= 0; got {value}.")


def check_logits_pair(student_logits: Array, teacher_logits: Array,
                      *, student_name: str = "student_logits",
                      teacher_name: str = "teacher_logits"):
  """Validates a (student, teacher) logits pair; returns float32 copies.

  The teacher copy is wrapped in `jax.lax.stop_gradient`.
  """
  check_float(student_logits, student_name)
  check_float(teacher_logits, teacher_name)
  check_rank(student_logits, student_name, min_ndim=1,
             what="([..., num_classes])")
  check_same_shape(student_logits, teacher_logits, student_name, teacher_name)
  s = jnp.asarray(student_logits, jnp.float32)
  t = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))
  return s, t


def check_labels(labels: Array, leading_shape: Sequence[int],
                 num_classes: Optional[int] = None, *,
                 name: str = "labels") -> Array:
  dt = _dtype(labels)
  if not jnp.issubdtype(dt, jnp.integer):
    raise TypeError(
        f"`{name}` must hold integer class indices; got dtype {dt}.")
  if tuple(jnp.shape(labels)) != tuple(leading_shape):
    raise ValueError(
        f"`{name}` must have shape {tuple(leading_shape)} (the leading dims of "
        f"the logits); got {tuple(jnp.shape(labels))}.")
  return jnp.asarray(labels, jnp.int32)


def check_where(where: Optional[Array], leading_shape: Sequence[int],
                *, name: str = "where") -> Optional[Array]:
  if where is None:
    return None
  dt = _dtype(where)
  if dt != jnp.bool_:
    raise TypeError(f"`{name}` must be a boolean mask; got dtype {dt}.")
  if tuple(jnp.shape(where)) != tuple(leading_shape):
    raise ValueError(
        f"`{name}` must have shape {tuple(leading_shape)} (the leading dims of "
        f"the logits); got {tuple(jnp.shape(where))}.")
  return jnp.asarray(where)


def mask_inputs(where: Optional[Array], *arrays: Array):
  """Replaces masked rows by zeros *before* computing (no NaN in grads)."""
  if where is None:
    return arrays
  out = []
  for a in arrays:
    w = where.reshape(where.shape + (1,) * (a.ndim - where.ndim))
    out.append(jnp.where(w, a, jnp.zeros((), a.dtype)))
  return tuple(out)


def apply_where(loss: Array, where: Optional[Array]) -> Array:
  if where is None:
    return loss
  return jnp.where(where, loss, 0.0)


def safe_norm(x: Array, axis=-1, keepdims: bool = False) -> Array:
  """L2 norm with a zero (not NaN) gradient at the zero vector."""
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  nonzero = sq > 0
  safe_sq = jnp.where(nonzero, sq, 1.0)
  n = jnp.where(nonzero, jnp.sqrt(safe_sq), 0.0)
  if not keepdims:
    n = jnp.squeeze(n, axis=axis)
  return n


def l2_normalize(x: Array, axis=-1, eps: float = 1e-12) -> Array:
  """torch `F.normalize`: `x / max(||x||_2, eps)`; finite gradient at 0."""
  return x / jnp.maximum(safe_norm(x, axis=axis, keepdims=True), eps)


def all_gather_batch(x: Array, axis_name: Optional[str]) -> Array:
  """Concatenates the per-device batch shards along axis 0 (tiled).

  Inside `pmap`/`shard_map` over `axis_name`, returns the global batch in
  device order, so a batch-level loss computed on it equals the 1-device value.
  Gradients flow back to the local shard: all_gather's transpose is a
  reduce-scatter (a *sum* over devices), and every device holds the same
  global loss, so the gradient w.r.t. a device's shard is `num_devices` times
  the matching slice of the 1-device gradient. A data-parallel step that
  `pmean`s its parameter gradients (as `kd_jax.train` does) therefore gets
  exactly the 1-device gradient of the global-batch loss.
  """
  if axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def adaptive_avg_pool_to(x: Array, out_hw: int) -> Array:
  """`F.adaptive_avg_pool2d(x, (out_hw, out_hw))` for NHWC `x`.

  Matches PyTorch's bin rule (start=floor(i*H/out), end=ceil((i+1)*H/out)),
  which for integer ratios is plain non-overlapping block averaging.
  """
  b, h, w, c = x.shape
  if h == out_hw and w == out_hw:
    return x

  def pool_axis(v, axis, size):
    if size % out_hw == 0:
      k = size // out_hw
      shape = list(v.shape)
      shape[axis:axis + 1] = [out_hw, k]
      return jnp.mean(v.reshape(shape), axis=axis + 1)
    slices = []
    for i in range(out_hw):
      start = (i * size) // out_hw
      end = -((-(i + 1) * size) // out_hw)
      slices.append(jnp.mean(jax.lax.slice_in_dim(v, start, end, axis=axis),
                             axis=axis, keepdims=True))
    return jnp.concatenate(slices, axis=axis)

  x = pool_axis(x, 1, h)
  x = pool_axis(x, 2, w)
  return x


def pool_to_match(s: Array, t: Array):
  """The references' spatial-mismatch rule: pool the larger map to H_small²."""
  hs, ht = s.shape[1], t.shape[1]
  if hs > ht:
    s = adaptive_avg_pool_to(s, ht)
  elif ht > hs:
    t = adaptive_avg_pool_to(t, hs)
  return s, t
