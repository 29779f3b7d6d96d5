"""CIFAR-100 teacher training (RepDistiller `train_teacher.py` recipe).

    python -m experiments.main --config=configs/cifar100_teacher.py:resnet56 \\
        --workdir=workdirs/cifar100/teacher_resnet56

Config string: a teacher of `configs/recipes.CIFAR100_PAIRS` (resnet56,
resnet110, resnet32x4, wrn_40_2, vgg13, resnet50_cifar). Recipe: SGD
momentum 0.9, batch 64, 240 epochs, LR 0.05 ×0.1 at 150/180/210, weight decay
5e-4, random crop + flip. `report.paper.value`: the teacher accuracy the
distillation tables were produced with (CRD paper). The distill configs load
`workdirs/cifar100/teacher_<name>` by default.
"""

from configs import base
from configs import recipes


def get_config(model: str = "resnet56"):
  if model not in recipes.CIFAR100_TEACHERS:
    raise ValueError(f"unknown CIFAR-100 teacher {model!r}; choose one of "
                     f"{', '.join(recipes.CIFAR100_TEACHERS)}.")
  c = base.cifar100_recipe(base.base_config(), lr=0.05)
  c.mode = "train"
  c.model.name = model
  c.report.paper.source = "CRD paper (Tian et al., ICLR 2020) teachers"
  c.report.paper.metric = recipes.CIFAR100_METRIC
  c.report.paper.value = recipes.CIFAR100_TEACHERS[model]
  return c
