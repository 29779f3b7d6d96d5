"""kd_jax: knowledge distillation for JAX/Flax.

    import kd_jax
    kd_jax.losses      # KD losses (pure functions on logits / features)
    kd_jax.distillers  # feature / relation methods, one file per paper
    kd_jax.models      # the model zoo (CIFAR / ImageNet / MNIST networks)
    kd_jax.train       # the engine: objectives, steps, state, parallelism
    kd_jax.data        # TFDS / grain pipelines and on-device augmentation

The trainer behind `python -m experiments.main` is `kd_jax.trainer`
(imported on demand: `from kd_jax import trainer`).
"""

__version__ = "0.1.0"

from kd_jax import data
from kd_jax import distillers
from kd_jax import losses
from kd_jax import models
from kd_jax import train

__all__ = ["data", "distillers", "losses", "models", "train"]
