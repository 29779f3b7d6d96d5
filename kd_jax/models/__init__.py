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
register("cnn_bn", _mnist.cnn_bn, input_shape=(28, 28, 1))
register("lenet5", _mnist.lenet5, input_shape=(32, 32, 1))
register("lenet5_half", _mnist.lenet5_half, input_shape=(32, 32, 1))
register("hinton_teacher", _mnist.hinton_teacher, input_shape=(28, 28, 1))
register("hinton_student", _mnist.hinton_student, input_shape=(28, 28, 1))
register("lopez_paz_mlp", _mnist.lopez_paz_mlp, input_shape=(28, 28, 1))
register("lopez_paz_mlp_7x7", _mnist.lopez_paz_mlp, input_shape=(7, 7, 1))
register("mlp_1200x2", _mnist.mlp_1200x2, input_shape=(28, 28, 1))
for _name, _fn in _mnist.PLAIN_MLPS.items():  # mlp_30x2, mlp_300x2, mlp_800x2
  register(_name, _fn, input_shape=(28, 28, 1))

# --- CIFAR / ImageNet CNN families (RepDistiller / mdistiller / torchvision) --
from kd_jax.models import resnet_cifar as _resnet_cifar  # noqa: E402
from kd_jax.models import resnet_imagenet as _resnet_imagenet  # noqa: E402
from kd_jax.models import vgg as _vgg  # noqa: E402
from kd_jax.models import wrn as _wrn  # noqa: E402

_CIFAR = (32, 32, 3)
_IMAGENET = (224, 224, 3)
for _family, _models, _shape in (
    (_resnet_cifar, _resnet_cifar.MODELS, _CIFAR),
    (_wrn, _wrn.MODELS, _CIFAR),
    (_vgg, _vgg.MODELS, _CIFAR),
    (_resnet_imagenet, _resnet_imagenet.CIFAR_MODELS, _CIFAR),
    (_resnet_imagenet, _resnet_imagenet.IMAGENET_MODELS, _IMAGENET),
):
  for _name, _fn in _models.items():
    register(_name, _fn, input_shape=_shape,
             torch_key_map=_family.torch_key_map)

# --- Mobile CNNs (RepDistiller / mdistiller) and ViTs (OFA-KD, timm) --------
from kd_jax.models import mobilenet as _mobilenet  # noqa: E402
from kd_jax.models import shufflenet as _shufflenet  # noqa: E402
from kd_jax.models import vit as _vit  # noqa: E402

for _family, _models, _shape in (
    (_mobilenet, _mobilenet.CIFAR_MODELS, _CIFAR),
    (_mobilenet, _mobilenet.IMAGENET_MODELS, _IMAGENET),
    (_shufflenet, _shufflenet.CIFAR_MODELS, _CIFAR),
    (_vit, _vit.CIFAR_MODELS, _CIFAR),
    (_vit, _vit.IMAGENET_MODELS, _IMAGENET),
):
  for _name, _fn in _models.items():
    register(_name, _fn, input_shape=_shape,
             torch_key_map=_family.torch_key_map)
