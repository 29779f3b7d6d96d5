"""CIFAR-100 KD + DOT (Zhao et al., ICCV 2023): KD with the distillation-oriented trainer.

    python -m experiments.main --config=configs/cifar100_dot.py:resnet32x4-resnet8x4 \\
        --workdir=workdirs/cifar100/dot_resnet32x4-resnet8x4

Config string: `<teacher>-<student>` (`configs/recipes.CIFAR100_PAIRS`).
Recipe of mdistiller `configs/cifar100/dot/*.yaml`: the KD loss of
`cifar100_kd.py` (0.1·CE + 0.9·KD, T = 4), batch 64, 240 epochs, LR 0.05
(0.01 for ShuffleNetV2) ×0.1 at 150/180/210, weight decay 5e-4, and the DOT
optimizer (`optimizer.name = 'dot'`, `kd_jax.distillers.dot.dot`):
momentum 0.9 - 0.075 for the task (CE) gradient and 0.9 + 0.075 for the KD
gradient (`optimizer.delta`, mdistiller `SOLVER.DOT.DELTA`). The trainer
builds the step with `split_gradients=True`.

Published top-1 (mdistiller README, KD+DOT): resnet32x4->resnet8x4 75.12,
vgg13->vgg8 73.77, resnet32x4->shufflenetv2 75.55 (KD alone: 73.33, 72.98,
74.45).
"""

from configs import cifar100_kd

PUBLISHED = {"resnet32x4-resnet8x4": 75.12, "vgg13-vgg8": 73.77,
             "resnet32x4-shufflenetv2": 75.55}


def get_config(pair: str = "resnet32x4-resnet8x4"):
  c = cifar100_kd.get_config(pair)
  c.optimizer.name = "dot"
  c.optimizer.delta = 0.075
  c.report.paper.source = ("DOT (Zhao et al., ICCV 2023), mdistiller "
                           "README and configs/cifar100/dot")
  c.report.paper.value = PUBLISHED.get(pair, -1.0)
  return c
