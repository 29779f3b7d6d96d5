"""CIFAR-100 configs of the feature / relation distillers.

`feature_config(method, pair)` builds the config of `configs/cifar100_<method>.py`:
the CIFAR-100 recipe of `base.cifar100_recipe` (SGD 0.9, batch 64, 240
epochs, LR 0.05 / 0.01 ×0.1 at 150/180/210, wd 5e-4), `mode='distill'`, and
`loss = 1.0·CE + weight·L_method` with the published weight of RepDistiller's
`scripts/run_cifar_distill.sh` (`-r 1 -a 0 -b <weight>`, i.e. no Hinton KD
term) or, for the methods RepDistiller does not ship (KDSVD, OFD,
ReviewKD), of mdistiller's `configs/cifar100/*.yaml` / `engine/cfg.py`.

A distiller term is `loss.terms.<label> = {'distiller': <method>, 'weight':
w, <constructor kwargs>}` (see `kd_jax.distillers.term_from_config`, which
also injects what only the run knows: CRD's dataset size and labels, OFD's
teacher BN statistics). Two-stage methods carry their initialization stage
in `pretrain_epochs` (RepDistiller `--init_epochs 30`); AB and FSP train
with CE only after it (their reference `loss_kd` is 0), FT keeps its weight
200 on the translator / frozen-paraphraser factors.

`report.paper.value` is the published accuracy of the method for the pair
(CRD paper Tables 1-2 as listed in the RepDistiller README; ReviewKD paper
for ReviewKD), -1 where none is published (KDSVD, OFD, OFA on these pairs,
FSP on pairs with different channel widths, where it is undefined).

`METHODS` is configuration data (the published weight, constructor
arguments and source of each method), not a list of what exists: the
methods themselves come from `kd_jax.distillers.available()`. A new method
needs no entry here -- its `configs/cifar100_<name>.py` can build on
`distill_base` (as `cifar100_mlkd.py`, `cifar100_ctkd.py` do).
"""

import ml_collections

from configs import base
from configs import recipes

REPDISTILLER = ("CRD paper (Tian et al., ICLR 2020) Tables 1-2 / RepDistiller "
                "README; weights from RepDistiller scripts/run_cifar_distill.sh")
MDISTILLER = "mdistiller configs/cifar100 + engine/cfg.py (weights)"

# CRD Tables 1-2 (RepDistiller README), per pair of recipes.CIFAR100_PAIRS.
_PAIRS = ("wrn_40_2-wrn_16_2", "wrn_40_2-wrn_40_1", "resnet56-resnet20",
          "resnet110-resnet20", "resnet110-resnet32", "resnet32x4-resnet8x4",
          "vgg13-vgg8", "resnet32x4-shufflenetv2",
          "resnet50_cifar-mobilenetv2")
_CRD_TABLE = {
    "fitnet": (73.58, 72.24, 69.21, 68.99, 71.06, 73.50, 71.02, 73.54, 63.16),
    "at": (74.08, 72.77, 70.55, 70.22, 72.31, 73.44, 71.43, 72.73, 58.58),
    "sp": (73.83, 72.43, 69.67, 70.04, 72.69, 72.94, 72.68, 74.56, 68.08),
    "cc": (73.56, 72.21, 69.63, 69.48, 71.48, 72.97, 70.71, 71.29, 65.43),
    "vid": (74.11, 73.30, 70.38, 70.16, 72.61, 73.09, 71.23, 73.40, 67.57),
    "rkd": (73.35, 72.22, 69.61, 69.25, 71.82, 71.90, 71.48, 73.21, 64.43),
    "pkt": (74.54, 73.45, 70.34, 70.25, 72.61, 73.64, 72.88, 74.69, 66.52),
    "ab": (72.50, 72.38, 69.47, 69.53, 70.98, 73.17, 70.94, 74.31, 67.20),
    "ft": (73.25, 71.59, 69.84, 70.22, 72.37, 72.86, 70.58, 72.50, 60.99),
    "fsp": (72.91, -1, 69.95, 70.11, 71.89, 72.62, 70.23, -1, -1),
    "nst": (73.68, 72.24, 69.60, 69.53, 71.96, 73.30, 71.53, 74.68, 64.96),
    "crd": (75.48, 74.14, 71.16, 71.46, 73.48, 75.51, 73.94, 75.65, 69.11),
}
# ReviewKD paper (Chen et al., CVPR 2021), CRD setting.
_REVIEWKD = {"resnet32x4-resnet8x4": 75.63, "vgg13-vgg8": 74.84}

# method -> (weight, distiller kwargs, source, extra loss settings)
METHODS = {
    "fitnet": (100.0, {"hint_layer": 2, "pretrain_epochs": 0}, REPDISTILLER,
               {}),
    "at": (1000.0, {"p": 2}, REPDISTILLER, {}),
    "nst": (50.0, {}, REPDISTILLER, {}),
    "sp": (3000.0, {}, REPDISTILLER, {}),
    "pkt": (30000.0, {}, REPDISTILLER, {}),
    "rkd": (1.0, {"distance_weight": 25.0, "angle_weight": 50.0},
            REPDISTILLER, {}),
    "cc": (0.02, {"feat_dim": 128}, REPDISTILLER, {}),
    "vid": (1.0, {"init_pred_var": 5.0, "eps": 1e-5}, REPDISTILLER, {}),
    "ab": (1.0, {"margin": 1.0, "pretrain_epochs": 30}, REPDISTILLER, {}),
    "ft": (200.0, {"k": 0.5, "p1": 2, "p2": 1, "pretrain_epochs": 30},
           REPDISTILLER, {}),
    "fsp": (50.0, {"pretrain_epochs": 30}, REPDISTILLER, {}),
    "kdsvd": (1.0, {"k": 1}, MDISTILLER, {}),
    "ofd": (1e-3, {"teacher_bn": "auto", "kernel_size": 1}, MDISTILLER, {}),
    "crd": (0.8, {"feat_dim": 128, "num_negatives": 16384, "momentum": 0.5,
                  "temperature": 0.07, "class_negatives": True},
            REPDISTILLER, {}),
    "reviewkd": (5.0, {}, "ReviewKD paper (Chen et al., CVPR 2021); weight 5 "
                 "and 20-epoch warm-up from mdistiller configs/cifar100/"
                 "reviewkd.yaml", {"warmup_epochs": 20}),
}


def published(method: str, pair: str) -> float:
  """The published accuracy of `method` on `pair`, -1 when there is none."""
  if method == "reviewkd":
    return _REVIEWKD.get(pair, -1.0)
  row = _CRD_TABLE.get(method)
  if row is None or pair not in _PAIRS:
    return -1.0
  return float(row[_PAIRS.index(pair)])


def distill_base(pair: str):
  """The CIFAR-100 distillation recipe of `pair` (no loss terms yet)."""
  p = recipes.get_pair(pair)
  c = base.cifar100_recipe(base.base_config(), lr=p.lr)
  c.mode = "distill"
  c.model.name = p.student
  c.teacher.name = p.teacher
  c.teacher.checkpoint = recipes.teacher_workdir("cifar100", p.teacher)
  c.loss.ce_weight = 1.0
  c.report.paper.metric = recipes.CIFAR100_METRIC
  c.report.paper.teacher_value = p.teacher_acc
  c.report.paper.student_value = p.student_acc
  return c


def feature_config(method: str, pair: str = "resnet32x4-resnet8x4"
                   ) -> ml_collections.ConfigDict:
  """The CIFAR-100 config of a feature / relation method (see module doc)."""
  if method == "ofa":
    return ofa_config(pair)
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose one of "
                     f"{', '.join(sorted(METHODS))}, ofa.")
  weight, kwargs, source, extra = METHODS[method]
  c = distill_base(pair)
  c.loss.terms = ml_collections.ConfigDict(
      {method: dict({"distiller": method, "weight": weight}, **kwargs)})
  for k, v in extra.items():
    c.loss[k] = v
  c.report.paper.source = source
  c.report.paper.value = published(method, pair)
  return c


def ofa_config(pair: str = "resnet32x4-resnet8x4"
               ) -> ml_collections.ConfigDict:
  """OFA-KD on CIFAR-100 (Hao840/OFAKD `configs/cifar/cnn.yaml`).

  Loss `1·CE(label smoothing 0.1) + 1·OFA(z_s) + 1·sum_s OFA(branch_s)` with
  eps 1 and temperature 1 (`--ofa-eps 1`, the README's CIFAR setting); the
  recipe of `configs/cifar/cnn.yaml`: 300 epochs, batch 128, SGD 0.9, LR 0.05
  cosine (OFAKD's floor `min_lr` 1e-3 is not modelled: kd_jax's cosine
  decays to 0) with 3 warm-up epochs, weight decay 2e-3. OFAKD's published
  CIFAR-100 numbers are for heterogeneous pairs, not the CRD pairs, so
  `report.paper.value` is -1.
  """
  c = distill_base(pair)
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_epochs = 3
  c.optimizer.weight_decay = 2e-3
  c.train.batch_size = 128
  c.train.num_epochs = 300
  c.loss.label_smoothing = 0.1
  c.loss.terms = ml_collections.ConfigDict({
      "ofa": {"weight": 1.0, "eps": 1.0, "temperature": 1.0},
      "ofa_branches": {"distiller": "ofa", "weight": 1.0,
                       "stages": (1, 2, 3), "eps": 1.0, "temperature": 1.0},
  })
  c.report.paper.source = ("Hao et al., NeurIPS 2023 (OFA-KD); recipe "
                           "Hao840/OFAKD configs/cifar/cnn.yaml")
  c.report.paper.value = -1.0
  return c
