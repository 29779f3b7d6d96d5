"""The trainer: one run (train a network, or distill a student) from a config.

Layers: `kd_jax.train` (the engine: state, steps, objectives, parallel,
checkpoints) <- `kd_jax.distillers` (the methods) <- `kd_jax.trainer`:

* `config`: parse + validate an `ml_collections` config once into typed,
  frozen objects; the one config -> `Objective` function (`build_objective`);
* `feeds`: the datasets and the batches the compiled step receives;
* `programs`: optimizer, teacher, init / train / eval programs, dry run,
  distillers' pretrain stages, the program cache;
* `run`: the loop, checkpoints (resume with fallback), logging, the report.

    from kd_jax import trainer
    report = trainer.train_and_evaluate(config, workdir)
"""

from kd_jax.trainer.checkpointing import CheckpointRestoreError
from kd_jax.trainer.config import ConfigError
from kd_jax.trainer.config import RunConfig
from kd_jax.trainer.config import apply_debug
from kd_jax.trainer.config import build_objective
from kd_jax.trainer.config import parse
from kd_jax.trainer.programs import clear_program_cache
from kd_jax.trainer.optim import make_optimizer
from kd_jax.trainer.run import train_and_evaluate

__all__ = ["CheckpointRestoreError", "ConfigError", "RunConfig",
           "apply_debug", "build_objective", "parse", "clear_program_cache",
           "make_optimizer", "train_and_evaluate"]
