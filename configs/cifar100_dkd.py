"""CIFAR-100 DKD (Zhao et al., CVPR 2022) with the published recipe.

    python -m experiments.main --config=configs/cifar100_dkd.py:resnet32x4-resnet8x4 \\
        --workdir=workdirs/cifar100/dkd_resnet32x4-resnet8x4

Config string: `<teacher>-<student>` (`configs/recipes.CIFAR100_PAIRS`).
Recipe: as `cifar100_kd.py` (SGD 0.9, batch 64, 240 epochs, LR 0.05 / 0.01,
×0.1 at 150/180/210, wd 5e-4); loss 1.0·CE + min(epoch/20, 1)·DKD with
alpha 1, T 4 and beta per pair from mdistiller's
`configs/cifar100/dkd/*.yaml` (8 by default; 2 for the CIFAR ResNet pairs,
6 for WRN and VGG pairs). `report.paper.value` is the DKD paper's accuracy
(-1 for resnet110->resnet20, which the paper does not report).
"""

from configs import base
from configs import recipes


def get_config(pair: str = "resnet32x4-resnet8x4"):
  p = recipes.get_pair(pair)
  c = base.cifar100_recipe(base.base_config(), lr=p.lr)
  c.mode = "distill"
  c.model.name = p.student
  c.teacher.name = p.teacher
  c.teacher.checkpoint = recipes.teacher_workdir("cifar100", p.teacher)
  c.loss.ce_weight = 1.0
  c.loss.warmup_epochs = 20
  c.loss.terms = base.dkd_terms(alpha=1.0, beta=p.dkd_beta, temperature=4.0)
  c.report.paper.source = p.dkd_source
  c.report.paper.metric = recipes.CIFAR100_METRIC
  c.report.paper.value = p.dkd_acc if p.dkd_acc is not None else -1.0
  c.report.paper.teacher_value = p.teacher_acc
  c.report.paper.student_value = p.student_acc
  return c
