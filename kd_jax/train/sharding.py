"""Device meshes, partitioning rules and the sharded (GSPMD) distill step.

`MeshParallel` is the N-D sibling of `DataParallel('jit')`: a `Mesh` over all
(global) devices with up to three axes,

* `'data'`: pure data parallelism (the state is replicated along it);
* `'fsdp'`: the batch is split along it too *and* the state (parameters,
  optimizer state, distiller state) is partitioned along it (ZeRO-3 / FSDP);
* `'tensor'`: tensor (model) parallelism of models that name the logical
  axes of their parameters (Megatron column/row split; e.g. the zoo ViT
  built with `logical_axes=True`).

The batch is sharded over `('data', 'fsdp')` jointly. The step is written
for the global batch (`axis_name=None`) and compiled once with `jax.jit`
and explicit in/out shardings; XLA's SPMD partitioner inserts every
collective (gradient reduce-scatter, parameter all-gathers, BatchNorm
statistics over the global batch).

Partitioning is data, not code (big_vision's `sharding_rules`, MaxText's
`logical_axis_rules`): a `ShardingRules` holds

1. `rules`: `(regex, spec)` pairs; the first regex that `re.search`es a
   leaf's path (`'params/layer1_0/conv1/kernel'`,
   `'opt_state/0/mu/student/layer1_0/conv1/kernel'`, ...) gives its spec, a
   tuple with one mesh axis (or tuple of axes, or None) per array dimension.
   A rule that matches no leaf is an error.
2. `logical_rules`: logical axis name -> mesh axis, applied to the names a
   model declares (`nn.with_logical_partitioning`); see `logical_axis_names`.
3. the FSDP default for the remaining leaves: an array of at least
   `min_bytes` (default 64 KiB) is sharded over `fsdp_axes` along its
   largest dimension divisible by their size (ties: the later dimension);
   smaller arrays, scalars and arrays without such a dimension stay
   replicated. Because the default depends only on the shape, optimizer
   moments are sharded exactly like their parameters.

The teacher has no optimizer state and is only read, so it is sharded on its
own (`teacher_rules`): `'replicated'`, `'fsdp'` over `('data', 'fsdp')`
jointly (each of 8 devices holds ~1/8), `'tensor'` (its logical names), or
explicit rules.

Typical use::

  par = MeshParallel({"data": 2, "fsdp": 4, "tensor": 1})
  state = par.shard_state(state)                 # or par.init_state(fn, ...)
  tv = par.shard_teacher(teacher_vars, "fsdp")
  run = par.compile(make_multi_step(step), stacked=True)
  batch = par.shard_batch(local_chunk, stacked=True)
  compiled = run.lower(state, tv, batch).compile()   # optional (memory)
  report = memory_report(state, tv, compiled)
  print(memory_summary(report))
  state, metrics = run(state, tv, batch)

References:
  Xu et al., "GSPMD: General and Scalable Parallelization for ML Computation
  Graphs", 2021; Rajbhandari et al., "ZeRO", SC 2020; Shoeybi et al.,
  "Megatron-LM", 2019; google-research/big_vision (`sharding.py`),
  AI-Hypercomputer/maxtext (`logical_axis_rules`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax.train import state as state_lib
from kd_jax.train.memory import memory_report
from kd_jax.train.memory import memory_summary  # noqa: F401 (re-export)
from kd_jax.train.memory import step_memory  # noqa: F401 (re-export)
from kd_jax.train.memory import tree_bytes  # noqa: F401 (re-export)
from kd_jax.train.parallel import _leaves_with_paths
from kd_jax.train.parallel import _put_global

PyTree = Any
AxisSpec = Union[None, str, Tuple[str, ...]]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DEFAULT_MIN_SHARD_BYTES = 64 * 1024
TEACHER_STRATEGIES = ("replicated", "fsdp", "tensor")

# Logical axis name -> mesh axis (MaxText style). 'qkv' is the output axis of
# a fused q|k|v projection, ordered (q|k|v, head, head_dim): a contiguous split
# of it is not a split by heads, so it is not tensor-sharded by default.
DEFAULT_LOGICAL_RULES = (
    ("embed", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("qkv", None),
    ("vocab", None),
)


# ---------------------------------------------------------------------------
# Mesh.


def make_mesh(spec: Optional[Mapping[str, int]] = None,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """`{'data': 2, 'fsdp': 4, 'tensor': 1}` -> `Mesh` with axes `MESH_AXES`.

  Missing axes have size 1; one size may be -1 (inferred). Without `spec`
  the mesh is `{'data': len(devices)}`, i.e. `DataParallel('jit')`.
  `devices` defaults to `jax.devices()` (all processes). On TPU/GPU the
  device order follows the physical topology (`mesh_utils`); `'tensor'`
  varies fastest, so tensor groups are neighbours.

  >>> dict(make_mesh({"data": 1}, jax.devices()[:1]).shape)
  {'data': 1, 'fsdp': 1, 'tensor': 1}
  """
  devices = list(devices) if devices is not None else jax.devices()
  n = len(devices)
  spec = dict(spec) if spec is not None else {"data": n}
  unknown = sorted(set(spec) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh axes must be among {MESH_AXES}; got unknown axes "
                     f"{unknown} in {spec}.")
  sizes = [spec.get(a, 1) for a in MESH_AXES]
  if any(not isinstance(s, (int, np.integer)) or (s < 1 and s != -1)
         for s in sizes) or sizes.count(-1) > 1:
    raise ValueError(f"mesh sizes must be positive ints (one may be -1); got "
                     f"{spec}.")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if n % known:
      raise ValueError(f"cannot infer the -1 axis of mesh {spec}: {n} devices "
                       f"are not divisible by {known}.")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ValueError(
        f"mesh {spec} has {' x '.join(map(str, sizes))} = {math.prod(sizes)} "
        f"devices but there are {n} devices; the product of the mesh sizes "
        "must equal the device count.")
  arr = None
  if devices[0].platform != "cpu":
    try:
      from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
      arr = mesh_utils.create_device_mesh(sizes, devices,
                                          allow_split_physical_axes=True)
    except Exception:  # pylint: disable=broad-except
      arr = None
  if arr is None:
    arr = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(arr, MESH_AXES)


def _axis_size(mesh: Mesh, axes: AxisSpec) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def _axes_tuple(axes: AxisSpec) -> Tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


# ---------------------------------------------------------------------------
# Rules.


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """How to partition a pytree over a mesh (see the module docstring).

  Attributes:
    rules: `(regex, spec)` pairs, first match wins; `spec` has one entry per
      leading array dimension (mesh axis name, tuple of names, or None).
    fsdp_axes: mesh axes the FSDP default shards over (`()`: none).
    min_bytes: arrays smaller than this stay replicated under the default.
    logical_rules: `(logical_name, mesh_axis)` pairs for models with logical
      axis names; None ignores logical names.
    require_logical_names: error when the tree's model has no logical names
      although `logical_rules` use a mesh axis > 1 (teacher `'tensor'`).
  """
  rules: Tuple[Tuple[str, Tuple[AxisSpec, ...]], ...] = ()
  fsdp_axes: Tuple[str, ...] = ()
  min_bytes: int = DEFAULT_MIN_SHARD_BYTES
  logical_rules: Optional[Tuple[Tuple[str, AxisSpec], ...]] = None
  require_logical_names: bool = False

  def __post_init__(self):
    rules = tuple((str(r), tuple(s) if isinstance(s, (list, tuple)) else (s,))
                  for r, s in self.rules)
    for regex, _ in rules:
      try:
        re.compile(regex)
      except re.error as e:
        raise ValueError(f"sharding rule {regex!r} is not a valid regex: "
                         f"{e}.") from None
    object.__setattr__(self, "rules", rules)
    object.__setattr__(self, "fsdp_axes", _axes_tuple(self.fsdp_axes))
    if self.logical_rules is not None:
      object.__setattr__(self, "logical_rules", tuple(
          (str(k), v) for k, v in dict(self.logical_rules).items()))


def state_rules(mesh: Mesh, *, rules=(), min_bytes: int =
                DEFAULT_MIN_SHARD_BYTES) -> ShardingRules:
  """Default rules of the train state: FSDP over `'fsdp'`, logical rules
  (tensor parallelism) when the mesh has a `'tensor'` axis > 1."""
  tensor = mesh.shape.get("tensor", 1) > 1
  return ShardingRules(rules=tuple(rules), fsdp_axes=("fsdp",),
                       min_bytes=min_bytes,
                       logical_rules=DEFAULT_LOGICAL_RULES if tensor else None)


_default_state_rules = state_rules


def teacher_rules(sharding: Union[str, ShardingRules, Sequence] = "replicated",
                  *, min_bytes: int = DEFAULT_MIN_SHARD_BYTES
                  ) -> ShardingRules:
  """`config.teacher.sharding` -> `ShardingRules`.

  `'replicated'`; `'fsdp'` (FSDP over `('data', 'fsdp')` jointly: the
  teacher has no optimizer state and is only read, so it is spread over all
  devices of the mesh); `'tensor'` (the model's logical axis names, the
  rest replicated); a `ShardingRules`; or a list of `(regex, spec)` pairs
  (unmatched leaves replicated).
  """
  if isinstance(sharding, ShardingRules):
    return sharding
  if isinstance(sharding, str):
    if sharding == "replicated":
      return ShardingRules(min_bytes=min_bytes)
    if sharding == "fsdp":
      return ShardingRules(fsdp_axes=BATCH_AXES, min_bytes=min_bytes)
    if sharding == "tensor":
      return ShardingRules(min_bytes=min_bytes,
                           logical_rules=DEFAULT_LOGICAL_RULES,
                           require_logical_names=True)
    raise ValueError(f"teacher sharding must be one of {TEACHER_STRATEGIES}, "
                     f"a ShardingRules or a list of (regex, spec) rules; got "
                     f"{sharding!r}.")
  try:
    return ShardingRules(rules=tuple(tuple(r) for r in sharding),
                         min_bytes=min_bytes)
  except (TypeError, ValueError) as e:
    raise ValueError(f"teacher sharding rules must be (regex, spec) pairs; got "
                     f"{sharding!r} ({e}).") from None


def path_str(path) -> str:
  """Pytree key path -> `'params/layer1_0/conv1/kernel'`."""
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return "/".join(out)


def logical_axis_names(module: nn.Module, *init_args, **init_kwargs
                       ) -> Dict[str, Tuple[Optional[str], ...]]:
  """`{'blocks_0/mlp/fc1/kernel': ('embed', 'mlp'), ...}` of a Linen model.

  Initializes the model abstractly (`jax.eval_shape`, nothing is computed)
  and reads the `nn.LogicallyPartitioned` boxes that
  `nn.with_logical_partitioning` puts on its parameters. A module with a
  `logical_axes` field (the zoo ViT) is cloned with `logical_axes=True`.
  Keys are the parameter paths without the collection name, so they match
  the parameters, the teacher variables and the optimizer moments alike.
  Returns `{}` for a model without logical names.
  """
  if hasattr(module, "logical_axes") and not module.logical_axes:
    module = module.clone(logical_axes=True)
  boxed = jax.eval_shape(
      lambda: module.init(jax.random.key(0), *init_args, **init_kwargs))
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
  leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=is_box)[0]
  out = {}
  for path, leaf in leaves:
    if isinstance(leaf, nn.LogicallyPartitioned):
      out["/".join(path_str(path).split("/")[1:])] = tuple(leaf.names)
  return out


def _logical_lookup(names: Mapping[str, Tuple], path: str, ndim: int):
  parts = path.split("/")
  for i in range(len(parts)):
    got = names.get("/".join(parts[i:]))
    if got is not None and len(got) == ndim:
      return got
  return None


def _check_spec(path, shape, spec, mesh, regex):
  if len(spec) > len(shape):
    raise ValueError(f"sharding rule {regex!r} gives spec {spec} with "
                     f"{len(spec)} entries to `{path}` of shape {shape}.")
  for dim, axes in zip(shape, spec):
    for a in _axes_tuple(axes):
      if a not in mesh.shape:
        raise ValueError(f"sharding rule {regex!r} names mesh axis {a!r}; "
                         f"the mesh has axes {tuple(mesh.shape)}.")
    if dim % _axis_size(mesh, axes):
      raise ValueError(f"sharding rule {regex!r}: dimension {dim} of "
                       f"`{path}` (shape {shape}) is not divisible by mesh "
                       f"axes {axes} of size {_axis_size(mesh, axes)}.")


def _fsdp_dim(shape, spec, size):
  """Largest free dimension divisible by `size` (ties: the later one)."""
  best = None
  for i, d in enumerate(shape):
    if spec[i] is None and d % size == 0 and (best is None
                                              or d >= shape[best]):
      best = i
  return best


def leaf_spec(path: str, shape: Tuple[int, ...], nbytes: int, mesh: Mesh,
              rules: ShardingRules, logical_names=None,
              matched: Optional[set] = None) -> P:
  """PartitionSpec of one array under `rules` (see the module docstring)."""
  for regex, spec in rules.rules:
    if re.search(regex, path):
      _check_spec(path, shape, spec, mesh, regex)
      if matched is not None:
        matched.add(regex)
      return P(*spec)
  spec = [None] * len(shape)
  used = set()
  if rules.logical_rules is not None and logical_names:
    table = dict(rules.logical_rules)
    names = _logical_lookup(logical_names, path, len(shape))
    for i, name in enumerate(names or ()):
      axes = table.get(name) if name is not None else None
      if axes is None or set(_axes_tuple(axes)) & used:
        continue
      if shape[i] % _axis_size(mesh, axes) == 0 and _axis_size(mesh, axes) > 1:
        spec[i] = axes
        used |= set(_axes_tuple(axes))
  fsdp = tuple(a for a in rules.fsdp_axes if a not in used)
  size = _axis_size(mesh, fsdp)
  if fsdp and size > 1 and nbytes >= rules.min_bytes:
    i = _fsdp_dim(shape, spec, size)
    if i is not None:
      spec[i] = fsdp[0] if len(fsdp) == 1 else fsdp
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def _nbytes(x) -> int:
  dtype = x.dtype
  if jnp.issubdtype(dtype, jax.dtypes.prng_key):
    return int(np.prod(x.shape)) * 8
  return int(np.prod(x.shape)) * np.dtype(dtype).itemsize


def partition_specs(tree: PyTree, mesh: Mesh, rules: ShardingRules, *,
                    logical_names: Optional[Mapping[str, Tuple]] = None,
                    what: str = "state") -> PyTree:
  """Tree of `PartitionSpec`s for `tree` (arrays or `ShapeDtypeStruct`s).

  Raises ValueError, before anything is compiled, when a rule matches no
  leaf, or when logical rules would use a `'tensor'` axis > 1 but the model
  declares no logical axis names.
  """
  if rules.logical_rules is not None and rules.require_logical_names:
    tensor_axes = {a for _, ax in rules.logical_rules for a in _axes_tuple(ax)
                   if mesh.shape.get(a, 1) > 1}
    if tensor_axes and not logical_names:
      raise ValueError(
          f"the {what} asks for tensor parallelism over mesh axes "
          f"{sorted(tensor_axes)}, but its model has no logical axis names; "
          "annotate its parameters with nn.with_logical_partitioning (the zoo "
          "ViT: VisionTransformer(logical_axes=True)) and pass "
          "`logical_names=logical_axis_names(model, x)`.")
  matched = set()

  def f(path, x):
    return leaf_spec(path_str(path), tuple(np.shape(x)), _nbytes(x), mesh,
                     rules, logical_names, matched)

  specs = jax.tree_util.tree_map_with_path(f, tree)
  unused = [r for r, _ in rules.rules if r not in matched]
  if unused:
    some = [path_str(p) for p, _ in _leaves_with_paths(tree)][:4]
    raise ValueError(f"{what} sharding rule(s) {unused} match no parameter "
                     f"(paths look like {some}).")
  return specs


def _shape_dtype(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


def named_shardings(tree: PyTree, mesh: Mesh, rules: ShardingRules, *,
                    logical_names=None, what: str = "state") -> PyTree:
  """`partition_specs` as `NamedSharding`s of `mesh`."""
  specs = partition_specs(tree, mesh, rules, logical_names=logical_names,
                          what=what)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def abstract_with_shardings(tree: PyTree, shardings: PyTree) -> PyTree:
  """`ShapeDtypeStruct`s carrying `shardings` (an Orbax restore target)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
      tree, shardings)


def put(tree: PyTree, shardings: PyTree) -> PyTree:
  """Places a (host or device) tree with `shardings`, leaf by leaf.

  Arrays already on devices are resharded by `jax.device_put` (single
  process); host values, identical on every process, are placed with
  `jax.make_array_from_callback`, so each process materializes only its
  own shards. Use `MeshParallel.init_state` to create a state that never
  exists unsharded.
  """
  multi = jax.process_count() > 1

  def f(x, s):
    if isinstance(x, jax.Array) and (not multi or not x.is_fully_addressable):
      return jax.device_put(x, s, may_alias=False)
    return _put_global(x, s)

  return jax.tree.map(f, tree, shardings)


# ---------------------------------------------------------------------------
# The mesh-parallel engine.


class MeshParallel:
  """Compiles and feeds steps on an N-D mesh (`'data'`, `'fsdp'`, `'tensor'`).

  The same interface as `DataParallel` (`axis_name`, `num_devices`,
  `shard_batch`, `replicate`, `compile`, `fetch`), plus `shard_state`,
  `init_state` and `shard_teacher`. Build steps with `axis_name=None`.

  Args:
    mesh: `{'data': d, 'fsdp': f, 'tensor': t}` (product = device count) or
      a `jax.sharding.Mesh` with those axis names; None: `{'data': N}`.
    devices: default `jax.devices()` (global).
    state_rules: `ShardingRules` of the train state (default
      `state_rules(mesh)`: FSDP over `'fsdp'`, arrays >= 64 KiB).
  """
  mode = "jit"
  axis_name = None

  def __init__(self, mesh: Union[None, Mapping[str, int], Mesh] = None, *,
               devices: Optional[Sequence[jax.Device]] = None,
               state_rules: Optional[ShardingRules] = None,
               student_names=None, teacher_sharding="replicated",
               teacher_names=None):
    if isinstance(mesh, Mesh):
      missing = set(BATCH_AXES) - set(mesh.axis_names)
      if missing:
        raise ValueError(f"the mesh needs axes {BATCH_AXES}; it has "
                         f"{mesh.axis_names}.")
      self.mesh = mesh
    else:
      self.mesh = make_mesh(mesh, devices)
    self.devices = list(self.mesh.devices.flat)
    self.rules = (state_rules if state_rules is not None
                  else _default_state_rules(self.mesh))
    self.replicated = NamedSharding(self.mesh, P())
    # The placement protocol (`kd_jax.train.placement`): the student's and
    # the teacher's logical axis names, the teacher's sharding strategy.
    self.student_names = student_names
    self.teacher_sharding = teacher_sharding
    self.teacher_names = teacher_names

  # -- sizes ---------------------------------------------------------------

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  @property
  def num_local_devices(self) -> int:
    pid = jax.process_index()
    return sum(1 for d in self.devices if d.process_index == pid)

  @property
  def batch_divisor(self) -> int:
    """The global batch must be a multiple of `data x fsdp`."""
    return _axis_size(self.mesh, BATCH_AXES)

  def batch_sharding(self, stacked: bool = False) -> NamedSharding:
    spec = P(None, BATCH_AXES) if stacked else P(BATCH_AXES)
    return NamedSharding(self.mesh, spec)

  def _local_batch_divisor(self) -> int:
    """Batch rows per process must split evenly over its batch shards."""
    return self.batch_divisor // max(jax.process_count(), 1) or 1

  def check_batch(self, batch, *, stacked: bool = False, local: bool = False):
    """ValueError unless each leaf's batch dim is divisible by data x fsdp."""
    n = self._local_batch_divisor() if local else self.batch_divisor
    axis = 1 if stacked else 0
    for path, leaf in _leaves_with_paths(batch):
      shape = np.shape(leaf)
      name = "batch" + jax.tree_util.keystr(path)
      if len(shape) <= axis:
        raise ValueError(f"`{name}` has shape {tuple(shape)}; expected a batch "
                         f"axis at position {axis}.")
      if shape[axis] % n:
        d, f = self.mesh.shape["data"], self.mesh.shape["fsdp"]
        raise ValueError(
            f"{'process-local' if local else 'global'} batch size "
            f"{shape[axis]} of `{name}` is not divisible by data x fsdp = "
            f"{d} x {f}{' / processes' if local else ''} = {n} (mesh "
            f"{dict(self.mesh.shape)}); use a multiple of {n}.")

  # -- placing -------------------------------------------------------------

  def state_shardings(self, state: PyTree, *, logical_names=None) -> PyTree:
    return named_shardings(state, self.mesh, self.rules,
                           logical_names=logical_names, what="state")

  def shard_state(self, state: PyTree, *, logical_names=None) -> PyTree:
    """The train state (params, opt state, distiller state) per the rules."""
    return put(state, self.state_shardings(state, logical_names=logical_names))

  def init_state(self, init_fn: Callable, *args, logical_names=None):
    """`init_fn(*args)` compiled with sharded outputs: the state is created
    directly in its shards and never exists whole on one device."""
    abstract = jax.eval_shape(init_fn, *args)
    sh = self.state_shardings(abstract, logical_names=logical_names)
    return jax.jit(init_fn, out_shardings=sh)(*args)

  def teacher_shardings(self, teacher_variables: PyTree,
                        sharding: Union[str, ShardingRules, Sequence] =
                        "replicated", *, logical_names=None,
                        min_bytes: int = DEFAULT_MIN_SHARD_BYTES) -> PyTree:
    """Shardings of the teacher variables (see `teacher_rules`); use them
    as the restore target of `load_teacher_variables`."""
    return named_shardings(teacher_variables, self.mesh,
                           teacher_rules(sharding, min_bytes=min_bytes),
                           logical_names=logical_names, what="teacher")

  def shard_teacher(self, teacher_variables: PyTree,
                    sharding: Union[str, ShardingRules, Sequence] =
                    "replicated", *, logical_names=None,
                    min_bytes: int = DEFAULT_MIN_SHARD_BYTES) -> PyTree:
    """Places the teacher once, independently of the student's sharding."""
    return put(teacher_variables, self.teacher_shardings(
        teacher_variables, sharding, logical_names=logical_names,
        min_bytes=min_bytes))

  def replicate(self, tree: PyTree) -> PyTree:
    return put(tree, jax.tree.map(lambda _: self.replicated, tree))

  def shard_batch(self, batch: PyTree, *, stacked: bool = False) -> PyTree:
    """This process's slice of a global batch -> arrays sharded over
    `('data', 'fsdp')` (`jax.make_array_from_process_local_data`)."""
    self.check_batch(batch, stacked=stacked, local=True)
    sharding = self.batch_sharding(stacked)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding,
                                                         np.asarray(x)),
        batch)

  def unreplicate(self, tree: PyTree) -> PyTree:
    return tree

  def fetch(self, tree: PyTree) -> PyTree:
    """Device arrays -> host NumPy (sharded arrays are gathered; in
    multi-process runs with `process_allgather`)."""
    def get(x):
      if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype,
                                                     jax.dtypes.prng_key):
        x = jax.random.key_data(x)
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
          return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
      return np.asarray(x)
    return jax.tree.map(get, tree)

  # -- the placement protocol (kd_jax.train.placement) ----------------------

  def place_state(self, state: PyTree) -> PyTree:
    """The train state in its shards (the state rules, the student's
    logical names)."""
    return self.shard_state(state, logical_names=self.student_names)

  def teacher_target(self, abstract_teacher: PyTree) -> PyTree:
    """The teacher's `NamedSharding`s: the restore target of a teacher
    checkpoint (each array read straight into its shards)."""
    return self.teacher_shardings(abstract_teacher, self.teacher_sharding,
                                  logical_names=self.teacher_names)

  def place_teacher(self, teacher_variables: PyTree) -> PyTree:
    return put(teacher_variables, self.teacher_target(teacher_variables))

  def local_rows(self, batch: PyTree) -> PyTree:
    """This process's rows of a global host batch (what `shard_batch`
    takes; all rows with one process)."""
    if jax.process_count() == 1:
      return batch
    sh = self.batch_sharding()

    def rows(x):
      idx = sh.addressable_devices_indices_map(np.shape(x)).values()
      lo = min(s[0].start or 0 for s in idx)
      hi = max(len(x) if s[0].stop is None else s[0].stop for s in idx)
      return x[lo:hi]

    return jax.tree.map(rows, batch)

  def checkpoint_tree(self, state) -> PyTree:
    """The saved tree: each process writes its own shards."""
    return state_lib.state_to_tree(state)

  def restore_template(self, state) -> PyTree:
    """`ShapeDtypeStruct`s with the state's shardings: a checkpoint saved on
    any mesh is restored straight into this one's shards."""
    tree = state_lib.state_to_tree(state)
    sh = self.state_shardings(tree, logical_names=self.student_names)
    return abstract_with_shardings(tree, sh)

  def restored_state(self, tree: PyTree, impl):
    """The train state of a restored `restore_template` tree (already in
    its shards; `place_state` keeps them)."""
    return state_lib.tree_to_state(tree, impl)

  def memory(self, state, teacher_variables=None, compiled=None):
    """`memory_report` of the placed state / teacher / compiled step."""
    return memory_report(state, teacher_variables, compiled)

  # -- compiling -----------------------------------------------------------

  def compile(self, step_fn: Callable, *, stacked: bool = False,
              donate_state: bool = True) -> Callable:
    """Compiles `step_fn(state, *args, batch)` with explicit shardings.

    The input shardings are those of the arguments (place them with
    `shard_state` / `shard_teacher` / `shard_batch`); the batch is sharded
    over `('data', 'fsdp')`. When the first output has the structure of the
    first argument (`(state, metrics)` steps) it keeps the state's
    shardings, every other output is replicated. The returned function has
    `.lower(*args)` for ahead-of-time compilation (`memory_report`).
    """
    bsh = self.batch_sharding(stacked)
    cache = {}

    def shardings_of(tree):  # arrays, or ShapeDtypeStructs with shardings
      return jax.tree.map(
          lambda x: getattr(x, "sharding", None) or self.replicated, tree)

    def build(args):
      in_sh = tuple(shardings_of(a) for a in args[:-1]) + (
          jax.tree.map(lambda _: bsh, args[-1]),)
      out = jax.eval_shape(step_fn, *args)
      rep = lambda t: jax.tree.map(lambda _: self.replicated, t)  # noqa: E731
      if (isinstance(out, tuple) and len(out) == 2 and
          jax.tree.structure(out[0]) == jax.tree.structure(args[0])):
        out_sh = (in_sh[0], rep(out[1]))
      else:
        out_sh = rep(out)
      return jax.jit(step_fn, in_shardings=in_sh, out_shardings=out_sh,
                     donate_argnums=(0,) if donate_state else ())

    def get(args):
      if not args:
        raise TypeError("the step needs at least a batch argument.")
      self.check_batch(args[-1], stacked=stacked)
      key = tuple((jax.tree.structure(a),
                   tuple(getattr(x, "sharding", None)
                         for x in jax.tree.leaves(a))) for a in args[:-1])
      key = (len(args),) + key
      fn = cache.get(key)
      if fn is None:
        fn = cache[key] = build(args)
      return fn

    def run(*args):
      return get(args)(*args)

    run.lower = lambda *args: get(args).lower(*args)
    run.__wrapped__ = step_fn
    return run
