"""Orbax checkpoints: train-state save/resume and teacher loading.

Layout of a run's checkpoint directory (one Orbax `CheckpointManager`):

    <workdir>/<step>/state/   the whole train-state pytree (student params and
                              batch stats, optimizer state, distiller params /
                              state, RNG key) -- never the teacher
    <workdir>/<step>/data/    JSON: the input iterator's position
                              (e.g. {'epoch': 3, 'step': 120})
    <workdir>/<step>/metrics  eval metrics, when given (for keep-best)

Atomicity: Orbax writes every step into `<step>.orbax-checkpoint-tmp-<ts>`
and renames it to `<step>` only after all files are written (plus a
`commit_success.txt` on object stores). A process killed while saving leaves
the tmp dir behind; `all_steps()` / `latest_step()` never list it, so resume
falls back to the previous finalized step (tested).

Teacher loading (`load_teacher_variables`) accepts either a checkpoint
directory from a teacher-training run (a manager root or one step dir; only
`params`/`batch_stats` are read) or a plain Orbax pytree dir of
`{'params', 'batch_stats'}` such as `python -m kd_jax.models.convert` writes.
Shapes are compared against the configured architecture
(`jax.eval_shape(model.init, ...)`) from the checkpoint *metadata*, before
any array is read or any step compiled.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

PyTree = Any


def closed_loop_filter(previous):
  """An unraisable hook that drops "RuntimeError: Event loop is closed"
  reported from a thread other than the main one and passes every other
  report to `previous`.

  When a checkpoint write or read fails (full disk, file-size limit, a
  damaged array file), Orbax ends its asyncio loop while TensorStore
  operations are still completing; their completion callbacks, run on
  TensorStore's threads, then post to the closed loop, and Python reports the
  error as "unraisable": a bare traceback beside the run's own one-line
  error or fallback warning. Nothing is lost (the last good checkpoint is
  final, the failed one is skipped).
  """

  def hook(unraisable):
    if (unraisable.exc_type is RuntimeError
        and str(unraisable.exc_value) == "Event loop is closed"
        and threading.current_thread() is not threading.main_thread()):
      return
    previous(unraisable)

  hook.kd_jax_closed_loop_filter = True
  return hook


def install_closed_loop_filter() -> None:
  """`sys.unraisablehook = closed_loop_filter(sys.unraisablehook)`, once."""
  if not getattr(sys.unraisablehook, "kd_jax_closed_loop_filter", False):
    sys.unraisablehook = closed_loop_filter(sys.unraisablehook)


STATE_ITEM = "state"
DATA_ITEM = "data"


class CheckpointError(ValueError):
  """A checkpoint that is missing, unreadable, or does not match the model."""


# ---------------------------------------------------------------------------
# Tree comparison helpers
# ---------------------------------------------------------------------------

def _key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flatten(tree: PyTree) -> Dict[str, Any]:
  """`{'a/b/c': leaf}` for every leaf (dict keys, attrs and indices)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_key_str(k) for k in path): leaf for path, leaf in leaves}


def _shape_of(x) -> Tuple[int, ...]:
  """Stored shape; typed PRNG keys are stored as their raw key data."""
  shape = tuple(getattr(x, "shape", np.shape(x)))
  dtype = getattr(x, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    shape = jax.eval_shape(jax.random.key_data,
                           jax.ShapeDtypeStruct(shape, dtype)).shape
  return tuple(shape)


def check_tree_matches(expected: PyTree, found: PyTree, *, what: str,
                       max_lines: int = 5) -> None:
  """Raises `CheckpointError` naming every path whose presence/shape differs.

  `expected` and `found` are trees of anything with a `.shape` (arrays,
  `jax.ShapeDtypeStruct`, Orbax `ArrayMetadata`). Only structure and shapes
  are compared (dtypes are cast on restore). The message lists up to
  `max_lines` paths per kind of difference: shape mismatches, parameters
  missing from the checkpoint, parameters not in the model.
  """
  exp, got = _flatten(expected), _flatten(found)
  groups = (
      ("with a different shape", [
          f"{p}: checkpoint has shape {_shape_of(got[p])}, model expects "
          f"{_shape_of(exp[p])}" for p in sorted(set(exp) & set(got))
          if _shape_of(exp[p]) != _shape_of(got[p])]),
      ("missing from the checkpoint", [
          f"{p}: missing from the checkpoint (model expects shape "
          f"{_shape_of(exp[p])})" for p in sorted(set(exp) - set(got))]),
      ("not in the model", [
          f"{p}: in the checkpoint (shape {_shape_of(got[p])}) but not in the "
          "model" for p in sorted(set(got) - set(exp))]),
  )
  if not any(lines for _, lines in groups):
    return
  summary = ", ".join(f"{len(lines)} {name}" for name, lines in groups if lines)
  body = []
  for _, lines in groups:
    body += lines[:max_lines]
    if len(lines) > max_lines:
      body.append(f"... and {len(lines) - max_lines} more")
  raise CheckpointError(f"{what} does not match the configured model "
                        f"({summary}):\n  " + "\n  ".join(body))


def _abstract(template: PyTree) -> PyTree:
  """Concrete/abstract tree -> `ShapeDtypeStruct`s (keeping shardings)."""
  def f(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, (np.ndarray, np.generic)):
      return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
    return x
  return jax.tree.map(f, template)


def restore_target(abstract: PyTree, sharding=None) -> PyTree:
  """`ShapeDtypeStruct`s with shardings: the target of an Orbax restore.

  `sharding`: None (keep each leaf's own sharding, else the first device),
  one `Sharding` for every leaf, or a pytree of shardings like `abstract`.
  Orbax restores each array directly into its sharding (each process reads
  only the slices of its devices).
  """
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if sharding is None or isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype,
            sharding=sharding or getattr(x, "sharding", None) or default),
        abstract)
  try:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract, sharding)
  except ValueError as e:
    raise ValueError("`sharding` must be one Sharding or a pytree of "
                     "shardings with the structure of the variables; "
                     f"{e}") from None


def _tree_metadata(item_dir: str) -> PyTree:
  meta = ocp.PyTreeCheckpointer().metadata(item_dir)
  meta = getattr(meta, "item_metadata", meta)
  return getattr(meta, "tree", meta)


# ---------------------------------------------------------------------------
# Train-state checkpoints
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Restored:
  """Result of `CheckpointManager.restore`."""
  step: int
  state: PyTree
  data_state: Optional[Dict[str, Any]]
  metrics: Optional[Dict[str, Any]]


class CheckpointManager:
  """Saves / restores a train state + data position with Orbax.

  Args:
    directory: the run's checkpoint dir (created if missing).
    save_every_steps: `should_save(step)` is true when `step % N == 0`;
      `None` saves only when forced or given metrics.
    keep_last: keep the `K` most recent checkpoints.
    keep_best: additionally keep the best `n` checkpoints by
      `metrics[best_metric]` (0 disables).
    best_metric, best_mode: `'max'` (accuracy) or `'min'` (loss).
    async_save: write in a background thread (Orbax async checkpointing);
      call `wait_until_finished()` / `close()` before the process exits.

  Usage in a training loop::

    mgr = CheckpointManager(workdir, save_every_steps=1000, keep_last=3)
    restored = mgr.restore(state)            # None on a fresh run
    if restored:
      state, it = restored.state, pipeline.iterator(restored.data_state)
    ...
    mgr.save(step, state, data_state=it.get_state())          # every N
    mgr.save(step, state, data_state=..., metrics={'accuracy': acc})
    mgr.save(last_step, state, data_state=..., force=True)    # at the end
    mgr.close()

  `step` should be the number of completed train steps (`state.step`).

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> d = tempfile.mkdtemp()
    >>> with CheckpointManager(d, save_every_steps=2, async_save=False) as m:
    ...   m.save(2, {'w': jnp.ones(3)}, data_state={'epoch': 0, 'step': 2})
    ...   r = m.restore({'w': jnp.zeros(3)})
    True
    >>> r.step, r.data_state, r.state['w'].tolist()
    (2, {'epoch': 0, 'step': 2}, [1.0, 1.0, 1.0])
  """

  def __init__(self, directory: str, *, save_every_steps: Optional[int] = None,
               keep_last: int = 3, keep_best: int = 1,
               best_metric: str = "accuracy", best_mode: str = "max",
               async_save: bool = True):
    if save_every_steps is not None and (
        not isinstance(save_every_steps, int) or save_every_steps < 1):
      raise ValueError("`save_every_steps` must be a positive int or None; got "
                       f"{save_every_steps!r}.")
    if not isinstance(keep_last, int) or keep_last < 1:
      raise ValueError(f"`keep_last` must be an int >= 1; got {keep_last!r}.")
    if not isinstance(keep_best, int) or keep_best < 0:
      raise ValueError(f"`keep_best` must be an int >= 0; got {keep_best!r}.")
    if best_mode not in ("max", "min"):
      raise ValueError(f"`best_mode` must be 'max' or 'min'; got {best_mode!r}.")
    self.directory = os.path.abspath(os.fspath(directory))
    self.best_metric = best_metric
    self.best_mode = best_mode
    self._save_every = save_every_steps

    sign = 1.0 if best_mode == "max" else -1.0

    def score(m):  # higher is better; steps saved without metrics rank last.
      v = (m or {}).get(best_metric)
      return -float("inf") if v is None else sign * float(v)

    policies = [ocp_managers.LatestN(n=keep_last)]
    if keep_best:
      policies.append(ocp_managers.BestN(
          get_metric_fn=score, reverse=False, n=keep_best,
          keep_checkpoints_without_metrics=False))
    save_policies = [ocp_managers.PreemptionCheckpointingPolicy()]
    if save_every_steps is not None:
      save_policies.insert(0, ocp_managers.FixedIntervalPolicy(save_every_steps))
    options = ocp.CheckpointManagerOptions(
        create=True,
        enable_async_checkpointing=async_save,
        preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
        save_decision_policy=ocp_managers.AnySavePolicy(save_policies),
        cleanup_tmp_directories=True,
        # Orbax persists metrics (<step>/metrics/) only when best_fn is set.
        best_fn=score, best_mode="max",
    )
    install_closed_loop_filter()  # (see closed_loop_filter)
    self._mgr = ocp.CheckpointManager(
        self.directory, options=options, item_names=(STATE_ITEM, DATA_ITEM))

  # -- queries ----------------------------------------------------------------
  def all_steps(self) -> List[int]:
    """Finalized checkpoint steps, ascending (tmp/unfinished dirs excluded)."""
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._mgr.latest_step()

  def metrics(self, step: int) -> Optional[Dict[str, Any]]:
    return self._mgr.metrics(step) or None

  def best_step(self) -> Optional[int]:
    """Kept step with the best `metrics[best_metric]` (None if none has one)."""
    best, best_val = None, None
    for s in self.all_steps():
      m = self._mgr.metrics(s)
      if not m or self.best_metric not in m:
        continue
      v = float(m[self.best_metric])
      if best is None or (v > best_val if self.best_mode == "max" else v < best_val):
        best, best_val = s, v
    return best

  def should_save(self, step: int) -> bool:
    return self._mgr.should_save(step)

  # -- save / restore ---------------------------------------------------------
  def save(self, step: int, state: PyTree, *,
           data_state: Optional[Mapping[str, Any]] = None,
           metrics: Optional[Mapping[str, float]] = None,
           force: bool = False) -> bool:
    """Saves `state` (+ JSON `data_state`) at `step` if due.

    Due means `step % save_every_steps == 0`, or `force=True`, or `metrics`
    given (an evaluated step is always saved so the best one can be kept).
    Never overwrites an existing step. Returns whether a save started.
    """
    step = int(step)
    if step in self._mgr.all_steps():
      return False
    if metrics is not None:
      metrics = {k: float(v) for k, v in metrics.items()}
      if self.best_metric not in metrics:
        raise ValueError(f"`metrics` must contain {self.best_metric!r} "
                         f"(the keep-best metric); got {sorted(metrics)}.")
      force = True
    # Always a dict: Orbax warns on every save without metrics when best_fn
    # is set, and `score` ranks `{}` last.
    metrics = dict(metrics or {})
    args = ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardSave(state),
        DATA_ITEM: ocp.args.JsonSave(dict(data_state or {})),
    })
    return self._mgr.save(step, args=args, metrics=metrics, force=force)

  def restore(self, template: PyTree, *, step: Optional[int] = None
              ) -> Optional[Restored]:
    """Restores `step` (default: the latest finalized one).

    Args:
      template: a train state with the right structure, shapes, dtypes and
        shardings (concrete arrays or `jax.ShapeDtypeStruct`s, e.g. the
        freshly initialized state or its `jax.eval_shape`).
      step: which step; default latest.

    Returns:
      `Restored(step, state, data_state, metrics)`, or `None` when the
      directory has no finalized checkpoint (fresh run).

    Raises:
      CheckpointError: the checkpoint's tree does not match `template`
        (message names each mismatching path and both shapes).
    """
    if step is None:
      step = self._mgr.latest_step()
      if step is None:
        return None
    elif step not in self._mgr.all_steps():
      raise CheckpointError(f"no finalized checkpoint for step {step} in "
                            f"{self.directory}; available: {self.all_steps()}.")
    abstract = _abstract(template)
    item_dir = os.path.join(self.directory, str(step), STATE_ITEM)
    check_tree_matches(abstract, _tree_metadata(item_dir),
                       what=f"checkpoint {item_dir}")
    out = self._mgr.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(abstract),
        DATA_ITEM: ocp.args.JsonRestore(),
    }))
    data_state = out[DATA_ITEM]
    return Restored(step=step, state=out[STATE_ITEM],
                    data_state=dict(data_state) if data_state else None,
                    metrics=self._mgr.metrics(step) or None)

  def wait_until_finished(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    """Waits for pending async saves and releases Orbax resources."""
    self._mgr.wait_until_finished()
    self._mgr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ---------------------------------------------------------------------------
# Teacher loading
# ---------------------------------------------------------------------------

def _is_pytree_dir(path: str) -> bool:
  return os.path.isdir(path) and (
      os.path.exists(os.path.join(path, "_METADATA"))
      or os.path.exists(os.path.join(path, "manifest.ocdbt")))


def _step_dirs(path: str) -> List[int]:
  return sorted(int(n) for n in os.listdir(path)
                if n.isdigit() and os.path.isdir(os.path.join(path, n)))


def _find_teacher_item(path: str, step: Optional[int]) -> str:
  """Resolves a run dir / step dir / pytree dir to the pytree item dir."""
  if _is_pytree_dir(path):
    return path
  steps = _step_dirs(path)
  if steps:  # a CheckpointManager root: tmp dirs are not digit-only names.
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise CheckpointError(f"teacher checkpoint {path!r} has no step {step}; "
                            f"finalized steps: {steps}.")
    path = os.path.join(path, str(step))
  elif not os.path.basename(path).isdigit():
    raise CheckpointError(
        f"{path!r} is not a readable teacher checkpoint: expected an Orbax "
        "pytree directory (with _METADATA / manifest.ocdbt), a step directory "
        f"containing one (e.g. '{STATE_ITEM}/'), or a CheckpointManager "
        "directory of numbered steps.")
  for item in (STATE_ITEM, "default", "teacher", "variables"):
    if _is_pytree_dir(os.path.join(path, item)):
      return os.path.join(path, item)
  subs = [n for n in sorted(os.listdir(path))
          if _is_pytree_dir(os.path.join(path, n))]
  if len(subs) == 1:
    return os.path.join(path, subs[0])
  raise CheckpointError(
      f"{path!r} is not a readable teacher checkpoint: expected an Orbax "
      "pytree directory (with _METADATA / manifest.ocdbt), a step directory "
      f"containing one (e.g. '{STATE_ITEM}/'), or a CheckpointManager "
      "directory of numbered steps.")


def load_teacher_variables(path: str, expected_variables: PyTree, *,
                           step: Optional[int] = None,
                           sharding: Optional[jax.sharding.Sharding] = None
                           ) -> PyTree:
  """Loads teacher `{'params', 'batch_stats'}` checked against the model.

  Args:
    path: a teacher-training run's checkpoint dir (latest or `step`), one of
      its step dirs, or a plain Orbax pytree dir of variables (e.g. written by
      `python -m kd_jax.models.convert`).
    expected_variables: the configured teacher's variables, concrete or
      abstract: `jax.eval_shape(model.init, rng, x, train=False)`. Its
      top-level collections (e.g. `params`, `batch_stats`) are what is read;
      other entries of a train-state checkpoint (optimizer, RNG) are skipped.
    step: step to read from a run dir (default latest).
    sharding: where to put the arrays: one `jax.sharding.Sharding` for all,
      or a pytree of shardings with the structure of `expected_variables`
      (e.g. `MeshParallel.teacher_shardings(...)`: every process then reads
      only the shards its devices hold, and no device or host ever holds
      the whole teacher). Default: the shardings carried by
      `expected_variables` (`jax.ShapeDtypeStruct(..., sharding=...)` or
      arrays), else the first device.

  Returns:
    Variables with the structure/dtypes of `expected_variables`.

  Raises:
    FileNotFoundError: `path` does not exist.
    CheckpointError: `path` is not an Orbax checkpoint, or its parameters'
      paths/shapes differ from `expected_variables` (raised from the
      metadata, before anything is read or compiled).
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"teacher checkpoint path {path!r} does not exist.")
  if not os.path.isdir(path):
    raise CheckpointError(f"teacher checkpoint {path!r} is a file; expected an "
                          "Orbax checkpoint directory.")
  item = _find_teacher_item(path, step)
  try:
    found = _tree_metadata(item)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"cannot read Orbax metadata of {item!r}: "
                          f"{type(e).__name__}: {e}") from e
  if not isinstance(found, Mapping):
    raise CheckpointError(
        f"cannot read Orbax metadata of {item!r}: expected a dict of variable "
        f"collections, got {type(found).__name__} (corrupt or not a pytree "
        "checkpoint).")
  abstract = _abstract(expected_variables)
  if not isinstance(abstract, Mapping):
    raise ValueError("`expected_variables` must be a dict of collections "
                     f"(e.g. {{'params': ...}}); got {type(abstract).__name__}.")
  collections = list(abstract.keys())
  # A teacher-training TrainState stores variables as its own fields.
  missing = [c for c in collections if c not in found]
  if missing:
    raise CheckpointError(
        f"teacher checkpoint {item!r} has no {missing} collection(s); it holds "
        f"{sorted(found)}.")
  check_tree_matches(abstract, {c: found[c] for c in collections},
                     what=f"teacher checkpoint {item!r}")
  target = restore_target(dict(abstract), sharding)
  try:
    restored = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"failed to read teacher checkpoint {item!r}: "
                          f"{type(e).__name__}: {e}") from e
  return {c: restored[c] for c in collections}


def save_variables(path: str, variables: PyTree) -> None:
  """Writes `variables` (e.g. `{'params', 'batch_stats'}`) as a plain Orbax
  pytree dir, the format `load_teacher_variables` reads (atomic: tmp dir +
  rename). Fails if `path` exists."""
  ck = ocp.StandardCheckpointer()
  ck.save(os.path.abspath(os.fspath(path)), variables)
  ck.wait_until_finished()
  ck.close()
