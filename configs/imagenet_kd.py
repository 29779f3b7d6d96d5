"""ImageNet ResNet34 -> ResNet18 Hinton KD (mdistiller `imagenet/r34_r18/kd`).

    python -m experiments.main --config=configs/imagenet_kd.py \\
        --workdir=workdirs/imagenet/kd_r34_r18 \\
        --config.teacher.checkpoint=<converted torchvision resnet34>

Recipe: SGD momentum 0.9, 100 epochs, batch 256 with LR 0.1 (config string
`bs512`: batch 512 with LR 0.2, as mdistiller's yaml), ×0.1 at 30/60/90,
weight decay 1e-4; loss 0.5·CE + 0.5·KD with T=1. The teacher is
torchvision's ResNet34 converted with `python -m kd_jax.models.convert`.
"""

from configs import base
from configs import recipes


def imagenet_distill(variant: str):
  if variant not in ("", "bs256", "bs512"):
    raise ValueError(f"unknown variant {variant!r}; use 'bs256' or 'bs512'.")
  bs, lr = (512, 0.2) if variant == "bs512" else (256, 0.1)
  r = recipes.IMAGENET_R34_R18
  c = base.imagenet_recipe(base.base_config(), lr=lr, batch_size=bs)
  c.mode = "distill"
  c.model.name = r["student"]
  c.teacher.name = r["teacher"]
  c.teacher.checkpoint = recipes.teacher_workdir("imagenet2012", r["teacher"])
  c.report.paper.metric = recipes.IMAGENET_METRIC
  c.report.paper.teacher_value = r["teacher_acc"]
  c.report.paper.student_value = r["student_acc"]
  return c


def get_config(variant: str = "bs256"):
  c = imagenet_distill(variant)
  c.loss.ce_weight = 0.5
  c.loss.terms = base.kd_terms(weight=0.5, temperature=1.0)
  c.report.paper.source = ("DKD paper (Zhao et al., CVPR 2022) / CRD paper KD "
                           "row; mdistiller's own KD rerun reports 71.03")
  c.report.paper.value = recipes.IMAGENET_R34_R18["kd_acc"]
  return c
