"""The KD benchmark model zoo in Flax; every model returns (logits, features)."""

from kd_jax.models import mnist as _mnist
from kd_jax.models.registry import available_models
from kd_jax.models.registry import create
from kd_jax.models.registry import register

register("mlp_teacher", _mnist.mlp_teacher)
register("mlp_student", _mnist.mlp_student)
register("cnn_teacher", _mnist.cnn_teacher)
