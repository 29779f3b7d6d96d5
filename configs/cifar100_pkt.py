"""CIFAR-100 PKT (probabilistic knowledge transfer on the pooled feature, weight 30000).

    python -m experiments.main --config=configs/cifar100_pkt.py:resnet32x4-resnet8x4 \\
        --workdir=workdirs/cifar100/pkt_resnet32x4-resnet8x4

Config string: `<teacher>-<student>` (`configs/recipes.CIFAR100_PAIRS`).
Recipe, weights and published numbers: `configs/feature_methods.py`; the
distiller: `kd_jax.distillers` (`docs/distillers.md`).
"""

from configs import feature_methods


def get_config(pair: str = "resnet32x4-resnet8x4"):
  return feature_methods.feature_config("pkt", pair)
