"""Generalized distillation with privileged information on MNIST.

Lopez-Paz, Bottou, Schölkopf & Vapnik, "Unifying distillation and
privileged information", ICLR 2016, Section 4, experiment 5; the authors'
code: github.com/lopezpaz/distillation_privileged_information
(`code/mnist.py`).

    TFDS_DATA_DIR=../shared/data/tfds python -m experiments.main \\
        --config=configs/lopez_paz_mnist.py:300 --workdir=workdirs/lp300

Per seed (a repetition): N random training images (`data.subset='random'`,
drawn with the seed, the same for every phase of a seed); the teacher (MLP
20-20, Glorot) on the 28x28 images -- the privileged features; the student
alone (the same MLP) on the images downscaled to 7x7 (`data.views.student
= downscale 7`: PIL bilinear, what `scipy.misc.imresize(x, 25, mode='F')`
computes); the student distilled from the teacher with
`(1 - l) CE + l T^2 CE(softmax(z_t / T), softmax(z_s))` (the teacher sees
its own view, the 28x28 image; `data.views.teacher = None`). Pixels / 255,
RMSprop (Keras 0.x: lr 1e-3, rho 0.9, eps 1e-6), 50 epochs; accuracy on the
full 10,000-image test set, last epoch (the paper's protocol).

Deviation: the authors' Keras batch is 128 with the last partial batch;
kd_jax's in-memory pipeline drops partial batches, so this recipe uses
batch 100 (N = 300: 3 updates per epoch, as Keras; N = 500: 5 instead of 4),
every example seen once per epoch.

Phases: `teacher`, `student` (l = 0), `distill_t20_l05` (T = 20, l = 0.5)
and `distill_t10_l10` (T = 10, l = 1); more cells of the paper's grid
(T in {1, 2, 5, 10, 20, 50}, l in {0, 0.1, ..., 1}) are one phase entry each.
10 seeds (the paper's 10 repetitions).

Argument: N (`300`, the default, or `500`); `N-grid` adds the paper's
whole grid (T in {1, 2, 5, 10, 20, 50} x l in {0.1, ..., 1}: 60 distill
phases named `distill_t<T>_l<10 l>`); `debug` = `300` with
`debug=True` (mock data, 2 steps per phase, one seed).
"""

import ml_collections

from configs import base

SIZES = ("300", "500")
TEMPERATURES = (1, 2, 5, 10, 20, 50)
LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _distill(temperature: float, lam: float):
  return {"mode": "distill", "model": {"name": "lopez_paz_mlp_7x7"},
          "teacher": {"name": "lopez_paz_mlp"},
          "data": {"views": {"student": {"name": "downscale", "size": 7}}},
          "loss": {"ce_weight": 1.0 - lam, "terms": {
              "generalized_distillation": {"weight": lam,
                                           "temperature": temperature}}}}


def _grid_name(t, lam) -> str:
  return f"distill_t{t}_l{int(round(lam * 10)):02d}"


def get_config(arg: str = "300"):
  debug = arg == "debug"
  n, _, grid = ("300" if debug else arg).partition("-")
  if n not in SIZES or grid not in ("", "grid"):
    raise ValueError(f"configs/lopez_paz_mnist.py: the argument is N (one of "
                     f"{SIZES}), N-grid or 'debug'; got {arg!r}.")
  c = base.base_config()
  c.mode = "seed_experiment"
  c.debug = debug
  c.data.name = "mnist"
  c.data.augment = False
  c.data.normalization = "unit"
  c.data.train_subset = int(n)
  c.data.subset = "random"
  c.model.name = "lopez_paz_mlp"
  c.optimizer.name = "rmsprop"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.momentum = 0.0
  c.optimizer.schedule = "constant"
  c.train.batch_size = 100
  c.train.eval_batch_size = 1000
  c.train.num_epochs = 50
  c.train.steps_per_call = 25
  c.train.eval_every_epochs = 10
  c.train.log_every_steps = 50
  c.train.progress_bar = False
  c.checkpoint.every_epochs = 0
  c.checkpoint.keep = 1
  c.checkpoint.keep_best = False

  se = ml_collections.ConfigDict()
  se.seeds = tuple(range(10))
  se.phases = ml_collections.ConfigDict({
      "teacher": {"mode": "train", "model": {"name": "lopez_paz_mlp"}},
      "student": {"mode": "train", "model": {"name": "lopez_paz_mlp_7x7"},
                  "data": {"views": {"student": {"name": "downscale",
                                                 "size": 7}}}},
      "distill_t20_l05": _distill(20.0, 0.5),
      "distill_t10_l10": _distill(10.0, 1.0),
  })
  se.order = ("teacher", "student", "distill_t20_l05", "distill_t10_l10")
  se.student_phase = "student"
  se.distill_from = ml_collections.ConfigDict(
      {"distill_t20_l05": "teacher", "distill_t10_l10": "teacher"})
  if grid:  # the paper's whole grid (l = 0 is the student alone)
    names = []
    for t in TEMPERATURES:
      for lam in LAMBDAS:
        name = _grid_name(t, lam)
        if name not in se.phases:
          se.phases[name] = _distill(float(t), lam)
          se.distill_from[name] = "teacher"
          names.append(name)
    se.order = se.order + tuple(names)
  se.shared_phases = ()
  c.seed_experiment = se
  c.report.paper = {
      "source": "Lopez-Paz et al., ICLR 2016, Sec. 4 exp. 5 (MNIST), "
                "the authors' figures/result_mnist_" + n,
      "teacher_top1": {"300": 80.06, "500": 83.66}[n],
      "student_top1": {"300": 47.00, "500": 58.88}[n],
      "distill_t20_l05_top1": {"300": 64.60, "500": 73.43}[n],
      "distill_t10_l10_top1": {"300": 61.30, "500": 73.31}[n]}
  c.report.notes = (f"N={n} random MNIST images per seed; teacher on 28x28, "
                    "student on 7x7; batch 100 (Keras: 128 + partial).")
  return c
