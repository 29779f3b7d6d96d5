"""Data parallelism for the steps of `kd_jax.train.steps`, selected by a string.

`DataParallel(mode)` compiles *the same step code* in one of three modes:

* `'single'`: `jax.jit` on one device (the default device).
* `'pmap'`: `jax.pmap` over the local devices with axis `'data'`. Build the
  step with `axis_name=dp.axis_name`; gradients and metrics are `pmean`-ed
  and BatchNorm statistics synchronized (averaged) after every step. For
  BatchNorm *normalization* over the global batch (sync BN) give the model's
  `nn.BatchNorm(axis_name=dp.axis_name)`; otherwise each device normalizes
  with its own shard's statistics.
* `'jit'`: `jax.jit` with `jax.sharding`: a `Mesh` of all (global) devices
  with one axis `'data'`; the batch is sharded along it, the state and the
  teacher are replicated. The step is written for the global batch
  (`axis_name=None`) and XLA inserts the collectives (BatchNorm statistics
  are global-batch statistics automatically). Global batches are assembled
  with `jax.make_array_from_process_local_data`, so the same program runs on
  several hosts after `jax.distributed.initialize()`: every process passes
  its own slice of each global batch to `shard_batch`.

Typical loop::

  dp = DataParallel("jit")                       # or "pmap" / "single"
  step = make_distill_step(student, teacher, objective, tx,
                           axis_name=dp.axis_name)
  train = dp.compile(make_multi_step(step), stacked=True)
  state = dp.replicate(state)                    # once
  teacher_vars = dp.replicate(teacher_vars)      # once, never per step
  for chunk in chunks:                           # process-local numpy
    state, metrics = train(state, teacher_vars, dp.shard_batch(chunk,
                                                               stacked=True))
  metrics = dp.fetch(metrics)                    # host numpy

The batch is always the *last* argument of the step; every other argument
is replicated. A batch whose size is not divisible by the number of devices
raises a ValueError (from `shard_batch` and from the compiled function)
before anything is compiled.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax.train import memory as memory_lib
from kd_jax.train import state as state_lib

MODES = ("single", "pmap", "jit")
AXIS = "data"

PyTree = Any


def _put_global(x, sharding, transform=None):
  """Host value (identical on every process) -> array with `sharding`."""
  is_key = isinstance(x, jax.Array) and jnp.issubdtype(x.dtype,
                                                        jax.dtypes.prng_key)
  if is_key:
    impl = jax.random.key_impl(x)
    host = np.asarray(jax.random.key_data(x))
  else:
    host = np.asarray(x)
  if transform is not None:
    host = transform(host)
  arr = jax.make_array_from_callback(host.shape, sharding,
                                     lambda idx: host[idx])
  return jax.random.wrap_key_data(arr, impl=impl) if is_key else arr


def _leaves_with_paths(tree):
  return jax.tree_util.tree_flatten_with_path(tree)[0]


class DataParallel:
  """Compiles and feeds steps in `'single'`, `'pmap'` or `'jit'` mode.

  Args:
    mode: one of `'single'`, `'pmap'`, `'jit'`.
    devices: devices to use; default: `jax.devices()` (all processes) for
      `'jit'` and `'pmap'`, the first device for `'single'`. Each process
      feeds the devices it owns.
    axis_name: the mesh / pmap axis name (default `'data'`).

  >>> dp = DataParallel("single")
  >>> dp.num_devices, dp.axis_name
  (1, None)
  """

  def __init__(self, mode: str = "jit", *,
               devices: Optional[Sequence[jax.Device]] = None,
               axis_name: str = AXIS):
    if mode not in MODES:
      raise ValueError(
          f"parallel `mode` must be one of {MODES}; got {mode!r}.")
    self.mode = mode
    self._axis = axis_name
    if mode == "single":
      devices = list(devices) if devices is not None else [jax.devices()[0]]
      if len(devices) != 1:
        raise ValueError(
            f"mode 'single' takes one device; got {len(devices)}.")
    else:
      # pmap too: in multi-process runs `pmap(devices=...)` must list the
      # devices of *all* processes (each process maps over its local ones).
      devices = list(devices) if devices is not None else jax.devices()
    self.devices = devices
    self.mesh = Mesh(np.asarray(devices), (axis_name,))
    self.replicated = NamedSharding(self.mesh, P())
    pid = jax.process_index()
    local = [d for d in devices if d.process_index == pid]
    # pmap inputs: [num_local_devices, ...] split over this process's devices.
    self._local_sharding = NamedSharding(Mesh(np.asarray(local), (axis_name,)),
                                         P(axis_name))

  # -- properties ----------------------------------------------------------

  @property
  def axis_name(self) -> Optional[str]:
    """What to pass as the step's `axis_name` (None except in pmap mode)."""
    return self._axis if self.mode == "pmap" else None

  @property
  def axis(self) -> str:
    """The mesh / pmap axis name (in every mode)."""
    return self._axis

  @property
  def local_sharding(self) -> jax.sharding.SingleDeviceSharding:
    """This process's first device of `devices`: where host values (e.g. a
    teacher checkpoint) are loaded before `replicate` places them."""
    pid = jax.process_index()
    dev = next(d for d in self.devices if d.process_index == pid)
    return jax.sharding.SingleDeviceSharding(dev)

  @property
  def num_devices(self) -> int:
    """Devices the global batch is split over."""
    return len(self.devices)

  @property
  def num_local_devices(self) -> int:
    """Devices of this process that receive a slice of the batch."""
    pid = jax.process_index()
    return sum(1 for d in self.devices if d.process_index == pid)

  def batch_sharding(self, stacked: bool = False) -> NamedSharding:
    spec = P(None, self._axis) if stacked else P(self._axis)
    return NamedSharding(self.mesh, spec)

  # -- checks --------------------------------------------------------------

  def check_batch(self, batch, *, stacked: bool = False, local: bool = False):
    """ValueError unless every leaf's batch dim is divisible by the devices."""
    n = self.num_local_devices if local else self.num_devices
    axis = 1 if stacked else 0
    what = "process-local" if local else "global"
    for path, leaf in _leaves_with_paths(batch):
      shape = np.shape(leaf)
      name = "batch" + jax.tree_util.keystr(path)
      if len(shape) <= axis:
        raise ValueError(
            f"`{name}` has shape {tuple(shape)}; expected a batch axis at "
            f"position {axis}{' (stacked [num_steps, batch, ...])' if stacked else ''}.")
      if shape[axis] % n:
        raise ValueError(
            f"{what} batch size {shape[axis]} of `{name}` (shape "
            f"{tuple(shape)}) is not divisible by the number of "
            f"{'local ' if local else ''}devices {n} (mode {self.mode!r}); "
            f"use a batch size that is a multiple of {n}.")

  # -- placing data --------------------------------------------------------

  def replicate(self, tree: PyTree) -> PyTree:
    """Places a host/process-identical pytree on every device, once.

    pmap: stacked copies `[num_local_devices, ...]`; jit: global arrays with
    a replicated `NamedSharding`; single: a copy on the device.
    """
    if self.mode == "single":
      # A copy: compiled steps donate the state, which must not alias the
      # caller's arrays (e.g. the PRNG key the caller keeps using).
      return jax.device_put(tree, self.devices[0], may_alias=False)
    if self.mode == "pmap":
      n = self.num_local_devices
      return jax.tree_util.tree_map(
          lambda x: _put_global(x, self._local_sharding,
                                lambda h: np.broadcast_to(h[None],
                                                          (n,) + h.shape)),
          tree)
    return jax.tree_util.tree_map(
        lambda x: _put_global(x, self.replicated), tree)

  def unreplicate(self, tree: PyTree) -> PyTree:
    """Inverse of `replicate` (pmap: the first device's copy)."""
    if self.mode == "pmap":
      return jax.tree_util.tree_map(lambda x: x[0], tree)
    return tree

  def fetch(self, tree: PyTree, *, replicated: bool = True) -> PyTree:
    """Device outputs (metrics, params) -> host NumPy (unreplicated).

    PRNG keys become their key data. `replicated=False` for a tree that was
    not placed by `replicate` (e.g. a freshly initialized state).
    """
    if replicated:
      tree = self.unreplicate(tree)

    def get(x):
      if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
          return np.asarray(x.addressable_data(0))
        raise ValueError("cannot fetch a sharded global array on one host.")
      return np.asarray(x)

    return jax.tree_util.tree_map(get, tree)

  def shard_batch(self, batch: PyTree, *, stacked: bool = False) -> PyTree:
    """This process's slice of a global batch -> device arrays.

    `batch` leaves are `[b_local, ...]` (or `[num_steps, b_local, ...]`
    with `stacked=True`), where `b_local = global_batch / process_count`.
    single: `device_put`; pmap: reshaped to `[local_devices, b_local/n,
    ...]` (stacked: `[local_devices, num_steps, b_local/n, ...]`); jit:
    `jax.make_array_from_process_local_data` with the batch axis sharded.
    """
    if self.mode == "single":
      return jax.device_put(batch, self.devices[0])
    self.check_batch(batch, stacked=stacked, local=True)
    n = self.num_local_devices
    if self.mode == "pmap":
      def split(x):
        x = np.asarray(x)
        if stacked:
          s, b = x.shape[:2]
          x = x.reshape((s, n, b // n) + x.shape[2:])
          x = np.swapaxes(x, 0, 1)
        else:
          x = x.reshape((n, x.shape[0] // n) + x.shape[1:])
        return jax.device_put(x, self._local_sharding)
      return jax.tree_util.tree_map(split, batch)
    sharding = self.batch_sharding(stacked)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding,
                                                         np.asarray(x)),
        batch)

  # -- the placement protocol (kd_jax.train.placement) ----------------------

  def place_state(self, state: PyTree) -> PyTree:
    return self.replicate(state)

  def teacher_target(self, abstract_teacher: PyTree):
    """Where a teacher checkpoint is read: this process's first device
    (`place_teacher` then replicates it)."""
    del abstract_teacher
    return self.local_sharding

  def place_teacher(self, teacher_variables: PyTree) -> PyTree:
    return self.replicate(teacher_variables)

  def local_rows(self, batch: PyTree) -> PyTree:
    """This process's rows of a global host batch (contiguous blocks in
    process order)."""
    n = jax.process_count()
    if n == 1:
      return batch
    pid = jax.process_index()

    def rows(x):
      b = np.shape(x)[0] // n
      return x[pid * b:(pid + 1) * b]

    return jax.tree_util.tree_map(rows, batch)

  def checkpoint_tree(self, state) -> PyTree:
    """The saved tree: host NumPy (one copy)."""
    return state_lib.state_to_tree(self.fetch(state))

  def restore_template(self, state) -> PyTree:
    """Host NumPy of the (unplaced, host) state: what Orbax restores into."""
    return state_lib.state_to_tree(self.fetch(state, replicated=False))

  def restored_state(self, tree: PyTree, impl):
    """The (host) train state of a restored host tree (`place_state` puts
    it on the devices)."""
    return state_lib.tree_to_state(jax.device_get(tree), impl)

  def memory(self, state, teacher_variables=None, compiled=None):
    return memory_lib.memory_report(state, teacher_variables, compiled)

  # -- compiling -----------------------------------------------------------

  def compile(self, step_fn: Callable, *, stacked: bool = False,
              donate_state: bool = True) -> Callable:
    """Compiles `step_fn(state, *replicated_args, batch)` for this mode.

    `stacked=True` for `make_multi_step` functions (batch `[num_steps,
    batch, ...]`). With `donate_state` the input state's buffers are reused
    for the output state (do not use the old state afterwards).
    """
    donate = (0,) if donate_state else ()
    if self.mode == "single":
      compiled = jax.jit(step_fn, donate_argnums=donate)
    elif self.mode == "pmap":
      compiled = jax.pmap(step_fn, axis_name=self._axis, devices=self.devices,
                          donate_argnums=donate)
    else:
      bsh = self.batch_sharding(stacked)
      compiled = None

      def build(nargs):
        in_sh = (self.replicated,) * (nargs - 1) + (bsh,)
        return jax.jit(step_fn, in_shardings=in_sh,
                       out_shardings=self.replicated, donate_argnums=donate)

      cache = {}

    def get(args):
      if not args:
        raise TypeError("the step needs at least a batch argument.")
      batch = args[-1]
      if self.mode == "pmap":
        # leaves are [local_devices, per_device_batch, ...]
        for path, leaf in _leaves_with_paths(batch):
          if np.shape(leaf)[0] != self.num_local_devices:
            raise ValueError(
                f"`batch{jax.tree_util.keystr(path)}` has leading dim "
                f"{np.shape(leaf)[0]}, expected the {self.num_local_devices} "
                "local devices; prepare batches with `shard_batch`.")
      if self.mode == "jit":
        self.check_batch(batch, stacked=stacked)
        fn = cache.get(len(args))
        if fn is None:
          fn = cache[len(args)] = build(len(args))
        return fn
      return compiled

    def run(*args):
      return get(args)(*args)

    run.lower = lambda *args: get(args).lower(*args)
    run.__wrapped__ = step_fn
    return run
