"""The main job: the classic MNIST distillation experiment over several seeds.

    TFDS_DATA_DIR=../shared/data/tfds python -m experiments.main \\
        --config=configs/mnist_seed.py --workdir=workdirs/mnist_seed

For each seed: train the student alone; train the MLP teacher and distill
the student from it; distill the student from the CNN teacher. The seed
recipe (Hinton et al. style, as in the project's seed experiment): MLP
teacher 784-512-256-10 with dropout 0.5, MLP student 784-128-10, batch 64,
Adam 1e-3, T=5, loss 0.7·CE + 0.3·KD, 5 epochs each, inputs standardized
with the MNIST mean/std, no augmentation (`configs/mnist.py`'s recipe: the
top-level sections; each phase below says what it changes).

The CNN teacher (two 5x5 conv layers + dense 512, dropout 0.5; ~99%) is
trained once (first seed) and shared by all seeds, for 3 epochs (its
convolutions cost far more per example than the MLPs on a 2-core CPU, even
with kd_jax's fast pooling / convolution gradients, docs/performance.md;
`--config.seed_experiment.phases.teacher_cnn.train.num_epochs=N` changes
it); with its logits fixed (no augmentation, inference mode) the
distillation phases use teacher logits precomputed once over the training
set, which is exactly the same objective as running the teacher every step.

Five seeds (0-4). Prints and saves (`results.md`, `results.json`) the table:
one row per phase (last and best epoch test accuracy, mean ± std over
seeds), the paired gain of each distilled student over the student alone of
the same seed with its 95% t-interval, and wall time and examples/s per
phase. The seed sets the initialization, the dropout masks and the data
order of every phase. Results are bit-exact on one machine but vary across
CPUs and `XLA_FLAGS` (see the README).
Debug: `--config.debug=True` (mock data, 2 steps per phase, one seed).
"""

import ml_collections

from configs import base
from configs import mnist


def _kd():
  return {"ce_weight": 0.7, "terms": {"kd": {"weight": 0.3,
                                             "temperature": 5.0}}}


def get_config():
  c = mnist.mnist_recipe(base.base_config())
  c.mode = "seed_experiment"
  c.train.progress_bar = True
  c.checkpoint.every_epochs = 1
  c.checkpoint.keep = 1
  c.checkpoint.keep_best = False

  se = ml_collections.ConfigDict()
  se.seeds = (0, 1, 2, 3, 4)
  se.phases = ml_collections.ConfigDict({
      "student": {"mode": "train", "model": {"name": "mlp_student"}},
      "teacher_mlp": {"mode": "train", "model": {"name": "mlp_teacher"}},
      "distill_mlp": {"mode": "distill", "model": {"name": "mlp_student"},
                      "teacher": {"name": "mlp_teacher"}, "loss": _kd()},
      "teacher_cnn": {"mode": "train", "model": {"name": "cnn_teacher"},
                      "train": {"num_epochs": 3}},
      "distill_cnn": {"mode": "distill", "model": {"name": "mlp_student"},
                      "teacher": {"name": "cnn_teacher", "precompute": True},
                      "loss": _kd()},
  })
  se.order = ("student", "teacher_mlp", "distill_mlp", "teacher_cnn",
              "distill_cnn")
  se.student_phase = "student"
  se.distill_from = ml_collections.ConfigDict(
      {"distill_mlp": "teacher_mlp", "distill_cnn": "teacher_cnn"})
  se.shared_phases = ("teacher_cnn",)
  c.seed_experiment = se
  c.report.notes = ("Seed recipe: does distillation beat the student trained "
                    "alone? Reported honestly, whatever the sign.")
  return c
