"""Distillation chains as seed experiments: Born-Again generations, TAKD.

Helpers of `configs/cifar100_ban.py` and `configs/cifar100_takd.py` (the
MNIST TAKD recipe, `configs/mnist_takd.py`, builds on `configs/mnist.py`).
A chain is a `mode='seed_experiment'` config whose phases are ordinary
`train` / `distill` runs; `seed_experiment.distill_from` makes each
distilled phase load the previous phase's workdir as its teacher
(`experiments.seed_experiment.phase_inputs`), so every hop is an ordinary
KD run with the zoo's CIFAR-100 recipe (`base.cifar100_recipe`: SGD 0.9,
batch 64, 240 epochs, LR 0.05, or 0.01 for MobileNetV2 / ShuffleNetV2
students, x0.1 at 150 / 180 / 210, weight decay 5e-4) and mdistiller's KD
(0.1·CE + 0.9·KD, T = 4) unless a config says otherwise.
"""

from typing import Dict, Optional, Sequence, Tuple

import ml_collections

from configs import base
from configs import recipes


def train_phase(model: str) -> ml_collections.ConfigDict:
  """`model` trained alone on CIFAR-100 (labels only)."""
  c = base.cifar100_recipe(base.base_config(),
                           lr=recipes.lr_for_student(model))
  c.mode = "train"
  c.model.name = model
  return c


def kd_phase(teacher: str, student: str, *, ce_weight: float = 0.1,
             kd_weight: float = 0.9,
             temperature: float = 4.0) -> ml_collections.ConfigDict:
  """`student` distilled from `teacher` (the checkpoint is set by the seed
  experiment from the teacher phase's workdir)."""
  c = train_phase(student)
  c.mode = "distill"
  c.teacher.name = teacher
  c.loss.ce_weight = float(ce_weight)
  c.loss.terms = base.kd_terms(weight=kd_weight, temperature=temperature)
  return c


def seed_experiment(phases: Dict[str, ml_collections.ConfigDict], *,
                    order: Sequence[str], distill_from: Dict[str, str],
                    student_phase: str, seeds: Tuple[int, ...] = (0,),
                    shared: Sequence[str] = (),
                    comparisons: Sequence[Tuple[str, str]] = (),
                    ensembles: Optional[Dict[str, Sequence[str]]] = None
                    ) -> ml_collections.ConfigDict:
  """A CIFAR-100 seed experiment over `phases`.

  `comparisons` (pairs of phases to compare per seed) and `ensembles`
  (name -> phases whose softmax outputs are averaged at evaluation) are
  what the report needs beyond gains against `student_phase`; the seed
  experiment does not read them yet (notes/selfkd.md): until it does,
  `python -m experiments.paired_gains` computes the comparisons.
  """
  c = base.base_config()
  c.mode = "seed_experiment"
  c.data.name = "cifar100"
  c.train.parallel = "jit"
  se = ml_collections.ConfigDict()
  se.seeds = tuple(seeds)
  se.phases = ml_collections.ConfigDict(dict(phases))
  se.order = tuple(order)
  se.student_phase = student_phase
  se.distill_from = ml_collections.ConfigDict(dict(distill_from))
  se.shared_phases = tuple(shared)
  se.comparisons = tuple(tuple(p) for p in comparisons)
  se.ensembles = ml_collections.ConfigDict(
      {k: tuple(v) for k, v in (ensembles or {}).items()})
  c.seed_experiment = se
  return c
