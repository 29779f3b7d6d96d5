"""TAKD on MNIST: CNN teacher -> mid-size MLP assistant -> small MLP, vs direct.

    TFDS_DATA_DIR=../shared/data/tfds python -m experiments.main \\
        --config=configs/mnist_takd.py --workdir=workdirs/mnist_takd
    python -m experiments.paired_gains --workdir=workdirs/mnist_takd \\
        --a=student_takd --b=student_direct

Teacher-assistant distillation (Mirzadeh et al., AAAI 2020) as a seed
experiment over the project's MNIST seed recipe (`configs/mnist_seed.py`:
batch 64, Adam 1e-3, 5 epochs, 0.7·CE + 0.3·KD at T = 5 for every hop):

* `teacher_cnn`: the CNN teacher (2 conv + dense 512), trained once
  (`cnn_teacher_epochs`, 3) and shared by the seeds;
* `ta`: the assistant, the mid-size MLP 784-512-256-10 (dropout 0.5),
  distilled from the CNN teacher (precomputed teacher logits: exact, no
  augmentation);
* `student_takd`: the small MLP 784-128-10 distilled from the assistant;
* `student_direct`: the same small MLP distilled from the CNN teacher
  directly (the main job's `distill_cnn`);
* `student`: the small MLP alone.

The seed experiment's table gives every distilled phase against the student
alone (the `ta` row compares a different network with it: read it as the
assistant's accuracy only); the TAKD-vs-direct comparison, paired by seed
with its 95% t-interval, is `experiments.paired_gains` (the numbers and the
command: docs/experiments.md). Debug: `--config.debug=True`.
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
  phases.teacher_cnn = mnist.get_config("cnn_teacher")
  phases.teacher_cnn.train.num_epochs = se.get_ref("cnn_teacher_epochs")
  phases.ta = mnist.get_config("distill_cnn")
  phases.ta.model.name = "mlp_teacher"
  phases.ta.teacher.precompute_logits = True
  phases.student_takd = mnist.get_config("distill")  # teacher: the TA's MLP
  phases.student_direct = mnist.get_config("distill_cnn")
  phases.student_direct.teacher.precompute_logits = True
  se.phases = phases
  se.order = ("student", "teacher_cnn", "ta", "student_takd",
              "student_direct")
  se.student_phase = "student"
  se.distill_from = ml_collections.ConfigDict(
      {"ta": "teacher_cnn", "student_takd": "ta",
       "student_direct": "teacher_cnn"})
  se.shared_phases = ("teacher_cnn",)
  # What the report should add (notes/selfkd.md): paired gains between
  # two phases of the same network, not only against `student_phase`.
  se.comparisons = (("student_takd", "student_direct"),)
  c.seed_experiment = se
  c.report.notes = ("TAKD (Mirzadeh et al., AAAI 2020) on MNIST: does the "
                    "assistant hop beat direct distillation from the CNN?")
  return c
