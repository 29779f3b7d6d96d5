"""Shared helpers of the loss tests (tolerances, jit wrappers, random inputs)."""

import functools

import jax
import numpy as np

RTOL = 1e-5
EPS32 = float(np.finfo(np.float32).eps)


def assert_close_to_reference(actual, ref_fn, rtol=RTOL, scale=1.0):
  """|actual - ref64| <= rtol |ref64| + atol, the float32 rounding floor.

  atol = max(3 max|ref32 - ref64|, eps32 * scale), where `scale` is the
  factor the loss multiplies its O(1) log-probability terms by (T^2 (alpha +
  beta) for DKD): ref32 alone can be accidentally exact on tiny inputs.
  Entries where the float32 transcription overflows or underflows to a
  non-finite value (e.g. the reference's `log(softmax)` of a far row) do not
  widen the floor: there the float64 value is the reference.
  """
  ref64 = np.asarray(ref_fn(np.float64), np.float64)
  ref32 = np.asarray(ref_fn(np.float32), np.float64)
  err32 = np.abs(ref32 - ref64)
  err32 = err32[np.isfinite(err32)]
  atol = max(3 * np.max(err32, initial=0.0), EPS32 * scale)
  actual = np.asarray(actual, np.float64)
  assert actual.shape == ref64.shape, (actual.shape, ref64.shape)
  np.testing.assert_allclose(actual, ref64, rtol=rtol, atol=atol)



def jcall(fn, *args, **kwargs):
  """Calls `fn` under jit (one compile instead of op-by-op dispatch)."""
  return jax.jit(functools.partial(fn, **kwargs))(*args)


def jgrad(f, *args, **kwargs):
  return jax.jit(jax.grad(f, *args, **kwargs))


def random_logits(seed, shape, scale=3.0):
  rng = np.random.default_rng(seed)
  s = (scale * rng.standard_normal(shape)).astype(np.float32)
  t = (scale * rng.standard_normal(shape)).astype(np.float32)
  return s, t
