"""DAFL on MNIST: data-free distillation of LeNet-5-half from LeNet-5.

Chen et al., "Data-Free Learning of Student Networks", ICCV 2019, Table 1
(LeNet-5 columns: teacher 98.91, standard back-propagation of the student
98.65, DAFL 98.20); the authors' code: github.com/huawei-noah/
Efficient-Computing, `Data-Efficient-Model-Compression/DAFL/`
(`teacher-train.py`, `DAFL-train.py`, `lenet.py`).

    TFDS_DATA_DIR=../shared/data/tfds python -m experiments.main \\
        --config=configs/dafl_mnist.py --workdir=workdirs/dafl_mnist

Phases (per seed; the teacher is trained once, shared):
* `teacher`: LeNet-5 on MNIST resized to 32x32 (`data.views.student =
  resize 32`, torchvision's `Resize((32, 32))`), normalized with (0.1307,
  0.3081), Adam 1e-3, batch 256, 9 epochs (`teacher-train.py`);
* `student`: LeNet-5-half trained alone on the real images (the paper's
  "standard back-propagation" row; the code has no script for it: the
  teacher's recipe, our choice);
* `dafl`: task 'dafl' (`kd_jax.trainer.data_free`): the authors' generator
  and LeNet-5-half from the frozen teacher, no training image read; batch
  512, 120 iterations per epoch, 200 epochs, Adam 0.2 (generator) / 2e-3
  (student), weights one-hot 1, information entropy 5 (log10), activation
  0.1, KD at T = 1; the student evaluated on the real 32x32 test set every
  epoch (the authors keep the best: `best_top1`); `generated.png` in the
  run's workdir: 40 generated images.

The full protocol is 24,000 generator steps at batch 512 (~76 CPU-hours
on a 2-core CPU): argument `reduced` = DAFL batch 64, 3 epochs of 120
iterations (360 steps: 0.2% of the paper's generated images), the
student alone 2 epochs, the teacher as published (9 epochs), 3 seeds
(what a shared CPU affords; see docs/reproductions.md). `debug` = debug
mode (mock data, 2 steps per phase).
"""

import ml_collections

from configs import base

VARIANTS = ("full", "reduced", "debug")


def get_config(variant: str = "full"):
  if variant not in VARIANTS:
    raise ValueError(f"configs/dafl_mnist.py: the argument is one of "
                     f"{VARIANTS}; got {variant!r}.")
  c = base.base_config()
  c.mode = "seed_experiment"
  c.debug = variant == "debug"
  c.data.name = "mnist"
  c.data.augment = False
  c.data.views.student = {"name": "resize", "size": 32}
  c.model.name = "lenet5_half"
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "constant"
  c.train.batch_size = 256
  c.train.eval_batch_size = 1000
  c.train.num_epochs = 9
  c.train.steps_per_call = 20
  c.train.log_every_steps = 20
  c.checkpoint.keep = 1
  c.checkpoint.keep_best = False

  dafl = {
      "task": "dafl", "mode": "distill", "model": {"name": "lenet5_half"},
      "teacher": {"name": "lenet5"},
      "optimizer": {"name": "adam", "learning_rate": 2e-3},
      "train": {"batch_size": 512, "num_epochs": 200, "steps_per_call": 10,
                "log_every_steps": 10},
      "dafl": {"latent_dim": 100, "img_size": 32, "channels": 1,
               "one_hot_weight": 1.0, "entropy_weight": 5.0,
               "activation_weight": 0.1, "entropy_log_base": 10.0,
               "kd_temperature": 1.0, "feature_key": "pooled",
               "iters_per_epoch": 120, "generator_optimizer": "adam",
               "generator_learning_rate": 0.2},
  }
  se = ml_collections.ConfigDict()
  se.seeds = (0, 1, 2)
  se.phases = ml_collections.ConfigDict({
      "teacher": {"mode": "train", "model": {"name": "lenet5"}},
      "student": {"mode": "train", "model": {"name": "lenet5_half"}},
      "dafl": dafl,
  })
  se.order = ("teacher", "student", "dafl")
  se.student_phase = "student"
  se.distill_from = ml_collections.ConfigDict({"dafl": "teacher"})
  se.shared_phases = ("teacher",)
  if variant == "reduced":
    se.phases.student.train = {"num_epochs": 2}
    se.phases.dafl.train.batch_size = 64
    se.phases.dafl.train.num_epochs = 3
  c.seed_experiment = se
  c.report.paper = {
      "source": "Chen et al., ICCV 2019, Table 1 (MNIST, LeNet-5)",
      "metric": "top-1 % on the MNIST test set",
      "teacher_top1": 98.91, "student_top1": 98.65, "dafl_top1": 98.20}
  c.report.notes = f"variant {variant}"
  return c
