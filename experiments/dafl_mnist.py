r"""Exploration of DAFL's MNIST table (Chen et al., ICCV 2019, Table 1, LeNet-5
columns) with kd_jax's engine API -- not the trainer. EXPLORATION ONLY: the
final runs go through `python -m experiments.main` once DAFL is a task of the
trainer's loop.

Protocol (the authors' `teacher-train.py` / `DAFL-train.py`):

* data: MNIST resized to 32x32 (torchvision `Resize((32, 32))` = the
  `resize` view, PIL bilinear), normalized with (0.1307, 0.3081);
* teacher: LeNet-5, Adam lr 1e-3, batch 256, 9 epochs (`range(1, 10)`);
* "standard back-propagation" / "knowledge distillation" rows (the code has
  no script for them; our choice): LeNet-5-half with the teacher's recipe,
  CE only / the DAFL KD loss (KL at T = 1) on the real training images;
* DAFL: generator + LeNet-5-half, batch 512, 120 iterations per epoch,
  200 epochs, Adam lr_G 0.2, lr_S 2e-3, weights oh 1, ie 5, a 0.1. The
  authors keep the student with the best *test* accuracy (`accr_best`);
  we report both the last epoch and the best epoch.

Paper (Table 1, LeNet-5): teacher 98.91, standard BP 98.65, KD 98.91,
DAFL 98.20 (%, single numbers, no seeds given).

Usage (each phase appends one JSON line to `<workdir>/runs.jsonl` with the
command, the numbers, the wall time and the machine load):

  python -m experiments.dafl_mnist --phase=measure
  python -m experiments.dafl_mnist --phase=teacher --seed=0
  python -m experiments.dafl_mnist --phase=student --seed=0
  python -m experiments.dafl_mnist --phase=kd --seed=0
  python -m experiments.dafl_mnist --phase=dafl --seed=0 --dafl_epochs=20
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import explore_common as common
from kd_jax import image_grid
from kd_jax import models
from kd_jax import train
from kd_jax.data import views
from kd_jax.distillers import dafl

FLAGS = flags.FLAGS
flags.DEFINE_enum("phase", "measure",
                  ["measure", "teacher", "student", "kd", "dafl"], "what to run")
flags.DEFINE_integer("seed", 0, "seed")
flags.DEFINE_integer("teacher_seed", -1, "teacher of the kd / dafl phases "
                     "(-1: the same seed)")
flags.DEFINE_string("workdir", "workdirs/dafl_mnist", "outputs")
flags.DEFINE_integer("epochs", 9, "epochs of the data phases (authors: 9)")
flags.DEFINE_integer("dafl_epochs", 200, "DAFL epochs of 120 iterations")
flags.DEFINE_integer("dafl_iters", 120, "iterations per DAFL epoch")
flags.DEFINE_integer("dafl_batch", 512, "DAFL batch size")
flags.DEFINE_float("lr_g", 0.2, "generator Adam lr")
flags.DEFINE_float("lr_s", 2e-3, "student Adam lr")
flags.DEFINE_integer("measure_steps", 3, "timed DAFL steps in --phase=measure")

RESIZE32 = views.make_view("resize", size=32)


def _pre():
  return common.normalizer(view=RESIZE32)


def _teacher_path(seed):
  return os.path.join(FLAGS.workdir, f"teacher_seed{seed}.msgpack")


def _load_teacher(seed):
  seed = seed if FLAGS.teacher_seed < 0 else FLAGS.teacher_seed
  t = models.create("lenet5", num_classes=10)
  target = jax.eval_shape(t.init, jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  path = _teacher_path(seed)
  if not os.path.exists(path):
    sys.exit(f"no teacher at {path}: run --phase=teacher --seed={seed} first.")
  with open(path, "rb") as f:
    return t, flax.serialization.from_bytes(target, f.read())


def run_data_phase(phase, mnist):
  tx_, ty, ex, ey = mnist
  name = "lenet5" if phase == "teacher" else "lenet5_half"
  model = models.create(name, num_classes=10)
  teacher = tv = objective = None
  if phase == "kd":
    teacher, tv = _load_teacher(FLAGS.seed)
    objective = train.Objective(ce_weight=0.0, terms=(
        train.Term("kd", 1.0, temperature=1.0),))
  print(f"[{phase}] {name}, Adam 1e-3, batch 256, {FLAGS.epochs} epochs")
  variables, accs, secs = common.fit(
      model, optax.adam(1e-3), tx_, ty, ex, ey, epochs=FLAGS.epochs,
      batch_size=256, seed=FLAGS.seed, preprocess=_pre(), teacher=teacher,
      teacher_variables=tv, objective=objective)
  if phase == "teacher":
    os.makedirs(FLAGS.workdir, exist_ok=True)
    with open(_teacher_path(FLAGS.seed), "wb") as f:
      f.write(flax.serialization.to_bytes(variables))
  return {"last": accs[-1], "best": max(accs), "per_epoch": accs,
          "train_seconds": secs}


def _dafl_task(teacher):
  student = models.create("lenet5_half", num_classes=10)
  return dafl.DAFLTask(
      generator=dafl.Generator(img_size=32, channels=1, latent_dim=100),
      teacher_apply=teacher, student=student,
      student_init=lambda k: student.init(k, jnp.zeros((1, 32, 32, 1))),
      gen_tx=optax.adam(FLAGS.lr_g), student_tx=optax.adam(FLAGS.lr_s),
      cfg=dafl.DAFLConfig(batch_size=FLAGS.dafl_batch))


def run_dafl(mnist):
  _, _, ex, ey = mnist
  teacher, tv = _load_teacher(FLAGS.seed)
  task = _dafl_task(teacher)
  state = task.init_state(jax.random.key(FLAGS.seed))
  multi = jax.jit(train.make_multi_step(task.train_step))
  ev = jax.jit(train.make_eval_step(task.student, preprocess=_pre()))
  accs, t0 = [], time.time()
  n = FLAGS.dafl_iters
  for epoch in range(FLAGS.dafl_epochs):
    chunk = {"step": np.arange(epoch * n, (epoch + 1) * n, dtype=np.int32)}
    state, m = multi(state, tv, chunk)
    accs.append(common.evaluate(ev, state.student.variables, ex, ey))
    print(f"  epoch {epoch + 1}/{FLAGS.dafl_epochs}: oh {float(m['one_hot'][-1]):.3f}"
          f" ie {float(m['entropy'][-1]):.3f} a {float(m['activation'][-1]):.3f}"
          f" kd {float(m['kd'][-1]):.4f} agree {float(m['agreement'][-1]):.3f}"
          f" | test top1 {accs[-1]:.2f}%  ({time.time() - t0:.0f} s)",
          flush=True)
  imgs = dafl.generate(task.generator, state, jax.random.key(99), 40, 100)
  grid = image_grid.save_image_grid(
      os.path.join(FLAGS.workdir, f"dafl_generated_seed{FLAGS.seed}_b"
                   f"{FLAGS.dafl_batch}_lrg{FLAGS.lr_g}.png"),
      np.asarray(imgs), nrow=10)
  return {"last": accs[-1], "best": max(accs), "per_epoch": accs,
          "train_seconds": time.time() - t0, "grid": grid,
          "dafl_epochs": FLAGS.dafl_epochs, "iters": n,
          "batch": FLAGS.dafl_batch, "lr_g": FLAGS.lr_g, "lr_s": FLAGS.lr_s,
          "teacher_seed": FLAGS.teacher_seed,
          "last_metrics": {k: float(v[-1]) for k, v in m.items()},
          "image_range": float(np.ptp(np.asarray(imgs)))}


def run_measure(mnist):
  """Cost of one teacher epoch and of DAFL steps (compile excluded)."""
  out = {}
  tx_, ty, ex, ey = mnist
  t = models.create("lenet5", num_classes=10)
  step = jax.jit(train.make_multi_step(train.make_train_step(
      t, optax.adam(1e-3), preprocess=_pre())))
  st = train.create_train_state(t.init(jax.random.key(0), jnp.zeros(
      (1, 32, 32, 1))), optax.adam(1e-3), rng=jax.random.key(1))
  chunk = common.epoch_chunk(tx_[:256 * 20], ty[:256 * 20], 0, 0, 256)
  jax.block_until_ready(step(st, chunk))
  t0, c0 = time.time(), time.process_time()
  jax.block_until_ready(step(st, chunk))
  out["teacher_20_steps_s"] = time.time() - t0
  out["teacher_20_steps_cpu_s"] = time.process_time() - c0
  out["teacher_epoch_s_est"] = out["teacher_20_steps_s"] * 234 / 20
  task = _dafl_task(t)
  ds = task.init_state(jax.random.key(0))
  tv = st.variables
  fn = jax.jit(task.train_step)
  t0 = time.time()
  ds, _ = jax.block_until_ready(fn(ds, tv, task.batch(0)))
  out["dafl_compile_and_first_step_s"] = time.time() - t0
  t0, c0 = time.time(), time.process_time()
  for i in range(FLAGS.measure_steps):
    ds, _ = jax.block_until_ready(fn(ds, tv, task.batch(i + 1)))
  k = FLAGS.measure_steps
  out["dafl_step_s"] = (time.time() - t0) / k
  out["dafl_step_cpu_s"] = (time.process_time() - c0) / k
  out["dafl_epoch_s_est"] = out["dafl_step_s"] * FLAGS.dafl_iters
  out["dafl_200_epochs_h_est"] = out["dafl_epoch_s_est"] * 200 / 3600
  return out


def main(argv):
  del argv
  mnist = common.load_mnist()
  load0, t0 = common.machine_load(), time.time()
  if FLAGS.phase == "measure":
    res = run_measure(mnist)
  elif FLAGS.phase == "dafl":
    res = run_dafl(mnist)
  else:
    res = run_data_phase(FLAGS.phase, mnist)
  rec = {"script": "experiments/dafl_mnist.py", "command": " ".join(sys.argv),
         "phase": FLAGS.phase, "seed": FLAGS.seed, **res,
         "wall_seconds": time.time() - t0, "load_before": load0,
         "load_after": common.machine_load(), "jax": jax.__version__,
         "devices": str(jax.devices())}
  common.append_record(os.path.join(FLAGS.workdir, "runs.jsonl"), rec)
  print({k: v for k, v in rec.items() if k != "per_epoch"})


if __name__ == "__main__":
  app.run(main)
