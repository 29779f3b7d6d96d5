"""CIFAR-100 Born-Again Networks (Furlanello et al., ICML 2018): generations.

    python -m experiments.main --config=configs/cifar100_ban.py:wrn_40_2 \\
        --workdir=workdirs/cifar100/ban_wrn_40_2

Not run here (4 CIFAR-100 trainings of 240 epochs per seed). The
generations are phases of a seed experiment; the ensemble of generations
1..3 (BANE) is `seed_experiment.ensembles.bane_3`: after each seed's
phases, their last checkpoints are evaluated together on the test set (mean
of the softmax probabilities, `kd_jax.trainer.evaluate_ensemble` with
`kd_jax.distillers.ban.make_ensemble_eval_step`) and reported as a row.
`results.md` compares every generation with the previous one and BANE with
the last generation (`seed_experiment.comparisons`, paired over seeds).

Config string `<model>[-<objective>]` -- any zoo network (the paper used
DenseNets and Wide-ResNets: the zoo's `wrn_40_2` is the default),
objective `ban` (default) or `ban_l`. Phases: `gen0` (the model trained on
labels), `gen1..gen3` (the same architecture, each distilled from the
previous generation, fresh initialization). There is no official code;
the objective as we read the paper: the student matches the teacher's
output distribution -- `kd` at T = 1 with weight 1 and no label term
(`ban`), or with the label cross-entropy added (`ban_l`, the paper's
BAN+L). Training recipe: the zoo's CIFAR-100 one (`configs/chains.py`),
not the paper's DenseNet schedule. `report.paper.value` is -1 (the paper's
DenseNet / WRN numbers are not transcribed here).
"""

from configs import chains
from configs import recipes

GENERATIONS = 3
OBJECTIVES = {"ban": 0.0, "ban_l": 1.0}  # objective -> label CE weight


def get_config(spec: str = "wrn_40_2"):
  model, _, objective = spec.partition("-")
  objective = objective or "ban"
  if objective not in OBJECTIVES:
    raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}; got "
                     f"{objective!r} (config string <model>[-<objective>]).")
  phases = {"gen0": chains.train_phase(model)}
  distill_from = {}
  for g in range(1, GENERATIONS + 1):
    phases[f"gen{g}"] = chains.kd_phase(
        model, model, ce_weight=OBJECTIVES[objective], kd_weight=1.0,
        temperature=1.0)
    distill_from[f"gen{g}"] = f"gen{g - 1}"
  gens = tuple(phases)
  c = chains.seed_experiment(
      phases, order=gens, distill_from=distill_from, student_phase="gen0",
      seeds=(0,),
      comparisons=tuple((f"gen{g}", f"gen{g - 1}")
                        for g in range(1, GENERATIONS + 1))
      + ((f"bane_{GENERATIONS}", f"gen{GENERATIONS}"),),
      ensembles={f"bane_{GENERATIONS}": gens[1:]})
  c.report.paper.source = ("Born-Again Networks (Furlanello et al., ICML "
                           "2018); no official code; recipe: kd_jax's "
                           "CIFAR-100 one")
  c.report.paper.metric = recipes.CIFAR100_METRIC
  c.report.paper.value = -1.0
  return c
