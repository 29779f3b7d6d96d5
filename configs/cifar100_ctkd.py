"""CIFAR-100 CTKD (Li et al., AAAI 2023): KD with a curriculum temperature.

    python -m experiments.main --config=configs/cifar100_ctkd.py:resnet56-resnet20 \\
        --workdir=workdirs/cifar100/ctkd_resnet56-resnet20

Config string: `<teacher>-<student>` (`configs/recipes.CIFAR100_PAIRS`).
Recipe of zhengli97/CTKD `scripts/run_cifar_distill.sh`: RepDistiller's
CIFAR-100 schedule (SGD 0.9, batch 64, 240 epochs, LR 0.05 ×0.1 at
150/180/210, weight decay 5e-4), `-r 0.1 -a 0.9 -b 0`: loss
`0.1·CE + 0.9·KD(T)` with the global learnable temperature
`T = 1 + 20·sigmoid(theta)` (`--t_start 1 --t_end 20`) trained through a
gradient reversal whose strength follows the cosine schedule from 0 to -1
over the first 10 epochs (`--decay_max 0 --decay_min -1 --decay_loops 10`);
`kd_jax.distillers.ctkd`. No warm-up.

Published top-1 (CTKD README; the resnet32x4 / vgg13 pairs from the
logit-standardization-KD README's CTKD row): resnet56->resnet20 71.19,
resnet110->resnet32 73.52, resnet110->resnet20 70.99, wrn_40_2->wrn_16_2
75.45, wrn_40_2->wrn_40_1 73.93, vgg13->vgg8 73.52, resnet32x4->resnet8x4
73.39, resnet32x4->shufflenetv2 75.37, resnet50->mobilenetv2 68.67.
"""

import ml_collections

from configs import feature_methods

PUBLISHED = {
    "resnet56-resnet20": 71.19, "resnet110-resnet32": 73.52,
    "resnet110-resnet20": 70.99, "wrn_40_2-wrn_16_2": 75.45,
    "wrn_40_2-wrn_40_1": 73.93, "vgg13-vgg8": 73.52,
    "resnet32x4-resnet8x4": 73.39, "resnet32x4-shufflenetv2": 75.37,
    "resnet50_cifar-mobilenetv2": 68.67,
}


def get_config(pair: str = "resnet56-resnet20"):
  c = feature_methods.distill_base(pair)
  c.loss.ce_weight = 0.1
  c.loss.terms = ml_collections.ConfigDict({"ctkd": {
      "distiller": "ctkd", "weight": 0.9, "warmup": False, "t_start": 1.0,
      "t_end": 20.0, "decay_max": 0.0, "decay_min": -1.0,
      "decay_loops": 10.0}})
  c.report.paper.source = ("CTKD (Li et al., AAAI 2023), zhengli97/CTKD "
                           "README and scripts/run_cifar_distill.sh")
  c.report.paper.value = PUBLISHED.get(pair, -1.0)
  return c
