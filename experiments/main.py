r"""Entry point: train a teacher, a student alone, distill, or a seed experiment.

    python -m experiments.main --config=configs/<name>.py[:<arg>] \
        --workdir=<dir> [--config.<key>=<value> ...]

The config's `mode` selects what runs (`configs/base.py` documents every
key): `'train'` (supervised: a teacher or a student alone), `'distill'`
(a student from a frozen teacher, `teacher.checkpoint` = a teacher run's
workdir or a converted checkpoint) or `'seed_experiment'` (several phases
over several seeds, `configs/mnist_seed.py`). Examples::

    TFDS_DATA_DIR=../shared/data/tfds python -m experiments.main \
        --config=configs/mnist_seed.py --workdir=workdirs/mnist_seed
    python -m experiments.main --config=configs/cifar100_teacher.py:resnet56 \
        --workdir=workdirs/cifar100/resnet56
    python -m experiments.main \
        --config=configs/cifar100_dkd.py:resnet56-resnet20 \
        --workdir=workdirs/cifar100/dkd_resnet56-resnet20 \
        --config.teacher.checkpoint=workdirs/cifar100/resnet56
    python -m experiments.main --config=configs/cifar100_kd.py --config.debug=True \
        --workdir=/tmp/smoke

Rerunning a command with the same `--workdir` resumes from the latest
checkpoint. Outputs in the workdir: `config.json`, `metrics.jsonl`,
TensorBoard events (`tensorboard/`), `curves.png`, `report.json`,
`checkpoints/`; a seed experiment adds `results.md` / `results.json`.
"""

import sys

from kd_jax import xla_flags  # before JAX starts a backend: see its doc
xla_flags.use_fast_cpu_flags()

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics, "
                    "plots, report); reusing it resumes the run.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() "
                  "first (multi-host runs; coordinator from the environment).")
config_flags.DEFINE_config_file(
    "config", None, "Config file: configs/<name>.py or configs/<name>.py:<arg>.",
    lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def _summary(report) -> str:
  keys = ("mode", "model", "teacher", "steps", "epochs", "last_top1",
          "best_top1", "best_epoch", "teacher_top1", "wall_s",
          "examples_per_sec", "steady_examples_per_sec")
  parts = []
  for k in keys:
    v = report.get(k)
    if v is None:
      continue
    if isinstance(v, float):
      v = f"{v:.4f}" if k.endswith("top1") else f"{v:,.1f}"
    parts.append(f"{k}={v}")
  return " ".join(parts)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.distributed:
    jax.distributed.initialize()
  from kd_jax.train import loop  # pylint: disable=g-import-not-at-top
  from experiments import seed_experiment  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  try:
    if config.mode == "seed_experiment":
      seed_experiment.run(config, FLAGS.workdir)
    else:
      report = loop.train_and_evaluate(config, FLAGS.workdir)
      print(_summary(report), flush=True)
  except loop.ConfigError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
