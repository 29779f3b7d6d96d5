"""The run's placement from its config (`kd_jax.train.placement`), with the
engine's errors surfaced as `ConfigError`s before any step is compiled."""

from __future__ import annotations

from typing import Any, Sequence

import jax

from kd_jax.train import placement as placement_lib
from kd_jax.train import sharding as sharding_lib
from kd_jax.trainer.config import RunConfig
from kd_jax.trainer.config import teacher_key
from kd_jax.trainer.errors import ConfigError


def _teacher_sharding(rc: RunConfig):
  specs = {(t.sharding if isinstance(t.sharding, str) else
            tuple(map(tuple, t.sharding))) for t in rc.teachers}
  if len(specs) > 1:
    raise ConfigError("teachers", "several teachers are placed alike: give "
                      "them one `sharding`.")
  spec = specs.pop() if specs else "replicated"
  return spec if isinstance(spec, str) else [tuple(r) for r in spec]


def make_placement(rc: RunConfig, student, teachers: Sequence[Any], example):
  """Mesh (``train.parallel`` 'none' / 'jit' + ``train.mesh``) or pmap
  placement of `student` and `teachers` (Linen modules); `example`: an
  input of the models (their logical axis names come from an abstract
  ``init(example, train=False)``)."""
  tr = rc.train
  spec = _teacher_sharding(rc)
  tensor = dict(tr.mesh).get("tensor", 1) > 1
  names = lambda m: sharding_lib.logical_axis_names(  # noqa: E731
      m, example, train=False)
  if spec == "tensor" and len(teachers) > 1:
    raise ConfigError("teachers", "a tensor-parallel teacher must be the "
                      "only teacher.")
  try:
    return placement_lib.make_placement(
        tr.parallel, mesh=dict(tr.mesh) or None, num_devices=tr.num_devices,
        rules=tr.sharding_rules,
        student_names=names(student) if tensor else None,
        teacher_sharding=spec,
        teacher_names=(names(teachers[0]) if teachers and spec != "replicated"
                       and len(teachers) == 1 else None))
  except ValueError as e:
    raise ConfigError("train.mesh", str(e)) from None


def check_rules(rc: RunConfig, placement, host_state, abstract_teachers
                ) -> None:
  """A rule naming no parameter of the state / the teacher is a
  `ConfigError` (checked on shapes, nothing placed)."""
  if not isinstance(placement, sharding_lib.MeshParallel):
    return
  if host_state is not None:
    try:
      placement.state_shardings(jax.eval_shape(lambda: host_state),
                                logical_names=placement.student_names)
    except ValueError as e:
      raise ConfigError("train.sharding_rules", str(e)) from None
  for t, abstract in zip(rc.teachers, abstract_teachers):
    try:
      placement.teacher_target(abstract)
    except ValueError as e:
      raise ConfigError(teacher_key(rc, t, "sharding"), str(e)) from None
