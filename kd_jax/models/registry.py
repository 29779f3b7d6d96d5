"""Name -> model constructor registry: `kd_jax.models.create(name, ...)`.

Each registered name carries, besides its constructor `fn(num_classes, dtype)`,
two optional pieces of metadata:

* `input_shape`: the per-example NHWC input shape `(H, W, C)` the model is
  built for (e.g. `(32, 32, 3)` for CIFAR). Used to build example inputs for
  `init` / `jax.eval_shape` (see `example_input`).
* `torch_key_map`: a function `shapes -> list[KeyMapEntry]` describing how a
  PyTorch `state_dict` of the reference definition maps onto this model's Flax
  variables (see `kd_jax.models.convert`). Names without one cannot be
  converted from PyTorch.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What the registry knows about one model name."""
  name: str
  fn: Callable
  input_shape: Optional[Tuple[int, ...]] = None
  torch_key_map: Optional[Callable] = None


_REGISTRY: Dict[str, ModelSpec] = {}


def register(name: str, fn: Callable = None, *, input_shape=None,
             torch_key_map: Optional[Callable] = None):
  """Registers `fn(num_classes, dtype)` under `name` (usable as decorator).

  Args:
    name: the public model name.
    fn: constructor `fn(num_classes=..., dtype=...) -> flax.linen.Module`.
    input_shape: optional per-example NHWC input shape `(H, W, C)`.
    torch_key_map: optional `shapes -> list[KeyMapEntry]` for
      `kd_jax.models.from_torch_state_dict` (see `kd_jax.models.convert`).
  """
  def deco(f):
    if name in _REGISTRY:
      raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = ModelSpec(
        name=name, fn=f,
        input_shape=None if input_shape is None else tuple(input_shape),
        torch_key_map=torch_key_map)
    return f
  return deco(fn) if fn is not None else deco


def available_models():
  return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
  """Returns the `ModelSpec` of `name`; clear error listing valid names."""
  if name not in _REGISTRY:
    raise ValueError(
        f"unknown model name {name!r}; valid names: "
        f"{', '.join(available_models())}")
  return _REGISTRY[name]


def input_shape(name: str) -> Tuple[int, ...]:
  """The per-example NHWC input shape `(H, W, C)` model `name` is built for."""
  spec = get_spec(name)
  if spec.input_shape is None:
    raise ValueError(f"model {name!r} was registered without an input_shape")
  return spec.input_shape


def example_input(name: str, batch_size: int = 1, dtype=jnp.float32):
  """Zeros of shape `[batch_size, *input_shape(name)]` (for init/eval_shape)."""
  return jnp.zeros((batch_size,) + input_shape(name), dtype)


def create(name: str, *, num_classes: int, dtype=jnp.float32):
  """Builds the Flax module registered as `name`.

  The module's `apply(variables, x, train=...)` returns `(logits, features)`.
  """
  spec = get_spec(name)
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"`num_classes` must be a positive int; got {num_classes!r}.")
  return spec.fn(num_classes=num_classes, dtype=dtype)
