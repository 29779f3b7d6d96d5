"""ImageNet ResNet34 -> ResNet18 DKD (mdistiller `imagenet/r34_r18/dkd`).

    python -m experiments.main --config=configs/imagenet_dkd.py \\
        --workdir=workdirs/imagenet/dkd_r34_r18

Recipe as `imagenet_kd.py`; loss 1.0·CE + min(epoch/1, 1)·DKD with alpha 1,
beta 0.5, T 1 (mdistiller: `DKD.CE_WEIGHT 1, BETA 0.5, T 1, WARMUP 1`).
"""

from configs import base
from configs import imagenet_kd
from configs import recipes


def get_config(variant: str = "bs256"):
  c = imagenet_kd.imagenet_distill(variant)
  c.loss.ce_weight = 1.0
  c.loss.warmup_epochs = 1
  c.loss.terms = base.dkd_terms(alpha=1.0, beta=0.5, temperature=1.0)
  c.report.paper.source = "DKD paper (Zhao et al., CVPR 2022) / mdistiller README"
  c.report.paper.value = recipes.IMAGENET_R34_R18["dkd_acc"]
  return c
