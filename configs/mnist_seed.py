"""The main job: the classic MNIST distillation experiment over several seeds.

    TFDS_DATA_DIR=../shared/data/tfds python -m experiments.main \\
        --config=configs/mnist_seed.py --workdir=workdirs/mnist_seed

For each seed: train the student alone; train the MLP teacher and distill
the student from it; distill the student from the CNN teacher. The seed
recipe (Hinton et al. style, as in the project's seed experiment): MLP
teacher 784-512-256-10 with dropout 0.5, MLP student 784-128-10, batch 64,
Adam 1e-3, T=5, loss 0.7·CE + 0.3·KD, 5 epochs each, inputs standardized
with the MNIST mean/std, no augmentation.

The CNN teacher (two 5x5 conv layers + dense 512, dropout 0.5; ~99%) is
trained once (first seed) and shared by all seeds, for `cnn_teacher_epochs`
epochs (3 by default: its convolutions cost far more per example than the
MLPs on a 2-core CPU, even with kd_jax's fast pooling / convolution gradients,
docs/performance.md); with its logits fixed (no
augmentation, inference mode) the distillation phases use teacher logits
precomputed once over the training set, which is exactly the same objective
as running the teacher every step.

Five seeds (0-4). Prints and saves (`results.md`, `results.json`) the table:
teacher, student alone and distilled student accuracy (last and best epoch,
mean ± std over seeds), the paired gain (distilled minus student alone of the
same seed) with its 95% t-interval, and wall time and examples/s per phase.
The seed sets the initialization, the dropout masks and the data order of
every phase. Results are bit-exact on one machine but vary across CPUs and
`XLA_FLAGS` (see the README).
Debug: `--config.debug=True` (mock data, 2 steps per phase, one seed).
"""

import ml_collections

from configs import base
from configs import mnist


def get_config():
  c = base.base_config()
  c.mode = "seed_experiment"
  c.data.name = "mnist"
  c.data.augment = False
  c.train.parallel = "none"
  c.train.progress_bar = True
  c.checkpoint.every_epochs = 1
  c.checkpoint.keep = 1
  c.checkpoint.keep_best = False

  se = ml_collections.ConfigDict()
  se.seeds = (0, 1, 2, 3, 4)
  se.cnn_teacher_epochs = 3
  phases = ml_collections.ConfigDict()
  phases.student = mnist.get_config("student")
  phases.teacher_mlp = mnist.get_config("teacher")
  phases.distill_mlp = mnist.get_config("distill")
  phases.teacher_cnn = mnist.get_config("cnn_teacher")
  phases.teacher_cnn.train.num_epochs = se.get_ref("cnn_teacher_epochs")
  phases.distill_cnn = mnist.get_config("distill_cnn")
  phases.distill_cnn.teacher.precompute = True
  se.phases = phases
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
