"""CIFAR-100 VID (variational information distillation on stages[1:], weight 1).

    python -m experiments.main --config=configs/cifar100_vid.py:resnet32x4-resnet8x4 \\
        --workdir=workdirs/cifar100/vid_resnet32x4-resnet8x4

Config string: `<teacher>-<student>` (`configs/recipes.CIFAR100_PAIRS`).
Recipe, weights and published numbers: `configs/feature_methods.py`; the
distiller: `kd_jax.distillers` (`docs/distillers.md`).
"""

from configs import feature_methods


def get_config(pair: str = "resnet32x4-resnet8x4"):
  return feature_methods.feature_config("vid", pair)
