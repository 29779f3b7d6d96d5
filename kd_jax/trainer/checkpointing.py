"""A run's checkpoints: train state <-> Orbax tree, resume with fallback.

`restore_newest(mgr, template)` wraps `CheckpointManager.restore`: when the
newest finalized step cannot be restored (a truncated array file, a damaged
`_METADATA`, NaN / inf values of a diverged run, ...) it warns naming the
step and the cause and falls back to the next newest step that restores; it
deletes nothing. When no step restores, one `CheckpointRestoreError` names
the directory and every cause.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import logs
from kd_jax.train import checkpoints as ckpt_lib
from kd_jax.trainer.errors import KDError


class CheckpointRestoreError(KDError, RuntimeError):
  """No checkpoint of a run's checkpoint directory can be restored."""


def _check_finite(tree) -> None:
  """`CheckpointError` when a floating array of `tree` holds NaN / inf."""
  bad = [jax.tree_util.keystr(p) for p, x in
         jax.tree_util.tree_leaves_with_path(tree)
         if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
         and not bool(np.asarray(jnp.all(jnp.isfinite(x))))]
  if bad:
    raise ckpt_lib.CheckpointError(
        f"it holds NaN / inf values ({len(bad)} arrays, e.g. {bad[0]}): a "
        "diverged run")


def _cause(e: BaseException) -> str:
  msg = str(e).strip().splitlines()
  return f"{type(e).__name__}: {msg[0] if msg else ''}".rstrip(": ")


def _check_metadata(item_dir: str) -> None:
  """A damaged Orbax `_METADATA` (JSON) would otherwise read as an empty
  tree, i.e. as "does not match the configured model"."""
  path = os.path.join(item_dir, "_METADATA")
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      json.load(f)
  except (OSError, ValueError) as e:
    raise ckpt_lib.CheckpointError(
        f"its metadata file {path} is unreadable ({type(e).__name__}; "
        "truncated or damaged)") from None


def restore_newest(mgr: ckpt_lib.CheckpointManager, template: Any
                   ) -> Optional[ckpt_lib.Restored]:
  """The newest finalized step of `mgr` that restores into `template`.

  Returns None on a fresh run (no finalized step). A step that fails is
  reported with `logging.warning` (step, cause) and skipped; nothing is
  deleted. Raises `CheckpointRestoreError` (the directory and each step's
  cause) when steps exist but none restores.
  """
  failures = []
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      _check_metadata(os.path.join(mgr.directory, str(step),
                                   ckpt_lib.STATE_ITEM))
      # (An item's step-level `_CHECKPOINT_METADATA` is optional: no warning.)
      with logs.quiet_absl("Metadata file does not exist"):
        restored = mgr.restore(template, step=step)
      _check_finite(restored.state)
      return restored
    except Exception as e:  # pylint: disable=broad-except
      failures.append((step, _cause(e)))
      logging.warning("checkpoint step %d in %s cannot be restored (%s); "
                      "trying an older step.", step, mgr.directory,
                      failures[-1][1])
  if failures:
    causes = "; ".join(f"step {s}: {c}" for s, c in failures)
    raise CheckpointRestoreError(
        f"no checkpoint in {mgr.directory} can be restored ({causes}). Move "
        "the directory away to start the run afresh.")
  return None


def open_manager(ck_cfg, workdir: str, *, best: str = "accuracy",
                 higher: bool = True
                 ) -> Optional[ckpt_lib.CheckpointManager]:
  """The run's `CheckpointManager` (None when checkpoints are disabled);
  `best` / `higher`: the eval metric its kept-best checkpoint maximizes /
  minimizes."""
  if not ck_cfg.enabled:
    return None
  return ckpt_lib.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      save_every_steps=None, keep_last=int(ck_cfg.keep),
      keep_best=1 if ck_cfg.keep_best else 0, best_metric=best,
      best_mode="max" if higher else "min",
      async_save=bool(ck_cfg.async_save))
