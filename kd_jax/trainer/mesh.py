"""The trainer's side of mesh sharding: `config.train.mesh`,
`config.train.sharding_rules` and `config.teacher.sharding` ->
`kd_jax.train.sharding.MeshParallel`, with the engine's errors surfaced as
`ConfigError`s (before any step is compiled).

A mesh run places the student state by the state rules (FSDP over `'fsdp'`,
arrays >= 64 KiB; logical names when `tensor` > 1), restores the teacher
directly into its shardings (`checkpoints.load_teacher_variables(...,
sharding=target)`), and reports the bytes per device (`memory_report`).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp

from kd_jax.train import sharding as sharding_lib
from kd_jax.trainer import checkpointing
from kd_jax.trainer import config as config_lib


def _teacher_spec(rc: config_lib.RunConfig):
  s = rc.teacher.sharding
  return s if isinstance(s, str) else [tuple(r) for r in s]


class TrainerMesh(sharding_lib.MeshParallel):
  """`MeshParallel` + what the trainer asks of its parallelism object:
  `place_state` / `place_teacher` / `teacher_target` (with the models'
  logical axis names) and `fetch(tree, replicated=...)`."""

  def __init__(self, rc: config_lib.RunConfig, student, teacher,
               image_shape):
    mesh = dict(rc.train.mesh)
    try:
      m = sharding_lib.make_mesh(mesh)
      rules = sharding_lib.state_rules(
          m, rules=[tuple(r) for r in rc.train.sharding_rules])
      super().__init__(m, state_rules=rules)
    except ValueError as e:
      raise config_lib.ConfigError("train.mesh", str(e)) from None
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    tensor = m.shape.get("tensor", 1) > 1
    self.student_names = (sharding_lib.logical_axis_names(student, x,
                                                          train=False)
                          if tensor else None)
    spec = _teacher_spec(rc) if rc.distill else "replicated"
    self.teacher_spec = spec
    self.teacher_names = None
    if teacher is not None and spec != "replicated":
      self.teacher_names = sharding_lib.logical_axis_names(teacher, x,
                                                           train=False)

  def fetch(self, tree, replicated: bool = True):  # pylint: disable=W0221
    """Host NumPy (`replicated` is `DataParallel`'s flag: unused here)."""
    del replicated
    return super().fetch(tree)

  def teacher_target(self, abstract_teacher):
    """The teacher's `NamedSharding`s (restore target); `ConfigError`
    `teacher.sharding` for a rule naming no parameter or `'tensor'` on a
    model without logical axis names."""
    try:
      return self.teacher_shardings(abstract_teacher, self.teacher_spec,
                                    logical_names=self.teacher_names)
    except ValueError as e:
      raise config_lib.ConfigError("teacher.sharding", str(e)) from None

  def place_teacher(self, teacher_variables):
    return sharding_lib.put(teacher_variables,
                            self.teacher_target(teacher_variables))

  def place_state(self, state):
    """The train state in its shards; `ConfigError` `train.sharding_rules`
    for a rule naming no parameter."""
    try:
      sh = self.state_shardings(state, logical_names=self.student_names)
    except ValueError as e:
      raise config_lib.ConfigError("train.sharding_rules", str(e)) from None
    return sharding_lib.put(state, sh)


def state_tree(state):
  """The checkpointed tree of a (sharded) state, without gathering it (the
  PRNG key as its raw data)."""
  return checkpointing.state_to_tree(
      state.replace(rng=jax.random.key_data(state.rng)))


def restore_template(dp: TrainerMesh, state):
  """`ShapeDtypeStruct`s with the state's mesh shardings: Orbax restores
  each array of a checkpoint (saved on any mesh) straight into its shards."""
  tree = state_tree(state)
  try:
    sh = dp.state_shardings(tree, logical_names=dp.student_names)
  except ValueError as e:
    raise config_lib.ConfigError("train.sharding_rules", str(e)) from None
  return sharding_lib.abstract_with_shardings(tree, sh)


def make_parallel(rc: config_lib.RunConfig, student, teacher, image_shape
                  ) -> Optional[TrainerMesh]:
  """A `TrainerMesh` when `config.train.mesh` is set, else None."""
  if not rc.train.mesh:
    return None
  return TrainerMesh(rc, student, teacher, image_shape)


def place_state(dp, state):
  """`state` on `dp`'s devices: sharded by the rules (mesh) or replicated."""
  return dp.place_state(state) if isinstance(dp, TrainerMesh) else (
      dp.replicate(state))


def place_teacher(dp, teacher_variables):
  return (dp.place_teacher(teacher_variables) if isinstance(dp, TrainerMesh)
          else dp.replicate(teacher_variables))


def memory(dp, fn, state_dev, consts, batch) -> Optional[Dict[str, Any]]:
  """`report.json["memory"]` of a mesh run (None otherwise): the bytes of
  the state and the teacher per device and the compiled step's temporaries;
  prints the one-line summary."""
  if not isinstance(dp, TrainerMesh):
    return None
  compiled = fn.lower(state_dev, consts, batch).compile()
  rep = sharding_lib.memory_report(state_dev, consts.get("teacher"),
                                   compiled)
  if jax.process_index() == 0:
    print(sharding_lib.memory_summary(rep), flush=True)
  return rep


