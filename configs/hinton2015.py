"""Hinton, Vinyals & Dean (2015), Section 3: the MNIST experiments.

    TFDS_DATA_DIR=../shared/data/tfds python -m experiments.main \\
        --config=configs/hinton2015.py --workdir=workdirs/hinton2015

"Distilling the Knowledge in a Neural Network", arXiv:1503.02531
(Section 3; numbers: test errors of 10,000). For each seed:

* ``teacher``: 784-1200-1200-10 ReLU net (`mlp_1200x2`: dropout 0.2 on the
  inputs and 0.5 on the hidden units), max-norm weight constraint
  (radius sqrt(15): Hinton et al. 2012's bound of 15 on the squared
  length of each hidden unit's incoming weights), inputs jittered by up to
  2 pixels in any direction, all 60,000 training cases (paper: 67 errors);
* ``student``: 784-800-800-10 (`mlp_800x2`), no regularization (146);
* ``distill``: the same net distilled at T = 20 (74): soft targets as an
  *additional* task next to the hard labels (Section 2: "a considerably
  lower weight on the second objective"; the MNIST weight is not given --
  we use CE weight 0.1 and the T^2-scaled KD term weight 1), the teacher's
  logits precomputed once (exact: the student sees un-augmented images);
* ``omit3``: distilled from a transfer set without any 3 (206 errors, 133 on
  the 1,010 test 3s; after raising the bias of 3 by the shift that
  optimizes test performance, 3.5 in the paper: 109, 14 on 3s);
* ``keep78``: a transfer set of only 7s and 8s (47.3% errors; 13.2% after
  lowering the biases of 7 and 8 by 7.6); the evaluation reports both
  numbers of a row (``errors`` / ``errors_shifted``, ``shift``);
* ``omit3`` / ``keep78`` also hold out ``VALIDATION_SIZE`` = 5,000 examples
  of the training split (``evaluation.validation_size``: stratified, the
  same for every seed, carved BEFORE the classes are removed, so it has
  its 3s / all ten classes) and train on the remaining 55,000 (minus the
  removed classes); they report the shift chosen on that split
  (``shift_val``) and the test errors with it (``errors_shifted_val``,
  ``errors_on_shifted_val``) next to the paper's test-chosen shift. (The
  shared teacher was trained on all 60,000, these 5,000 included; the
  student never sees them.)
* the temperature sweep: 30-unit students (`mlp_30x2`) at T in
  ``SWEEP_T30`` against ``student_w30`` alone, and 800-unit students at
  ``SWEEP_T800`` (T = 20 is ``distill``) -- the paper: with >= 300 units
  all T above 8 are similar, with 30 units T in 2.5-4 is best.

What the paper does not give (documented in docs/reproductions.md): the
optimizer, learning rates and epochs of every net, the teacher's dropout
rates and constraint (only "as described in [5]", Hinton et al. 2012, whose
own optimizer -- LR 10, momentum to 0.99, 3,000 epochs -- diverges with ReLU
units here), the KD / CE weights. We use Adam 1e-3 with cosine decay,
batch 100, raw pixels in [0, 1] (``data.normalization='unit'``, the scale the
max-norm radius assumes), ``TEACHER_EPOCHS`` / ``STUDENT_EPOCHS`` /
``W30_EPOCHS`` epochs (the CPU budget, not the paper's). Every run reports
its test errors as counts (``evaluation.error_counts``).

Arguments: none (the full run); ``debug`` (CI: one seed, one sweep point per
width, TFDS mock data, 2 steps per phase -- ``config.debug``); ``students``
(only the teacher-free phases ``student`` / ``student_w30``, with the same
phase configs: a full run in the same workdir reuses them); ``only=a+b``
(the shared teacher and the phases a, b: one process per phase and seed
on a machine where one process gets a tenth of a core).

One teacher for all seeds (``shared_phases``, ``shared_seed = 0``): on the
2-core machine three teachers did not fit the budget, so the seeds vary the
students (initialization, data order) but not the teacher.
"""

import ml_collections

from configs import base

TEACHER_EPOCHS = 20
STUDENT_EPOCHS = 5
W30_EPOCHS = 60
SEEDS = (0, 1, 2)
SWEEP_T30 = (1.0, 2.5, 4.0, 8.0, 20.0)
SWEEP_T800 = (2.0, 8.0)
MAX_NORM = 15.0 ** 0.5
# omit3 / keep78: examples held out of the training split (before the
# classes are removed) to choose the bias shift without the test set.
VALIDATION_SIZE = 5000  # (debug runs: 16, `classify_config.debug`)


def _tag(t: float) -> str:
  return f"{t:g}".replace(".", "p")


def _distill(model: str, temperature: float, epochs: int, **data) -> dict:
  out = {"mode": "distill", "model": {"name": model},
         "teacher": {"name": "mlp_1200x2", "precompute": True},
         "loss": {"ce_weight": 0.1, "terms": {"kd": {
             "weight": 1.0, "temperature": float(temperature)}}},
         "train": {"num_epochs": epochs}}
  if data:
    out["data"] = data
  return out


def _phases(sweep_t30, sweep_t800, validation_size: int) -> dict:
  p = {
      "teacher": {"mode": "train", "model": {"name": "mlp_1200x2"},
                  "data": {"jitter": 2},
                  "optimizer": {"max_norm": MAX_NORM},
                  "train": {"num_epochs": TEACHER_EPOCHS,
                            "eval_every_epochs": 5}},
      "student": {"mode": "train", "model": {"name": "mlp_800x2"},
                  "train": {"num_epochs": STUDENT_EPOCHS}},
      "distill": _distill("mlp_800x2", 20.0, STUDENT_EPOCHS),
      "omit3": dict(_distill("mlp_800x2", 20.0, STUDENT_EPOCHS,
                             omit_classes=(3,)),
                    evaluation={"bias_shift_classes": (3,),
                                "validation_size": validation_size}),
      "keep78": dict(_distill("mlp_800x2", 20.0, STUDENT_EPOCHS,
                              keep_classes=(7, 8)),
                     evaluation={"bias_shift_classes": (7, 8),
                                 "validation_size": validation_size}),
      "student_w30": {"mode": "train", "model": {"name": "mlp_30x2"},
                      "train": {"num_epochs": W30_EPOCHS}},
  }
  for t in sweep_t30:
    p[f"w30_T{_tag(t)}"] = _distill("mlp_30x2", t, W30_EPOCHS)
  for t in sweep_t800:
    p[f"w800_T{_tag(t)}"] = _distill("mlp_800x2", t, STUDENT_EPOCHS)
  return p


def get_config(arg: str = ""):
  if arg not in ("", "debug", "students") and not arg.startswith("only="):
    raise ValueError(f"configs/hinton2015.py: unknown argument {arg!r}; "
                     "expected '', 'debug', 'students' or 'only=<phase>+...'.")
  debug = arg == "debug"
  c = base.base_config()
  c.mode = "seed_experiment"
  c.debug = debug
  c.data.name = "mnist"
  c.data.augment = False
  c.data.normalization = "unit"
  c.data.mock_num_examples = 256  # debug: enough 7s and 8s for a batch
  c.model.name = "mlp_800x2"
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "cosine"
  c.train.batch_size = 100
  c.train.eval_batch_size = 1000
  c.train.eval_every_epochs = 1000  # evaluate once, at the end
  c.train.steps_per_call = 50
  c.train.log_every_steps = 600
  c.train.progress_bar = False
  c.checkpoint.every_epochs = 5
  c.checkpoint.keep = 1
  c.checkpoint.keep_best = False
  c.evaluation = ml_collections.ConfigDict({"error_counts": True})

  sweep_t30 = (3.0,) if debug else SWEEP_T30
  sweep_t800 = (1.0,) if debug else SWEEP_T800
  se = ml_collections.ConfigDict()
  se.seeds = (0,) if debug else SEEDS
  se.phases = ml_collections.ConfigDict(_phases(sweep_t30, sweep_t800,
                                                VALIDATION_SIZE))
  distilled = [p for p in se.phases if se.phases[p].mode == "distill"]
  se.order = ("student", "student_w30", "teacher", "distill", "omit3",
              "keep78", *(p for p in distilled
                          if p not in ("distill", "omit3", "keep78")))
  if arg == "students" or arg.startswith("only="):
    # A subset of the phases (same phase configs: a run of the full config
    # in the same workdir reuses them): the teacher-free ones, or the
    # listed ones ('+'-separated) with the shared teacher.
    keep = (("student", "student_w30") if arg == "students" else
            ("teacher", *arg[len("only="):].split("+")))
    unknown = [p for p in keep if p not in se.phases]
    if unknown:
      raise ValueError(f"configs/hinton2015.py: unknown phases {unknown}; "
                       f"phases: {list(se.phases)}.")
    se.phases = ml_collections.ConfigDict({p: se.phases[p] for p in keep})
    se.order = tuple(p for p in se.order if p in keep)
    distilled = [p for p in distilled if p in keep]
  se.distill_from = ml_collections.ConfigDict(
      {p: "teacher" for p in distilled})
  se.student_phase = "student" if "student" in se.phases else ""
  # One teacher (seed 0's) for every seed: the CPU budget. With one process
  # per seed (--config.seed_experiment.seeds='(k,)'), seed 0's teacher must
  # be in <workdir>/seed0/teacher already (see docs/reproductions.md).
  se.shared_phases = ("teacher",) if "teacher" in se.phases else ()
  se.shared_seed = 0
  # The 30-unit students against the 30-unit student alone.
  se.comparisons = tuple((p, "student_w30") for p in distilled
                         if p.startswith("w30_") and "student_w30" in se.phases)
  c.seed_experiment = se
  c.report.paper.source = ("Hinton, Vinyals & Dean 2015, Distilling the "
                           "Knowledge in a Neural Network, arXiv:1503.02531, "
                           "Section 3 (MNIST)")
  c.report.paper.metric = "test errors (of 10,000)"
  c.report.paper.value = 74.0
  c.report.paper.teacher_value = 67.0
  c.report.paper.student_value = 146.0
  c.report.notes = ("Budget recipe (Adam, cosine, short schedules); the "
                    "paper's optimizer and epochs are not given.")
  return c
