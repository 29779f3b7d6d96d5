"""Published CIFAR-100 / ImageNet distillation recipes and the numbers they target.

Sources (top-1 accuracy, %, test set / ImageNet val):

* Teachers, "student alone" baselines and KD on CIFAR-100:
  Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR
  2020 (CRD), Tables 1-2, as listed in the RepDistiller README
  (HobbitLong/RepDistiller); the CRD paper averages several runs.
* DKD on CIFAR-100 / ImageNet: Zhao et al., "Decoupled Knowledge
  Distillation", CVPR 2022, as listed in the mdistiller README
  (megvii-research/mdistiller); its KD column equals CRD's. The DKD paper
  reports the mean over 3 runs and does not say whether that is the last or
  the best epoch (mdistiller's trainer logs both; kd_jax reports both).
* Hyperparameters: mdistiller `configs/cifar100/dkd/*.yaml` and
  `mdistiller/engine/cfg.py` (KD: T=4, CE 0.1, KD 0.9; DKD: alpha 1, T 4,
  warm-up 20 epochs, CE 1, beta per pair below), `configs/imagenet/r34_r18`.

Student learning rate: 0.05, except 0.01 for MobileNetV2 / ShuffleNetV2
students (mdistiller, RepDistiller).
"""

import dataclasses
from typing import Dict, Optional


@dataclasses.dataclass(frozen=True)
class CifarPair:
  teacher: str
  student: str
  lr: float
  dkd_beta: float
  teacher_acc: float          # CRD Table 1/2
  student_acc: float          # CRD Table 1/2 (student trained alone)
  kd_acc: float               # DKD paper (== CRD's KD column for these)
  dkd_acc: Optional[float]    # DKD paper / mdistiller README; None: not published
  kd_source: str = "CRD paper (Tian et al., ICLR 2020) / RepDistiller README"
  dkd_source: str = "CRD paper (Tian et al., ICLR 2020) / RepDistiller README"


# Keys are `<teacher>-<student>` (the config string of cifar100_{kd,dkd}.py).
CIFAR100_PAIRS: Dict[str, CifarPair] = {
    "resnet56-resnet20": CifarPair(
        "resnet56", "resnet20", 0.05, 2.0, 72.34, 69.06, 70.66, 71.97),
    "resnet110-resnet20": CifarPair(
        "resnet110", "resnet20", 0.05, 2.0, 74.31, 69.06, 70.67, None,
        dkd_source="none: the DKD paper has no resnet110->resnet20 row; beta 2 "
                   "as for the other CIFAR ResNet pairs"),
    "resnet110-resnet32": CifarPair(
        "resnet110", "resnet32", 0.05, 2.0, 74.31, 71.14, 73.08, 74.11),
    "resnet32x4-resnet8x4": CifarPair(
        "resnet32x4", "resnet8x4", 0.05, 8.0, 79.42, 72.50, 73.33, 76.32),
    "wrn_40_2-wrn_16_2": CifarPair(
        "wrn_40_2", "wrn_16_2", 0.05, 6.0, 75.61, 73.26, 74.92, 76.23),
    "wrn_40_2-wrn_40_1": CifarPair(
        "wrn_40_2", "wrn_40_1", 0.05, 6.0, 75.61, 71.98, 73.54, 74.81),
    "vgg13-vgg8": CifarPair(
        "vgg13", "vgg8", 0.05, 6.0, 74.64, 70.36, 72.98, 74.68),
    "resnet32x4-shufflenetv2": CifarPair(
        "resnet32x4", "shufflenetv2", 0.01, 8.0, 79.42, 71.82, 74.45, 77.07),
    "resnet50_cifar-mobilenetv2": CifarPair(
        "resnet50_cifar", "mobilenetv2", 0.01, 8.0, 79.34, 64.60, 67.35,
        70.35),
}

# Teacher accuracy targeted by each teacher-training config (CRD Table 1/2).
CIFAR100_TEACHERS: Dict[str, float] = {}
for _p in CIFAR100_PAIRS.values():
  CIFAR100_TEACHERS[_p.teacher] = _p.teacher_acc

# Student-alone baselines (CRD Table 1/2).
CIFAR100_STUDENTS: Dict[str, float] = {}
for _p in CIFAR100_PAIRS.values():
  CIFAR100_STUDENTS[_p.student] = _p.student_acc

# ImageNet ResNet34 -> ResNet18 (top-1 on val). Teacher/student: the
# torchvision weights (DKD and CRD papers). KD 70.66: the DKD / CRD papers'
# KD row; the mdistiller README lists its own KD rerun as 71.03. DKD 71.70:
# DKD paper / mdistiller README.
IMAGENET_R34_R18 = {
    "teacher": "resnet34", "student": "resnet18",
    "teacher_acc": 73.31, "student_acc": 69.76,
    "kd_acc": 70.66,
    "dkd_acc": 71.70,
}


def lr_for_student(student: str) -> float:
  return 0.01 if student in ("mobilenetv2", "shufflenetv2") else 0.05


def get_pair(pair: str) -> CifarPair:
  if pair not in CIFAR100_PAIRS:
    raise ValueError(f"unknown CIFAR-100 pair {pair!r}; choose one of "
                     f"{', '.join(CIFAR100_PAIRS)}.")
  return CIFAR100_PAIRS[pair]


CIFAR100_METRIC = ("CIFAR-100 test top-1 (%), mean over runs as published "
                   "(kd_jax reports both last- and best-epoch accuracy)")
IMAGENET_METRIC = "ImageNet val top-1 (%), single run as published"


def teacher_workdir(dataset: str, model: str) -> str:
  """Default workdir of a teacher-training run (what distill configs load)."""
  return f"workdirs/{dataset}/teacher_{model}"
