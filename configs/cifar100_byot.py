"""CIFAR-100 BYOT, "Be Your Own Teacher" (Zhang et al., ICCV 2019).

    python -m experiments.main --config=configs/cifar100_byot.py:resnet18_cifar \\
        --workdir=workdirs/cifar100/byot_resnet18_cifar

Runs once the trainer accepts teacher-free distiller terms in mode 'train'
and evaluates every exit (`notes/selfkd.md`, "trainer wiring"); until then
the config documents the recipe and its terms build
(`tests/test_self_distillation.py`).

Config string: the student, `resnet18_cifar` (the reimplementation's
`multi_resnet18_kd`: CIFAR stem, no max-pool) or `resnet50_cifar`
(`multi_resnet50_kd`); any zoo model whose `features['stages']` shrink by
integer factors works. No teacher: the deepest classifier teaches the
exits after stages 1..n-1 (`kd_jax.distillers.byot`).

Recipe of luanyunteng/pytorch-be-your-own-teacher `train.py` (there is no
official code; its README says the branches and hyperparameters are its
guesses): SGD 0.1, momentum 0.9, weight decay 5e-4, batch 128, 200 epochs,
LR x0.1 at epochs 75 / 130 / 180 (`adjust_learning_rate`, 0-based epochs),
crop + flip; loss `(1 - alpha)·CE(deepest)` (the objective's CE) + the BYOT
term (weight 1: `(1 - alpha)·sum CE(exit) + alpha·sum T^2·H(deepest/T,
exit/T) + beta·sum feature L2`) with alpha 0.1, T 3, beta 1e-6.

Published per-classifier top-1 (the BYOT paper, as listed in that README's
"Original" rows; classifiers 1/4..4/4): ResNet18 67.85 / 74.57 / 78.23 /
78.64; ResNet50 68.23 / 74.21 / 75.23 / 80.56. `report.paper.value` is the
deepest classifier's; `report.paper.exit_values` all four. The
reimplementation's own runs: ResNet18 66.57 / 74.69 / 78.04 / 78.73,
ResNet50 71.84 / 77.75 / 80.14 / 80.64.
"""

import ml_collections

from configs import base
from configs import recipes

ALPHA = 0.1
PUBLISHED = {"resnet18_cifar": (67.85, 74.57, 78.23, 78.64),
             "resnet50_cifar": (68.23, 74.21, 75.23, 80.56)}


def get_config(model: str = "resnet18_cifar"):
  c = base.cifar100_recipe(base.base_config(), lr=0.1)
  c.mode = "train"  # no teacher: the terms are teacher-free
  c.model.name = model
  c.optimizer.decay_epochs = (75, 130, 180)
  c.train.batch_size = 128
  c.train.num_epochs = 200
  c.loss.ce_weight = 1.0 - ALPHA
  c.loss.terms = ml_collections.ConfigDict({"byot": {
      "distiller": "byot", "weight": 1.0, "warmup": False, "alpha": ALPHA,
      "temperature": 3.0, "beta": 1e-6}})
  c.report.paper.source = (
      "BYOT paper (Zhang et al., ICCV 2019) per-classifier top-1 as listed in "
      "luanyunteng/pytorch-be-your-own-teacher README; recipe from its "
      "train.py")
  c.report.paper.metric = recipes.CIFAR100_METRIC
  exits = PUBLISHED.get(model, (-1.0,) * 4)
  c.report.paper.value = exits[-1]
  c.report.paper.exit_values = exits
  return c
