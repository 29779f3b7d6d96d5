"""CIFAR-100 TAKD chain (Mirzadeh et al., AAAI 2020): ResNet110 -> ResNet20 -> ResNet8.

    python -m experiments.main --config=configs/cifar100_takd.py \\
        --workdir=workdirs/cifar100/takd_resnet110-resnet20-resnet8

Not run here (5 CIFAR-100 trainings of 240 epochs per seed). Config
string `<teacher>-<assistant>-<student>`, default the chain of the
authors' README example for CIFAR-100 (imirzadeh/Teacher-Assistant-
Knowledge-Distillation, "3.2 'resnet 110' as teacher, 'resnet20' as TA,
'resnet8' as student on CIFAR100"). Phases: `teacher` (alone), `ta` (from
the teacher), `student_takd` (from the TA), `student_direct` (from the
teacher), `student` (alone); the teacher is shared by the seeds.
`results.md` gives each student row's paired gain over the student alone
and the TAKD-vs-direct comparison (`seed_experiment.comparisons`), with
95% intervals over the seeds; the assistant's row has no gain (another
network).

Every hop uses the zoo's CIFAR-100 KD recipe (`configs/chains.py`:
0.1·CE + 0.9·KD at T = 4, SGD 0.05, 240 epochs), so the rows compare with
`configs/cifar100_kd.py`. The authors' `train.py` differs and is not
transcribed: T and lambda were searched per run with NNI
(`search_space.json`: lambda in 0.05..1, T in {1, 2, 5, 10, 15, 20}, seeds
20 / 31 / 55), its KD term is `lambda·T^2·nn.KLDivLoss()` (the mean over
B x K entries, i.e. 1/K of the batch-mean KL), SGD momentum 0.9, weight
decay 1e-4, batch 128, 160 epochs (README commands), and its
`adjust_learning_rate` never takes its 0.1 branch (`epoch < int(epoch /
2.0)` is always false): LR 0.01, then 0.001 from 3/4 of the epochs.
`report.paper.value` is -1: the paper's table is not transcribed here.
"""

from configs import chains
from configs import recipes

DEFAULT = "resnet110-resnet20-resnet8"


def get_config(chain: str = DEFAULT):
  models = chain.split("-")
  if len(models) != 3:
    raise ValueError(f"config string must be <teacher>-<assistant>-<student>;"
                     f" got {chain!r}.")
  teacher, ta, student = models
  phases = {
      "teacher": chains.train_phase(teacher),
      "ta": chains.kd_phase(teacher, ta),
      "student_takd": chains.kd_phase(ta, student),
      "student_direct": chains.kd_phase(teacher, student),
      "student": chains.train_phase(student),
  }
  c = chains.seed_experiment(
      phases, order=("teacher", "ta", "student_takd", "student_direct",
                     "student"),
      distill_from={"ta": "teacher", "student_takd": "ta",
                    "student_direct": "teacher"},
      student_phase="student", seeds=(0, 1, 2), shared=("teacher",),
      comparisons=(("student_takd", "student_direct"),))
  c.report.paper.source = ("TAKD (Mirzadeh et al., AAAI 2020); chain of "
                           "imirzadeh/Teacher-Assistant-Knowledge-"
                           "Distillation README; recipe: kd_jax's CIFAR-100 "
                           "KD")
  c.report.paper.metric = recipes.CIFAR100_METRIC
  c.report.paper.value = -1.0
  return c
