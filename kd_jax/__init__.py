"""kd_jax: knowledge distillation for JAX/Flax."""

__version__ = "0.1.0"

from kd_jax import losses  # noqa: F401
