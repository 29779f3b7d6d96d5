"""The trainers' side of mesh sharding: `config.train.mesh`,
`config.train.sharding_rules` and `config.teacher.sharding` ->
`kd_jax.train.sharding.MeshParallel`, with the engine's errors surfaced as
`ConfigError`s (before any step is compiled). The CNN trainer
(`make_parallel`) and the language-model trainer (`kd_jax.trainer.lm`) build
the same `TrainerMesh`.

A mesh run places the student state by the state rules (FSDP over `'fsdp'`,
arrays >= 64 KiB; logical names when `tensor` > 1), restores the teacher
directly into its shardings (`checkpoints.load_teacher_variables(...,
sharding=target)`), and reports the bytes per device (`memory_report`).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.train import sharding as sharding_lib
from kd_jax.trainer import checkpointing
from kd_jax.trainer import config as config_lib


def _teacher_spec(rc: config_lib.RunConfig):
  s = rc.teacher.sharding
  return s if isinstance(s, str) else [tuple(r) for r in s]


class TrainerMesh(sharding_lib.MeshParallel):
  """`MeshParallel` + what the trainers ask of their parallelism object:
  `place_state` / `place_teacher` / `teacher_target` (with the models'
  logical axis names) and `fetch(tree, replicated=...)`.

  Args:
    mesh: `config.train.mesh` (`{'data': d, 'fsdp': f, 'tensor': t}`).
    rules: `config.train.sharding_rules` (`(regex, spec)` pairs).
    student, teacher: the Linen models (teacher None without one).
    example: an input of the models (logical names are read from an
      abstract `init(example, train=False)`).
    teacher_spec: `config.teacher.sharding`.
  """

  def __init__(self, mesh, rules, student, teacher, example,
               teacher_spec="replicated"):
    try:
      m = sharding_lib.make_mesh(dict(mesh))
      rules = sharding_lib.state_rules(m, rules=[tuple(r) for r in rules])
      super().__init__(m, state_rules=rules)
    except ValueError as e:
      raise config_lib.ConfigError("train.mesh", str(e)) from None
    tensor = m.shape.get("tensor", 1) > 1
    self.student_names = (sharding_lib.logical_axis_names(student, example,
                                                          train=False)
                          if tensor else None)
    self.teacher_spec = teacher_spec
    self.teacher_names = None
    if teacher is not None and teacher_spec != "replicated":
      self.teacher_names = sharding_lib.logical_axis_names(teacher, example,
                                                           train=False)

  def local_rows(self, batch):
    """This process's rows of a global batch (the rows its devices hold
    under the batch sharding; all rows with one process): what
    `shard_batch` takes."""
    if jax.process_count() == 1:
      return batch
    sh = self.batch_sharding()

    def rows(x):
      idx = sh.addressable_devices_indices_map(np.shape(x)).values()
      lo = min(s[0].start or 0 for s in idx)
      hi = max(len(x) if s[0].stop is None else s[0].stop for s in idx)
      return x[lo:hi]

    return jax.tree.map(rows, batch)

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
  spec = _teacher_spec(rc) if rc.distill else "replicated"
  return TrainerMesh(rc.train.mesh, rc.train.sharding_rules, student, teacher,
                     jnp.zeros((1,) + tuple(image_shape), jnp.float32), spec)


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




def barrier(name: str) -> None:
  """A barrier of all processes (a no-op with one): after process 0 wrote
  files that the others read next."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
