"""One phase (omit3 / keep78) of configs/hinton2015.py for one seed,
distilled from an already trained teacher workdir (the seed experiment
would retrain a teacher whose stored config predates a key rename; the
phase config is otherwise exactly
`seed_experiment.phase_config(get_config('only=<phase>'), <phase>, k)`).

    TFDS_DATA_DIR=... PYTHONPATH=$PWD nice -n 5 python notes/hval_phase_run.py \
        <teacher workdir> <out workdir> <seed> <phase>
"""
import sys

from configs import hinton2015
from experiments import seed_experiment
from kd_jax import trainer

teacher, out = sys.argv[1], sys.argv[2]
seed, phase = int(sys.argv[3]), sys.argv[4]
c = hinton2015.get_config(f"only={phase}")
pc = seed_experiment.phase_config(c, phase, seed)
pc.teacher.checkpoint = teacher
trainer.train_and_evaluate(pc, out)
