"""The frozen teachers' variables: restored straight into their placement.

`restore(path, abstract, placement, key)` reads a teacher-training run's
workdir (its ``checkpoints/``, newest step) or an Orbax pytree directory of
variables, checked against the configured architecture from the metadata
before anything is read, each array restored into the placement's teacher
target (its shards on a mesh). Every error is a `ConfigError` naming `key`.
"""

from __future__ import annotations

import os
from typing import Any

from kd_jax import logs
from kd_jax.train import checkpoints as ckpt_lib
from kd_jax.trainer.errors import ConfigError


def checkpoint_dir(path: str) -> str:
  """A run's workdir -> its ``checkpoints/``; any other path as it is."""
  sub = os.path.join(os.path.abspath(path), "checkpoints")
  return sub if os.path.isdir(sub) else os.path.abspath(path)


def restore(path: str, abstract: Any, placement, key: str) -> Any:
  """The teacher's variables (structure / dtypes of `abstract`) from the
  Orbax checkpoint at `path`, placed by `placement.teacher_target`."""
  try:
    target = placement.teacher_target(abstract)
  except ValueError as e:
    raise ConfigError(key.rsplit(".", 1)[0] + ".sharding", str(e)) from None
  # A teacher run's `<step>/state` item has no step-level
  # `_CHECKPOINT_METADATA` (that is one level up): Orbax warns about it.
  with logs.quiet_absl("Metadata file does not exist"):
    try:
      return ckpt_lib.load_teacher_variables(checkpoint_dir(path), abstract,
                                             sharding=target)
    except (ckpt_lib.CheckpointError, FileNotFoundError, ValueError) as e:
      raise ConfigError(key, str(e)) from None
