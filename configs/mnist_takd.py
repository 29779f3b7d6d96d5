"""TAKD on MNIST: CNN teacher -> mid-size MLP assistant -> small MLP, vs direct.

    TFDS_DATA_DIR=../shared/data/tfds python -m experiments.main \\
        --config=configs/mnist_takd.py --workdir=workdirs/mnist_takd

Teacher-assistant distillation (Mirzadeh et al., AAAI 2020) as a seed
experiment over the main job's MNIST recipe (`configs/mnist_seed.py`: its
top-level sections, batch 64, Adam 1e-3, 5 epochs, 0.7·CE + 0.3·KD at
T = 5 for every hop). Phases:

* `teacher_cnn`: the CNN teacher (2 conv + dense 512), 3 epochs, trained
  once and shared by the seeds -- the main job's `teacher_cnn`;
* `ta`: the assistant, the mid-size MLP 784-512-256-10 (dropout 0.5),
  distilled from the CNN teacher (precomputed teacher logits: exact, no
  augmentation);
* `student_takd`: the small MLP 784-128-10 distilled from the assistant;
* `student_direct`: the same small MLP distilled from the CNN teacher
  directly -- the main job's `distill_cnn`;
* `student`: the small MLP alone -- the main job's `student`.

`teacher_cnn`, `student` and `student_direct` are the main job's phase
configs, copied from `configs/mnist_seed.py` (same recipe, same seeds): on
one machine their rows are bit-identical to the main job's. The table gives
each student row's paired gain over the student alone (the assistant's
row: "n/a", another network) and, in `seed_experiment.comparisons`, TAKD
against direct distillation, paired by seed with 95% t-intervals (the
numbers: docs/experiments.md). Debug: `--config.debug=True`.
"""

import copy

import ml_collections

from configs import mnist_seed


def get_config():
  c = mnist_seed.get_config()
  main = c.seed_experiment.phases.to_dict()
  kd = copy.deepcopy(main["distill_cnn"]["loss"])
  se = ml_collections.ConfigDict()
  se.seeds = tuple(c.seed_experiment.seeds)
  se.phases = ml_collections.ConfigDict({
      "student": main["student"],
      "teacher_cnn": main["teacher_cnn"],
      "ta": {"mode": "distill", "model": {"name": "mlp_teacher"},
             "teacher": {"name": "cnn_teacher", "precompute": True},
             "loss": kd},
      "student_takd": {"mode": "distill", "model": {"name": "mlp_student"},
                       "teacher": {"name": "mlp_teacher"},
                       "loss": copy.deepcopy(kd)},
      "student_direct": main["distill_cnn"],
  })
  se.order = ("student", "teacher_cnn", "ta", "student_takd",
              "student_direct")
  se.student_phase = "student"
  se.distill_from = ml_collections.ConfigDict(
      {"ta": "teacher_cnn", "student_takd": "ta",
       "student_direct": "teacher_cnn"})
  se.shared_phases = ("teacher_cnn",)
  se.comparisons = (("student_takd", "student_direct"),)
  c.seed_experiment = se
  c.report.notes = ("TAKD (Mirzadeh et al., AAAI 2020) on MNIST: does the "
                    "assistant hop beat direct distillation from the CNN?")
  return c
