"""Where a run's arrays live: one placement interface, chosen by one function.

Every run is placed on a device mesh (`kd_jax.train.sharding.MeshParallel`):
one device is the mesh ``{'data': 1}``, plain data parallelism over n devices
is ``{'data': n}``, and FSDP / tensor parallelism are ``{'data': d, 'fsdp':
f, 'tensor': t}``; the student state, the teacher and the batch are placed
by rules (`kd_jax.train.sharding`). ``pmap`` stays available behind the
same interface (`kd_jax.train.parallel.DataParallel('pmap')`).

The interface a trainer uses (both classes implement it):

* ``num_devices``, ``axis_name`` (the step's ``axis_name``: ``'data'``
  under pmap, else None);
* ``compile(step, stacked=, donate_state=)`` -> a callable with ``.lower``;
* ``shard_batch(local_batch, stacked=)``, ``local_rows(global_batch)``;
* ``place_state(state)``, ``teacher_target(abstract_teacher)`` (the restore
  target of a teacher checkpoint), ``place_teacher(variables)``,
  ``replicate(tree)``, ``fetch(tree)`` (host NumPy);
* ``checkpoint_tree(state)``, ``restore_template(host_state)``,
  ``restored_state(tree, key_impl)`` (Orbax save / resume);
* ``memory(state, teacher, compiled)`` -> the ``memory`` entry of a report
  (bytes per device of the state and the teacher, the compiled step's
  temporaries).

>>> p = make_placement("none")
>>> p.num_devices, p.axis_name, dict(p.mesh.shape)
(1, None, {'data': 1, 'fsdp': 1, 'tensor': 1})
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import jax

from kd_jax.train import parallel as parallel_lib
from kd_jax.train import sharding as sharding_lib

PARALLEL = ("none", "single", "jit", "pmap")
Placement = Union[sharding_lib.MeshParallel, parallel_lib.DataParallel]


def mesh_shape(parallel: str = "none", mesh: Optional[Mapping[str, int]] = None,
               num_devices: int = 0) -> Optional[dict]:
  """The mesh of a run: `mesh` as given, ``{'data': 1}`` for one device
  (``'none'`` / ``'single'``), ``{'data': n}`` for ``'jit'`` (all devices
  when `num_devices` is 0); None for ``'pmap'``."""
  if parallel not in PARALLEL:
    raise ValueError(f"parallel must be one of {PARALLEL}; got {parallel!r}.")
  if parallel == "pmap":
    return None
  if mesh:
    return dict(mesh)
  if parallel in ("none", "single"):
    return {"data": 1}
  return {"data": int(num_devices) if num_devices else len(jax.devices())}


def make_placement(parallel: str = "none", *,
                   mesh: Optional[Mapping[str, int]] = None,
                   num_devices: int = 0, rules: Sequence[Any] = (),
                   student_names=None, teacher_sharding: Any = "replicated",
                   teacher_names=None) -> Placement:
  """The placement of a run.

  Args:
    parallel: ``'none'`` / ``'single'`` (one device), ``'jit'`` (a mesh),
      ``'pmap'``.
    mesh: ``{'data': d, 'fsdp': f, 'tensor': t}`` (``'jit'``).
    num_devices: devices of a ``'jit'`` / ``'pmap'`` run without a mesh (0:
      all; pmap: all local ones).
    rules: ``(regex, spec)`` rules of the student state.
    student_names / teacher_names: the models' logical axis names
      (`kd_jax.train.sharding.logical_axis_names`; needed for ``tensor``
      rules and a tensor-parallel teacher).
    teacher_sharding: ``'replicated'`` | ``'fsdp'`` | ``'tensor'`` | rules.
  """
  shape = mesh_shape(parallel, mesh, num_devices)
  if shape is None:
    devices = jax.local_devices()
    return parallel_lib.DataParallel(
        "pmap", devices=devices[:num_devices] if num_devices else None)
  devices = None
  if not mesh and parallel in ("none", "single"):
    devices = [jax.devices()[0]]
  elif not mesh and num_devices:
    devices = jax.devices()[:num_devices]
  m = sharding_lib.make_mesh(shape, devices)
  return sharding_lib.MeshParallel(
      m, state_rules=sharding_lib.state_rules(m, rules=[tuple(r) for r in
                                                        rules]),
      student_names=student_names, teacher_sharding=teacher_sharding,
      teacher_names=teacher_names)
