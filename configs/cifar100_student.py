"""CIFAR-100 student trained alone (the "student" baseline row of the tables).

    python -m experiments.main --config=configs/cifar100_student.py:resnet8x4 \\
        --workdir=workdirs/cifar100/student_resnet8x4

Config string: a student of `configs/recipes.CIFAR100_PAIRS`. Same recipe as
the teachers, LR 0.01 for mobilenetv2 / shufflenetv2 (RepDistiller).
"""

from configs import base
from configs import recipes


def get_config(model: str = "resnet8x4"):
  if model not in recipes.CIFAR100_STUDENTS:
    raise ValueError(f"unknown CIFAR-100 student {model!r}; choose one of "
                     f"{', '.join(recipes.CIFAR100_STUDENTS)}.")
  c = base.cifar100_recipe(base.base_config(),
                           lr=recipes.lr_for_student(model))
  c.mode = "train"
  c.model.name = model
  c.report.paper.source = "CRD paper (Tian et al., ICLR 2020) students"
  c.report.paper.metric = recipes.CIFAR100_METRIC
  c.report.paper.value = recipes.CIFAR100_STUDENTS[model]
  return c
