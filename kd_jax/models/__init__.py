"""The KD benchmark model zoo in Flax; every model returns (logits, features).

`create(name, *, num_classes, dtype)` builds a model; `from_torch_state_dict`
imports a PyTorch checkpoint of the reference definition (see `convert`).
"""

from kd_jax.models import mnist as _mnist
from kd_jax.models.convert import from_torch_state_dict
from kd_jax.models.registry import available_models
from kd_jax.models.registry import create
from kd_jax.models.registry import example_input
from kd_jax.models.registry import input_shape
from kd_jax.models.registry import register

register("mlp_teacher", _mnist.mlp_teacher, input_shape=(28, 28, 1))
register("mlp_student", _mnist.mlp_student, input_shape=(28, 28, 1))
register("cnn_teacher", _mnist.cnn_teacher, input_shape=(28, 28, 1))
