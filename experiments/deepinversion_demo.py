"""DeepInversion / Adaptive DeepInversion end to end on CPU (exploration).

1. MNIST: a BatchNorm CNN teacher (`cnn_bn`) trained for `--teacher_epochs`
   with the engine's train step, an MLP student (`mlp_student`) trained for
   one epoch (the ADI competitor); then a batch of images is synthesized
   from the teacher (targets 0..9 cycling) with the CIFAR paper settings
   (BN weight 10, TV-l2 2.5e-5, Adam lr 0.05, jitter 2) -- with and without
   the ADI competition term -- and saved as PNG grids.
2. CIFAR: the zoo's ResNets (`--cifar_models`) with *random* weights (no
   CIFAR data on this machine, so no trained teacher): a few iterations,
   only to show the BN-statistics matching runs on every BN layer of the
   zoo's models; their PNGs are noise-like by construction.

  python -m experiments.deepinversion_demo --iterations=300
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import explore_common as common
from kd_jax import image_grid
from kd_jax import models
from kd_jax.distillers import deepinversion as di

FLAGS = flags.FLAGS
flags.DEFINE_integer("teacher_epochs", 1, "epochs of the BN CNN teacher")
flags.DEFINE_integer("iterations", 300, "inversion iterations (MNIST)")
flags.DEFINE_integer("batch", 40, "synthesized images per batch (MNIST)")
flags.DEFINE_float("adi", 0.2, "ADI competition weight of the second run")
flags.DEFINE_list("cifar_models", ["resnet8", "resnet20"], "zoo ResNets")
flags.DEFINE_integer("cifar_iterations", 5, "inversion iterations (CIFAR)")
flags.DEFINE_integer("cifar_batch", 16, "images per batch (CIFAR)")
flags.DEFINE_string("workdir", "workdirs/deepinversion", "outputs")


def _train(name, mnist, epochs, seed):
  tx_, ty, ex, ey = mnist
  model = models.create(name, num_classes=10)
  variables, accs, secs = common.fit(
      model, optax.adam(1e-3), tx_, ty, ex, ey, epochs=epochs,
      batch_size=128, seed=seed, preprocess=common.normalizer())
  return model, variables, accs[-1], secs


def _invert(tag, teacher, tv, *, shape, cfg, iterations, student=None,
            sv=None):
  t0 = time.time()
  targets = di.cycling_targets(shape[0], 10)
  images, last = di.synthesize(
      jax.random.key(0), teacher, tv, shape=shape, targets=targets, cfg=cfg,
      iterations=iterations, lr=0.05, student_apply=student,
      student_variables=sv, log_every=max(1, iterations // 5))
  logits, _ = teacher.apply(tv, images)
  out = {"teacher_top1_on_synth": float(jnp.mean(jnp.argmax(logits, -1)
                                                 == targets)),
         "last_metrics": last, "seconds": time.time() - t0}
  if student is not None:
    s_logits, _ = student.apply(sv, images)
    out["student_top1_on_synth"] = float(jnp.mean(
        jnp.argmax(s_logits, -1) == targets))
  out["png"] = image_grid.save_image_grid(
      os.path.join(FLAGS.workdir, f"{tag}.png"), np.asarray(images), nrow=10)
  print(tag, out, flush=True)
  return out


def main(argv):
  del argv
  load0, t0 = common.machine_load(), time.time()
  mnist = common.load_mnist()
  res = {}
  teacher, tv, tacc, tsec = _train("cnn_bn", mnist, FLAGS.teacher_epochs, 0)
  student, sv, sacc, _ = _train("mlp_student", mnist, 1, 1)
  res["mnist_teacher_top1"], res["mnist_teacher_seconds"] = tacc, tsec
  res["mnist_student_top1"] = sacc
  shape = (FLAGS.batch, 28, 28, 1)
  cfg = di.DeepInversionConfig()
  res["mnist_di"] = _invert("mnist_deepinversion", teacher, tv, shape=shape,
                            cfg=cfg, iterations=FLAGS.iterations,
                            student=student, sv=sv)
  cfg_adi = di.DeepInversionConfig(adi_weight=FLAGS.adi)
  res["mnist_adi"] = _invert("mnist_adaptive_deepinversion", teacher, tv,
                             shape=shape, cfg=cfg_adi,
                             iterations=FLAGS.iterations, student=student,
                             sv=sv)
  for name in FLAGS.cifar_models:
    m = models.create(name, num_classes=10)
    v = jax.jit(m.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    res[f"cifar_{name}_random_weights"] = _invert(
        f"cifar_{name}_random_weights", m, v,
        shape=(FLAGS.cifar_batch, 32, 32, 3), cfg=di.DeepInversionConfig(),
        iterations=FLAGS.cifar_iterations)
  rec = {"script": "experiments/deepinversion_demo.py",
         "command": " ".join(sys.argv), **res,
         "wall_seconds": time.time() - t0, "load_before": load0,
         "load_after": common.machine_load(), "jax": jax.__version__}
  common.append_record(os.path.join(FLAGS.workdir, "runs.jsonl"), rec)


if __name__ == "__main__":
  app.run(main)
