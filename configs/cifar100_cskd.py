"""CIFAR-100 CS-KD, class-wise self-knowledge distillation (Yun et al., CVPR 2020).

    python -m experiments.main --config=configs/cifar100_cskd.py:resnet18_cifar \\
        --workdir=workdirs/cifar100/cskd_resnet18_cifar

No teacher (mode 'train' with the teacher-free `cskd` term). The `cskd`
distiller declares the `'pair'` view, so the trainer builds the training
pipeline with a same-class partner per example
(`InMemoryPipeline(same_class_pairs=True)`, drawn per (seed, epoch,
example)), sends the partners' indices with the anchors', gathers and
augments the partners on device (their own crop / flip keys) and runs the
student on them (train mode, no gradient) every step.

Config string: the network (`resnet18_cifar` = the authors'
`CIFAR_ResNet18`, the README's command). Recipe of alinlab/cs-kd (README
command + `train.py` defaults): SGD 0.1, momentum 0.9, weight decay 1e-4,
batch 128 anchors (+ 128 partners), 200 epochs, LR x0.1 at 50% / 75% --
`adjust_learning_rate` runs *after* each epoch, so epoch 100 (0-based)
still trains at 0.1 and the decays apply from epochs 101 and 151; crop +
flip. Loss `CE(anchors) + lamda·T^2·KL(partner || anchor)` with T = 4,
lamda = 1 (`--temp`, `--lamda`; 3 on the fine-grained sets).

Differences from the authors' loader: their `PairBatchSampler` keeps the
last partial batch (50000 / 128); kd_jax drops it (390 steps per epoch).
The CS-KD paper's CIFAR-100 numbers are for its own ResNet-18 / DenseNet-BC
protocol (top-1 error); `report.paper.value` is -1 (not transcribed).
"""

import ml_collections

from configs import base
from configs import recipes


def get_config(model: str = "resnet18_cifar"):
  c = base.cifar100_recipe(base.base_config(), lr=0.1)
  c.mode = "train"  # no teacher: the partner view is the target
  c.model.name = model
  c.optimizer.weight_decay = 1e-4
  c.optimizer.decay_epochs = (101, 151)
  c.train.batch_size = 128
  c.train.num_epochs = 200
  c.loss.ce_weight = 1.0
  c.loss.terms = ml_collections.ConfigDict({"cskd": {
      "distiller": "cskd", "weight": 1.0, "warmup": False,
      "temperature": 4.0}})
  c.report.paper.source = ("CS-KD (Yun et al., CVPR 2020); recipe "
                           "alinlab/cs-kd README + train.py")
  c.report.paper.metric = recipes.CIFAR100_METRIC
  c.report.paper.value = -1.0
  return c
