"""Name -> model constructor registry: `kd_jax.models.create(name, ...)`."""

from __future__ import annotations

from typing import Callable, Dict

import jax.numpy as jnp

_REGISTRY: Dict[str, Callable] = {}


def register(name: str, fn: Callable = None):
  """Registers `fn(num_classes, dtype)` under `name` (usable as decorator)."""
  def deco(f):
    if name in _REGISTRY:
      raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = f
    return f
  return deco(fn) if fn is not None else deco


def available_models():
  return sorted(_REGISTRY)


def create(name: str, *, num_classes: int, dtype=jnp.float32):
  """Builds the Flax module registered as `name`.

  The module's `apply(variables, x, train=...)` returns `(logits, features)`.
  """
  if name not in _REGISTRY:
    raise ValueError(
        f"unknown model name {name!r}; valid names: "
        f"{', '.join(available_models())}")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"`num_classes` must be a positive int; got {num_classes!r}.")
  return _REGISTRY[name](num_classes=num_classes, dtype=dtype)
