"""Distillation chains as seed experiments: Born-Again generations, TAKD.

Helpers of `configs/cifar100_ban.py` and `configs/cifar100_takd.py` (the
MNIST TAKD recipe, `configs/mnist_takd.py`, builds on
`configs/mnist_seed.py`). A chain is a `mode='seed_experiment'` config:
its top-level sections are the zoo's CIFAR-100 recipe
(`base.cifar100_recipe`: SGD 0.9, batch 64, 240 epochs, x0.1 at 150 / 180
/ 210, weight decay 5e-4, crop + flip), every phase says what it changes
(its `mode`, network, learning rate -- 0.05, or 0.01 for MobileNetV2 /
ShuffleNetV2 -- teacher and loss), and `seed_experiment.distill_from`
makes each distilled phase load the previous phase's workdir as its
teacher (`experiments.seed_experiment.phase_inputs`). So every hop is an
ordinary KD run, with mdistiller's KD (0.1·CE + 0.9·KD, T = 4) unless a
config says otherwise.
"""

from typing import Dict, Optional, Sequence, Tuple

import ml_collections

from configs import base
from configs import recipes


def train_phase(model: str) -> dict:
  """`model` trained alone on CIFAR-100 (labels only)."""
  return {"mode": "train", "model": {"name": model},
          "optimizer": {"learning_rate": recipes.lr_for_student(model)}}


def kd_phase(teacher: str, student: str, *, ce_weight: float = 0.1,
             kd_weight: float = 0.9, temperature: float = 4.0) -> dict:
  """`student` distilled from `teacher` (the checkpoint is set by the seed
  experiment from the teacher phase's workdir)."""
  return {"mode": "distill", "model": {"name": student},
          "teacher": {"name": teacher},
          "optimizer": {"learning_rate": recipes.lr_for_student(student)},
          "loss": {"ce_weight": float(ce_weight), "terms": {"kd": {
              "weight": float(kd_weight),
              "temperature": float(temperature)}}}}


def seed_experiment(phases: Dict[str, dict], *, order: Sequence[str],
                    distill_from: Dict[str, str], student_phase: str,
                    seeds: Tuple[int, ...] = (0,),
                    shared: Sequence[str] = (),
                    comparisons: Sequence[Tuple[str, str]] = (),
                    ensembles: Optional[Dict[str, Sequence[str]]] = None
                    ) -> ml_collections.ConfigDict:
  """A CIFAR-100 seed experiment over `phases` (overrides of the recipe).

  `comparisons`: pairs of phases (or ensembles) compared per seed (paired
  gains with 95% intervals in `results.md`); `ensembles`: name -> phases
  whose softmax outputs are averaged at evaluation (BANE).
  """
  c = base.cifar100_recipe(base.base_config(), lr=0.05)
  c.mode = "seed_experiment"
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
