"""CIFAR-100 OFA-KD (projector branches on stages 1-3 + OFA on the logits).

    python -m experiments.main --config=configs/cifar100_ofa.py:resnet32x4-resnet8x4 \\
        --workdir=workdirs/cifar100/ofa_resnet32x4-resnet8x4

Config string: `<teacher>-<student>` (`configs/recipes.CIFAR100_PAIRS`).
Recipe, weights and published numbers: `configs/feature_methods.py`; the
distiller: `kd_jax.distillers` (`docs/distillers.md`).
"""

from configs import feature_methods


def get_config(pair: str = "resnet32x4-resnet8x4"):
  return feature_methods.feature_config("ofa", pair)
