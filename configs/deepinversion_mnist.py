"""DeepInversion / Adaptive DeepInversion on MNIST: images from a BN teacher.

Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via
DeepInversion", CVPR 2020; the authors' code: github.com/NVlabs/
DeepInversion (`cifar10/deepinversion_cifar10.py`, `deepinversion.py`).
The paper has no MNIST experiment: this is the CIFAR-10 recipe on the
zoo's BatchNorm MNIST CNN (`cnn_bn`), the issue's CPU-sized check that the
images the teacher "dreams" are classified as their targets.

    TFDS_DATA_DIR=../shared/data/tfds python -m experiments.main \\
        --config=configs/deepinversion_mnist.py \\
        --workdir=workdirs/deepinversion_mnist

Phases (one seed by default; the teacher and the ADI competitor trained
once):
* `teacher`: `cnn_bn` on MNIST (normalized with (0.1307, 0.3081)), Adam
  1e-3, batch 128, 2 epochs (our recipe);
* `student`: `mlp_student` alone, 1 epoch: the competitor of Adaptive
  DeepInversion (our choice; the paper's competitor is the student being
  distilled);
* `deepinversion`: task 'deepinversion' (`kd_jax.trainer.inversion`) from
  the frozen teacher, no training image read: a batch of 100 images (targets
  0..9 cycling), 2000 iterations of Adam lr 0.05 (betas 0.9, 0.999),
  constant; BN-statistics weight 10, TV-l2 2.5e-5, l2 0, CE 1, jitter 2, no
  flip, no clipping (the authors' CIFAR-10 paper parameters);
  `synthesized.png` / `images/step_<k>.png` every 200 iterations,
  `best.png` + `best_images.npy` at the end;
* `deepinversion_adi`: the same plus the ADI competition term against the
  `student` phase's MLP (`model.init_checkpoint` via `init_from`), weight
  0.2 at temperature 3 (the weight: our choice, as in
  experiments/deepinversion_demo.py).

Argument `debug`: the CLI's debug mode (mock data, 2 steps per phase,
batch 8; the inversion phases use the debug teacher phase's checkpoint).
"""

import ml_collections

from configs import base

VARIANTS = ("full", "debug")


def get_config(variant: str = "full"):
  if variant not in VARIANTS:
    raise ValueError(f"configs/deepinversion_mnist.py: the argument is one "
                     f"of {VARIANTS}; got {variant!r}.")
  c = base.base_config()
  c.mode = "seed_experiment"
  c.debug = variant == "debug"
  c.data.name = "mnist"
  c.data.augment = False
  c.model.name = "cnn_bn"
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "constant"
  c.train.batch_size = 128
  c.train.eval_batch_size = 1000
  c.train.num_epochs = 2
  c.train.steps_per_call = 20
  c.train.log_every_steps = 20
  c.checkpoint.keep = 1
  c.checkpoint.keep_best = False

  inv = {
      "task": "deepinversion", "mode": "distill",
      "model": {"name": "mlp_student"}, "teacher": {"name": "cnn_bn"},
      "optimizer": {"name": "adam", "learning_rate": 0.05,
                    "schedule": "constant"},
      "train": {"batch_size": 100, "num_epochs": 0, "num_steps": 2000,
                "steps_per_call": 20, "log_every_steps": 20,
                "eval_every_steps": 200},
      "checkpoint": {"every_steps": 200},
      "deepinversion": {"bn_weight": 10.0, "first_bn_multiplier": 1.0,
                        "tv_l2_weight": 2.5e-5, "tv_l1_weight": 0.0,
                        "l2_weight": 0.0, "ce_weight": 1.0,
                        "adi_weight": 0.0, "adi_temperature": 3.0,
                        "jitter": 2, "flip": False, "clip": False},
  }
  adi = base_merge(inv, {"deepinversion": {"adi_weight": 0.2}})
  se = ml_collections.ConfigDict()
  se.seeds = (0,)
  se.phases = ml_collections.ConfigDict({
      "teacher": {"mode": "train", "model": {"name": "cnn_bn"}},
      "student": {"mode": "train", "model": {"name": "mlp_student"},
                  "train": {"num_epochs": 1}},
      "deepinversion": inv,
      "deepinversion_adi": adi,
  })
  se.order = ("teacher", "student", "deepinversion", "deepinversion_adi")
  se.distill_from = ml_collections.ConfigDict(
      {"deepinversion": "teacher", "deepinversion_adi": "teacher"})
  se.init_from = ml_collections.ConfigDict({"deepinversion_adi": "student"})
  se.shared_phases = ("teacher", "student")
  c.seed_experiment = se
  c.report.paper = {
      "source": "Yin et al., CVPR 2020 (no MNIST experiment: the CIFAR-10 "
                "paper parameters on a BN MNIST CNN)",
      "metric": "the teacher's top-1 % on the synthesized batch"}
  c.report.notes = f"variant {variant}"
  return c


def base_merge(a: dict, b: dict) -> dict:
  """`a` with `b`'s keys merged in, recursively (copies)."""
  out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in a.items()}
  for k, v in b.items():
    out[k] = (base_merge(out[k], v) if isinstance(v, dict)
              and isinstance(out.get(k), dict) else v)
  return out
