"""Single MNIST phases of the seed recipe (the main job runs them all: see
`configs/mnist_seed.py`).

    python -m experiments.main --config=configs/mnist.py:teacher --workdir=/tmp/mnist_t
    python -m experiments.main --config=configs/mnist.py:student --workdir=/tmp/mnist_s
    python -m experiments.main --config=configs/mnist.py:distill --workdir=/tmp/mnist_d \
        --config.teacher.checkpoint=/tmp/mnist_t

Phases (config string): `teacher` (MLP 784-512-256-10, dropout 0.5),
`cnn_teacher` (2 conv layers + dense 512), `student` (MLP 784-128-10 alone),
`distill` (student from the MLP teacher: 0.7 CE + 0.3 KD, T=5),
`distill_cnn` (same from the CNN teacher). Seed recipe: batch 64, Adam 1e-3,
5 epochs, no augmentation, inputs standardized with the MNIST mean/std.
Real MNIST is read from TFDS (`TFDS_DATA_DIR` or `--config.data.data_dir`).
"""

from configs import base

PHASES = ("teacher", "cnn_teacher", "student", "distill", "distill_cnn")


def mnist_recipe(c):
  c.data.name = "mnist"
  c.data.augment = False
  c.model.num_classes = 10
  c.teacher.num_classes = 10
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "constant"
  c.train.batch_size = 64
  c.train.eval_batch_size = 1000
  c.train.num_epochs = 5
  c.train.steps_per_call = 1024  # >= steps per epoch: one call per epoch
  c.train.log_every_steps = 300
  c.train.parallel = "none"
  c.checkpoint.every_epochs = 1
  c.checkpoint.keep = 1
  return c


def get_config(phase: str = "distill"):
  if phase not in PHASES:
    raise ValueError(f"unknown MNIST phase {phase!r}; choose one of {PHASES}.")
  c = mnist_recipe(base.base_config())
  if phase in ("teacher", "cnn_teacher"):
    c.mode = "train"
    c.model.name = "mlp_teacher" if phase == "teacher" else "cnn_teacher"
  elif phase == "student":
    c.mode = "train"
    c.model.name = "mlp_student"
  else:
    c.mode = "distill"
    c.model.name = "mlp_student"
    c.teacher.name = "mlp_teacher" if phase == "distill" else "cnn_teacher"
    c.loss.ce_weight = 0.7
    c.loss.terms = base.kd_terms(weight=0.3, temperature=5.0)
  return c
