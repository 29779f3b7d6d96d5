"""CIFAR-100 AT (attention transfer on stages[1:], p=2, weight 1000).

    python -m experiments.main --config=configs/cifar100_at.py:resnet32x4-resnet8x4 \\
        --workdir=workdirs/cifar100/at_resnet32x4-resnet8x4

Config string: `<teacher>-<student>` (`configs/recipes.CIFAR100_PAIRS`).
Recipe, weights and published numbers: `configs/feature_methods.py`; the
distiller: `kd_jax.distillers` (`docs/distillers.md`).
"""

from configs import feature_methods


def get_config(pair: str = "resnet32x4-resnet8x4"):
  return feature_methods.feature_config("at", pair)
