"""ImageNet supervised training of the teacher (resnet34) or the student alone
(resnet18) with torchvision's classic recipe.

    python -m experiments.main --config=configs/imagenet_teacher.py:resnet34 \\
        --workdir=workdirs/imagenet2012/teacher_resnet34

Recipe (torchvision reference, the one the published 73.31 / 69.76 weights
come from): SGD momentum 0.9, batch 256, LR 0.1 ×0.1 every 30 epochs, 90
epochs, weight decay 1e-4. Most users convert torchvision's weights instead
(`python -m kd_jax.models.convert --arch resnet34 ...`).
"""

from configs import base
from configs import recipes

MODELS = {"resnet34": "teacher_acc", "resnet18": "student_acc"}


def get_config(model: str = "resnet34"):
  if model not in MODELS:
    raise ValueError(f"unknown model {model!r}; choose one of {tuple(MODELS)}.")
  c = base.imagenet_recipe(base.base_config(), lr=0.1, batch_size=256,
                           num_epochs=90, decay_epochs=(30, 60))
  c.mode = "train"
  c.model.name = model
  c.report.paper.source = "torchvision reference weights"
  c.report.paper.metric = recipes.IMAGENET_METRIC
  c.report.paper.value = recipes.IMAGENET_R34_R18[MODELS[model]]
  return c
