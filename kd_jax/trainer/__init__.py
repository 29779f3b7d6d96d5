"""The trainer: one run (train a network, or distill a student) from a config.

Layers: `kd_jax.train` (the engine: state, steps, objectives, placement,
checkpoints) <- `kd_jax.distillers` (the methods) <- `kd_jax.trainer`:

* `config` (+ `classify_config`, `lm_config`): the one schema, parsed and
  validated once into typed, frozen objects; `terms`: loss terms -> the
  run's `Objective` (the one config -> objective path);
* `loop`: the one loop (resume, records, evaluation, checkpoints, timers,
  progress, report, several processes) and the `Task` protocol it drives;
* the tasks: `classify` (images: `feeds`, `programs`), `lm` (language
  models: `lm_data`) and `dafl` (`data_free`: a generator trained beside
  the student, no training data), `deepinversion` (`inversion`: images
  synthesized from a teacher's BatchNorm statistics); `teachers` (restoring them), `placement` (config ->
  the engine's mesh / pmap placement), `checkpointing` (resume with
  fallback), `reporting` (timers, progress, train records), `ensemble`
  (the test-set ensemble of finished runs: Born-Again generations).

    from kd_jax import trainer
    report = trainer.train_and_evaluate(config, workdir)
"""

from typing import Any, Dict

import ml_collections

from kd_jax.trainer import classify  # noqa: F401  (registers 'classify')
from kd_jax.trainer import classify_config  # noqa: F401
from kd_jax.trainer import data_free  # noqa: F401  (registers 'dafl')
from kd_jax.trainer import inversion  # noqa: F401  (registers 'deepinversion')
from kd_jax.trainer import lm  # noqa: F401  (registers 'lm')
from kd_jax.trainer import lm_config  # noqa: F401
from kd_jax.trainer import loop
from kd_jax.trainer import reporting
from kd_jax.trainer import workdir as workdir_lib
from kd_jax.trainer.checkpointing import CheckpointRestoreError
from kd_jax.trainer.config import RunConfig
from kd_jax.trainer.config import apply_debug
from kd_jax.trainer.config import build_objective
from kd_jax.trainer.config import parse
from kd_jax.trainer.ensemble import evaluate_ensemble
from kd_jax.trainer.errors import ConfigError
from kd_jax.trainer.errors import KDError
from kd_jax.trainer.errors import NonFiniteError
from kd_jax.trainer.errors import Preempted
from kd_jax.trainer.errors import StorageError
from kd_jax.trainer.errors import WorkdirLocked
from kd_jax.trainer.programs import clear_program_cache


def make_task(rc: RunConfig, workdir: str, *, dry_run: bool = False):
  """The `loop.Task` of a parsed config (``rc.task``)."""
  return loop.TASKS[rc.task](rc, workdir, dry_run=dry_run)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       dry_run: bool = False) -> Dict[str, Any]:
  """Runs one train / distill phase; returns (and writes) its report.

  Resumes from `<workdir>/checkpoints` when it holds a finalized checkpoint.

  `dry_run=True` (image tasks) does everything up to the first step --
  validation, data loading, model/teacher/optimizer construction, building
  the step, eval and init programs -- and then traces them with
  `jax.eval_shape` on a real batch instead of compiling and running them:
  a cheap check that a config is consistent end to end. Returns
  `{'dry_run': True, 'metrics': {name: shape}, ...}` and writes nothing but
  `config.json`.
  """
  clock = reporting.Clock()
  rc = parse(apply_debug(config))
  main = loop.is_main()
  with workdir_lib.locked(workdir, main=main):
    workdir_lib.prepare(workdir, rc.config_json, main=main)
    task = make_task(rc, workdir, dry_run=dry_run)
    try:
      clock.tick("data_loaded")
      if dry_run:
        out = task.dry_run_report()
        clock.tick("traced")
        out["timings"] = clock.timings
        return out
      return loop.run(task, workdir, clock)
    finally:
      task.close()


__all__ = ["CheckpointRestoreError", "ConfigError", "KDError",
           "NonFiniteError", "Preempted", "RunConfig", "StorageError",
           "WorkdirLocked",
           "apply_debug", "build_objective", "clear_program_cache",
           "evaluate_ensemble", "make_task", "parse", "train_and_evaluate"]
