"""DeepInversion from the zoo's CIFAR ResNets (task 'deepinversion').

Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via
DeepInversion", CVPR 2020; the authors' code: github.com/NVlabs/
DeepInversion (`cifar10/deepinversion_cifar10.py`, whose README's "paper
parameters" these are): a batch of 256 images (targets cycling over the
classes), 2000 iterations of Adam lr 0.05 (betas 0.9, 0.999), BN-statistics
weight 10, TV-l2 2.5e-5, l2 0, jitter 2, no flip, no clipping, ADI off.
The authors invert a CIFAR-10 ResNet-34; here the teacher is a zoo
CIFAR-100 ResNet trained by `configs/cifar100_teacher.py` (its default
workdir `workdirs/cifar100/teacher_<name>`), the images' targets cycle
over the 100 classes. No CIFAR image is read.

    python -m experiments.main \\
        --config=configs/deepinversion_cifar100.py:resnet56 \\
        --workdir=workdirs/cifar100/deepinversion_resnet56 \\
        [--config.teacher.checkpoint=<teacher run workdir>]

Argument: a ResNet teacher of `configs/recipes.CIFAR100_PAIRS`
(resnet56, resnet110, resnet32x4); `model` is its pair's student, the
competitor of Adaptive DeepInversion when enabled
(`--config.deepinversion.adi_weight=<w> --config.model.init_checkpoint=
<a trained student's workdir>`). `<name>:smoke` is a debug run (mock
settings: batch 8, 2 iterations) with a RANDOMLY INITIALIZED teacher when
no teacher checkpoint exists: it only shows that the BN-statistics matching
runs over every BatchNorm layer of the network; its images mean nothing.
"""

from configs import base
from configs import recipes

TEACHERS = ("resnet56", "resnet110", "resnet32x4")


def get_config(arg: str = "resnet56"):
  name, _, variant = arg.partition(":")
  if name not in TEACHERS or variant not in ("", "smoke"):
    raise ValueError(f"configs/deepinversion_cifar100.py: the argument is "
                     f"one of {TEACHERS}, optionally with ':smoke'; got "
                     f"{arg!r}.")
  student = next(p.student for p in recipes.CIFAR100_PAIRS.values()
                 if p.teacher == name)
  c = base.base_config()
  c.task, c.mode = "deepinversion", "distill"
  c.debug = variant == "smoke"
  c.data.name = "cifar100"
  c.data.augment = False
  c.model.name, c.model.num_classes = student, 100
  c.model.init_checkpoint = ""
  c.teacher.name, c.teacher.num_classes = name, 100
  c.teacher.checkpoint = recipes.teacher_workdir("cifar100", name)
  c.teacher.evaluate = False
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 0.05
  c.optimizer.schedule = "constant"
  c.optimizer.weight_decay = 0.0
  c.train.batch_size = 256
  c.train.num_epochs = 0
  c.train.num_steps = 2000
  c.train.steps_per_call = 20
  c.train.log_every_steps = 20
  c.train.eval_every_steps = 200
  c.checkpoint.every_steps = 200
  c.checkpoint.keep = 1
  c.checkpoint.keep_best = False
  c.deepinversion = {
      "bn_weight": 10.0, "first_bn_multiplier": 1.0, "tv_l2_weight": 2.5e-5,
      "tv_l1_weight": 0.0, "l2_weight": 0.0, "ce_weight": 1.0,
      "adi_weight": 0.0, "adi_temperature": 3.0, "jitter": 2, "flip": False,
      "clip": False, "grid_rows": 16}
  c.report.paper.source = ("Yin et al., CVPR 2020 (CIFAR-10 paper "
                           "parameters; here a CIFAR-100 zoo teacher)")
  c.report.paper.metric = "the teacher's top-1 % on the synthesized batch"
  c.report.notes = f"teacher {name}" + (" (smoke: random teacher)"
                                        if c.debug else "")
  return c
