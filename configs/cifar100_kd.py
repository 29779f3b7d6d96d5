"""CIFAR-100 Hinton KD with the published recipe (mdistiller / RepDistiller).

    python -m experiments.main --config=configs/cifar100_kd.py:resnet32x4-resnet8x4 \\
        --workdir=workdirs/cifar100/kd_resnet32x4-resnet8x4 \\
        [--config.teacher.checkpoint=<teacher run workdir or converted ckpt>]

Config string: `<teacher>-<student>`, one of `configs/recipes.CIFAR100_PAIRS`.
Recipe: SGD momentum 0.9, batch 64, 240 epochs, LR 0.05 (0.01 for
MobileNetV2 / ShuffleNetV2 students) ×0.1 at epochs 150/180/210, weight decay
5e-4; loss 0.1·CE + 0.9·KD with T=4 (mdistiller `CFG.KD`). The teacher is
loaded from `teacher.checkpoint` (default: the workdir
`configs/cifar100_teacher.py:<teacher>` writes with the README's command).
`report.paper.value` is the published KD accuracy of the pair.
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
  c.loss.ce_weight = 0.1
  c.loss.terms = base.kd_terms(weight=0.9, temperature=4.0)
  c.report.paper.source = p.kd_source
  c.report.paper.metric = recipes.CIFAR100_METRIC
  c.report.paper.value = p.kd_acc
  c.report.paper.teacher_value = p.teacher_acc
  c.report.paper.student_value = p.student_acc
  return c
