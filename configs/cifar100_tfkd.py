"""CIFAR-100 Tf-KD, teacher-free KD (Yuan et al., CVPR 2020): reg, self, base.

    # the baseline, which is also Tf-KD_self's pretrained teacher
    python -m experiments.main --config=configs/cifar100_tfkd.py:base-resnet18_cifar \\
        --workdir=workdirs/cifar100/tfkd_base_resnet18_cifar
    # Tf-KD_self: ordinary KD from that copy (teacher = same architecture)
    python -m experiments.main --config=configs/cifar100_tfkd.py:self-resnet18_cifar \\
        --workdir=workdirs/cifar100/tfkd_self_resnet18_cifar
    # Tf-KD_reg: the manually designed virtual teacher, no teacher network
    python -m experiments.main --config=configs/cifar100_tfkd.py:reg-resnet18_cifar \\
        --workdir=workdirs/cifar100/tfkd_reg_resnet18_cifar

Config string `<variant>-<model>`, variant `base` | `self` | `reg`, model
`resnet18_cifar` (the authors' `ResNet18`), `mobilenetv2`, `shufflenetv2`
(the zoo's are RepDistiller's definitions, not the authors' CIFAR ports of
MobileNetV2 / ShuffleNetV2: same families, different widths / strides).
`reg` runs once the trainer accepts teacher-free distiller terms in mode
'train' (`notes/selfkd.md`); `base` and `self` run today.

Recipe of yuanli2333/Teacher-free-Knowledge-Distillation (`main.py`,
`train_kd.py`): SGD momentum 0.9, weight decay 5e-4, LR `0.1 * batch / 128`,
batch 128, 200 epochs, MultiStepLR x0.2 at epochs 60 / 120 / 160, one
warm-up epoch (linear). Losses with the authors' `params.json` values:

* `reg` (`base_experiments/base_<model>/params.json`, `--regularization`):
  `(1 - reg_alpha)·CE + reg_alpha·tfkd` where the `tfkd` distiller is
  `multiplier · KL(virtual teacher || student)` averaged over the B x K
  entries (`nn.KLDivLoss()`'s default 'mean', `kd_jax.distillers.tfkd`);
* `self` (`kd_experiments/<model>_distill/<model>_self_teacher`,
  `--self_training`): `(1 - alpha)·CE + alpha·multiplier·T^2·KL_mean`, i.e.
  a `kd` term with weight `alpha · multiplier / K` (`tfkd.self_kd_weight`)
  and the teacher `teacher.name = model.name` loaded from the `base` run's
  workdir. The authors distill from the base run's `best.pth.tar` (the
  epoch with the best *test* accuracy); kd_jax loads the workdir's latest
  checkpoint (the last epoch).

Published top-1 (the authors' README tables, figures/Tf-self.png and
Reg-Normal-LSR.png): baseline MobileNetV2 68.38, ShuffleNetV2 70.34,
ResNet18 75.87; Tf-KD_self 70.96 / 72.23 / 77.10; Tf-KD_reg 70.88 / 72.09 /
77.36.
"""

import ml_collections

from configs import base
from configs import recipes
from kd_jax.distillers import tfkd

NUM_CLASSES = 100
# model -> (reg_temperature, reg_alpha, multiplier) of base_<model>/params.json
REG = {"resnet18_cifar": (20.0, 0.1, 100.0), "mobilenetv2": (40.0, 0.95, 1.0),
       "shufflenetv2": (10.0, 0.95, 1.0)}
# model -> (temperature, alpha, multiplier) of <model>_self_teacher/params.json
SELF = {"resnet18_cifar": (6.0, 0.95, 50.0), "mobilenetv2": (20.0, 0.95, 1.0),
        "shufflenetv2": (20.0, 0.95, 1.0)}
# model -> (baseline, Tf-KD_self, Tf-KD_reg), the authors' README tables
PUBLISHED = {"resnet18_cifar": (75.87, 77.10, 77.36),
             "mobilenetv2": (68.38, 70.96, 70.88),
             "shufflenetv2": (70.34, 72.23, 72.09)}
VARIANTS = ("base", "self", "reg")
SOURCE = ("Tf-KD (Yuan et al., CVPR 2020), yuanli2333/Teacher-free-Knowledge-"
          "Distillation README tables and params.json")


def base_workdir(model: str) -> str:
  """Where the `base-<model>` run (Tf-KD_self's teacher) is written."""
  return f"workdirs/cifar100/tfkd_base_{model}"


def tfkd_recipe(c, batch_size: int = 128):
  c = base.cifar100_recipe(c, lr=0.1 * batch_size / 128)
  c.optimizer.decay_epochs = (60, 120, 160)
  c.optimizer.decay_factor = 0.2
  c.optimizer.warmup_epochs = 1
  c.train.batch_size = batch_size
  c.train.num_epochs = 200
  return c


def get_config(spec: str = "reg-resnet18_cifar"):
  variant, _, model = spec.partition("-")
  if variant not in VARIANTS or model not in REG:
    raise ValueError(f"config string must be <variant>-<model> with variant "
                     f"in {VARIANTS} and model in {sorted(REG)}; got "
                     f"{spec!r}.")
  c = tfkd_recipe(base.base_config())
  c.model.name = model
  c.report.paper.source = SOURCE
  c.report.paper.metric = recipes.CIFAR100_METRIC
  c.report.paper.value = PUBLISHED[model][VARIANTS.index(variant)]
  c.report.paper.student_value = PUBLISHED[model][0]
  if variant == "base":
    c.mode = "train"
  elif variant == "reg":
    temperature, alpha, multiplier = REG[model]
    c.mode = "train"  # no teacher network: the virtual teacher is a formula
    c.loss.ce_weight = 1.0 - alpha
    c.loss.terms = ml_collections.ConfigDict({"tfkd": {
        "distiller": "tfkd", "weight": alpha, "warmup": False,
        "temperature": temperature, "correct_prob": 0.99,
        "multiplier": multiplier}})
  else:
    temperature, alpha, multiplier = SELF[model]
    c.mode = "distill"
    c.teacher.name = model
    c.teacher.checkpoint = base_workdir(model)
    c.loss.ce_weight = 1.0 - alpha
    c.loss.terms = base.kd_terms(
        weight=tfkd.self_kd_weight(alpha, multiplier, NUM_CLASSES),
        temperature=temperature)
    c.report.paper.teacher_value = PUBLISHED[model][0]
  return c
