"""The trainer's wiring of self-distillation and of distillation chains
(issue 25): teacher-free distiller terms in mode 'train', CS-KD's same-class
pairs in both feeds, BYOT's per-exit evaluation, the seed experiment's
ensembles (BANE), comparisons and the TAKD table, and the MNIST TAKD recipe
against the main job's phases. Mock data, tiny runs."""

import importlib
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kd_jax import metrics_io
from kd_jax import trainer
from kd_jax.data import augment as augment_lib
from kd_jax.distillers import byot
from kd_jax.train import checkpoints as ckpt_lib
from kd_jax.trainer import classify
from kd_jax.trainer import classify_config
from kd_jax.trainer import feeds as feeds_lib
from kd_jax.trainer import programs


def _config(name, arg=None, debug=True, **overrides):
  m = importlib.import_module(f"configs.{name}")
  c = m.get_config(arg) if arg is not None else m.get_config()
  c.debug = debug
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


# ---------------------------------------------------------------- config --

def test_teacher_free_terms_are_accepted_in_train_mode_only():
  for name, arg in (("cifar100_byot", None), ("cifar100_cskd", None),
                    ("cifar100_tfkd", "reg-resnet18_cifar")):
    rc = trainer.parse(trainer.apply_debug(_config(name, arg)))
    assert rc.mode == "train" and rc.loss.terms and not rc.teachers
  c = trainer.apply_debug(_config("cifar100_byot"))
  c.loss.terms.kd = {"weight": 0.5, "temperature": 4.0}
  with pytest.raises(trainer.ConfigError, match=r"^config\.loss\.terms: mode "
                     r"'train' is supervised training \(or self-distillation "
                     r"with teacher-free distillers: byot, cskd, tfkd\); got "
                     r"KD terms \['kd'\] that need a teacher"):
    trainer.parse(c)


def test_same_class_pairs_follow_the_pair_view():
  assert classify_config.same_class_pairs(trainer.parse(trainer.apply_debug(
      _config("cifar100_cskd"))))
  assert not classify_config.same_class_pairs(trainer.parse(
      trainer.apply_debug(_config("cifar100_byot"))))
  c = _config("cifar100_cskd", **{
      "data.name": "imagenet2012", "model.num_classes": 1000,
      "model.name": "resnet18"})
  c = trainer.apply_debug(c)
  with pytest.raises(trainer.ConfigError, match=r"^config\.loss\.terms\.cskd: "
                     r"same-class pairs \(CS-KD\) need an in-memory dataset"):
    trainer.parse(c)


# ----------------------------------------------------------------- pairs --

class _State:
  def __init__(self, step, rng):
    self.step, self.rng = jnp.int32(step), rng


def test_pair_batches_host_and_device_agree_with_own_keys():
  """The partner view through both feeds: the same batch; partners of the
  anchor's class; `image_pair` = the partner's raw image cropped / flipped
  with the key fold_in(k_anchor, 3) (an independent transcription of the
  key derivation), so it is not the anchor slot's crop."""
  rc = trainer.parse(trainer.apply_debug(_config("cifar100_cskd")))
  data = feeds_lib.load_data(rc)
  feed, spe = data.train, data.train.steps_per_epoch
  assert feed.pipe.same_class_pairs
  step_batch = feeds_lib.make_step_batch(
      data, steps_per_epoch=spe, teacher_apply=None,
      precomputed_logits=False, separate_teacher_view=False)
  rng = jax.random.key(3)
  consts = {"data": {"image": feed.images, "label": feed.labels}}
  differs = 0
  for step in (0, spe + 1):  # two epochs: new partners, new keys
    st = _State(step, rng)
    dev, _ = step_batch(st, consts, feed.index_batch(step))
    host, _ = step_batch(st, {}, feed.batch(step))
    for k in ("image", "image_pair", "label", "label_pair", "pair_index"):
      np.testing.assert_array_equal(np.asarray(dev[k]), np.asarray(host[k]))
    epoch = step // spe
    idx, pidx = np.asarray(dev["index"]), np.asarray(dev["pair_index"])
    np.testing.assert_array_equal(pidx, feed.pipe.partners(epoch)[idx])
    np.testing.assert_array_equal(feed.labels[pidx], feed.labels[idx])
    ekey = jax.random.fold_in(jax.random.fold_in(
        rng, augment_lib.AUG_TAG), epoch)
    for i, (a, p) in enumerate(zip(idx, pidx)):
      key = jax.random.fold_in(jax.random.fold_in(ekey, int(a)), 3)
      want = augment_lib.normalize(augment_lib.random_crop_flip(
          key, feed.images[p][None], padding=4, flip=True), data.mean,
                                   data.std)[0]
      np.testing.assert_allclose(np.asarray(dev["image_pair"][i]),
                                 np.asarray(want), rtol=0, atol=1e-6)
      if a == p:  # its own partner: another view of the same image
        differs += not np.array_equal(np.asarray(dev["image_pair"][i]),
                                      np.asarray(dev["image"][i]))
  assert differs > 0
  data.close()


# ------------------------------------------------------------------ BYOT --

def test_byot_exits_are_evaluated_and_reported(tmp_path):
  """A BYOT run reports every exit's top-1 and the ensemble's (eval
  records, report.json, the task's metrics), equal to
  `byot.make_exit_eval_step` (tested against NumPy) on the final state."""
  c = _config("cifar100_byot", **{"model.name": "resnet8"})
  rep = trainer.train_and_evaluate(c, str(tmp_path))
  rc = trainer.parse(trainer.apply_debug(c))
  keys = ["byot/top1_exit1", "byot/top1_exit2", "byot/top1_exit3",
          "byot/top1_ensemble"]  # resnet8: 3 stages -> 2 exits + its own
  metrics = classify.ClassifyTask.metrics(rc)
  assert [m.key for m in metrics[3:]] == keys
  assert [m.table for m in metrics[3:]] == [True, True, False, True]
  evals = [r for r in metrics_io.read_jsonl(str(tmp_path / "metrics.jsonl"))
           if r["split"] == "eval"]
  assert set(keys) <= set(evals[-1])
  on_disk = json.loads((tmp_path / "report.json").read_text())
  state = rep["_final_state"]
  data = feeds_lib.load_data(rc)
  student, _ = classify.create_models(rc)
  term = trainer.build_objective(rc.loss).terms[0]
  step = jax.jit(byot.make_exit_eval_step(
      student, term.distiller, preprocess=feeds_lib.eval_preprocess(data)))
  outs = [jax.device_get(step(state.variables, state.distiller_params["byot"],
                              state.distiller_state["byot"], b))
          for b in data.eval_batches()]
  data.close()
  n = sum(float(o["count"]) for o in outs)
  for k in keys:
    want = sum(float(o[k.split("/")[1]]) * float(o["count"])
               for o in outs) / n
    assert on_disk[f"last_{k}"] == pytest.approx(want, abs=1e-6)
    assert evals[-1][k] == pytest.approx(want, abs=1e-6)
  assert on_disk["last_byot/top1_exit3"] == pytest.approx(on_disk["last_top1"])


# ------------------------------------------------------ seed experiments --

def _tiny_seed_experiment():
  c = _config("mnist_seed")
  ph = c.seed_experiment.phases
  c.seed_experiment.phases = ml_collections.ConfigDict({
      k: ph[k].to_dict() for k in ("student", "teacher_mlp", "distill_mlp")})
  c.seed_experiment.order = ("student", "teacher_mlp", "distill_mlp")
  c.seed_experiment.distill_from = ml_collections.ConfigDict(
      {"distill_mlp": "teacher_mlp"})
  c.seed_experiment.shared_phases = ()
  c.seed_experiment.ensembles = ml_collections.ConfigDict(
      {"ens": ("student", "distill_mlp")})
  c.seed_experiment.comparisons = (("ens", "student"),
                                   ("distill_mlp", "student"))
  return c


def test_seed_experiment_ensemble(tmp_path):
  """`seed_experiment.ensembles`: the mean of the members' softmax over the
  test set, recomputed here in float64 NumPy from their checkpoints."""
  from experiments import seed_experiment
  c = _tiny_seed_experiment()
  res = seed_experiment.run(c, str(tmp_path))
  ens = res["phases"]["ens"]
  assert ens["mode"] == "ensemble" and ens["best_top1"] == [None]
  assert ens["members"] == ["student", "distill_mlp"]
  pc = seed_experiment.phase_config(c, "student", 0)
  rc = trainer.parse(pc)
  data = feeds_lib.load_data(rc)
  student, _ = classify.create_models(rc)
  abstract = jax.eval_shape(lambda r: programs.init_variables(
      student, r, data.image_shape), jax.random.key(0))
  probs, labels = 0.0, None
  for p in ("student", "distill_mlp"):
    v = ckpt_lib.load_teacher_variables(
        str(tmp_path / "seed0" / p / "checkpoints"), abstract)
    zs, ys = [], []
    for b in data.eval_batches():
      b = feeds_lib.eval_preprocess(data)(b)
      keep = np.asarray(b.get("mask", np.ones(len(b["label"]), bool)))
      zs.append(np.asarray(student.apply(v, b["image"], train=False)[0],
                           np.float64)[keep])
      ys.append(np.asarray(b["label"])[keep])
    z = np.concatenate(zs)
    e = np.exp(z - z.max(1, keepdims=True))
    probs = probs + e / e.sum(1, keepdims=True) / 2
    labels = np.concatenate(ys)
  data.close()
  want = float(np.mean(probs.argmax(1) == labels))
  assert ens["last_top1"][0] == pytest.approx(want)
  rep = json.loads((tmp_path / "seed0" / "ens" / "report.json").read_text())
  assert rep["last_top1"] == pytest.approx(want)
  g = res["comparisons"]["ens vs student"]
  assert set(g) == {"last_top1"}  # an ensemble has no 'best'
  assert g["last_top1"]["per_seed"] == pytest.approx(
      [want - res["phases"]["student"]["last_top1"][0]])
  md = (tmp_path / "results.md").read_text()
  assert "| ens | ensemble | mlp_student x2 (student, distill_mlp) |" in md


def test_seed_experiment_ensemble_validation():
  from experiments import seed_experiment
  c = _tiny_seed_experiment()
  c.seed_experiment.ensembles = ml_collections.ConfigDict(
      {"ens": ("student", "teacher_mlp")})
  with pytest.raises(trainer.ConfigError, match=r"ensembles\.ens: the members "
                     r".* must share one architecture"):
    seed_experiment.validate(c)
  c.seed_experiment.ensembles = ml_collections.ConfigDict(
      {"ens": ("student", "nope")})
  with pytest.raises(trainer.ConfigError, match=r"ensembles\.ens: .*expected "
                     r"phases"):
    seed_experiment.validate(c)
  c.seed_experiment.ensembles = ml_collections.ConfigDict()
  c.seed_experiment.comparisons = (("ens", "student"),)
  with pytest.raises(trainer.ConfigError, match=r"comparisons"):
    seed_experiment.validate(c)


def _fake_report(mode, model, teacher, top1):
  return {"mode": mode, "model": model, "teacher": teacher, "steps": 10,
          "epochs": 1.0, "wall_s": 1.0, "train_s": 1.0, "last_top1": top1,
          "best_top1": top1, "last_top5": 1.0, "best_top5": 1.0,
          "last_loss": 0.1, "best_loss": 0.1}


def test_takd_table_gains_and_comparisons():
  """TAKD's table (no training): the assistant's row has no gain (another
  network), the students' gains and the TAKD-vs-direct comparison are the
  paired differences."""
  from experiments import seed_experiment
  c = _config("mnist_takd", debug=False)
  alone, takd, direct = [0.97, 0.975], [0.978, 0.976], [0.98, 0.981]
  reports = {
      "student": [_fake_report("train", "mlp_student", None, v)
                  for v in alone],
      "teacher_cnn": [_fake_report("train", "cnn_teacher", None, 0.99)] * 2,
      "ta": [_fake_report("distill", "mlp_teacher", "cnn_teacher", 0.979)] * 2,
      "student_takd": [_fake_report("distill", "mlp_student", "mlp_teacher",
                                    v) for v in takd],
      "student_direct": [_fake_report("distill", "mlp_student", "cnn_teacher",
                                      v) for v in direct]}
  res = seed_experiment.summarize(c, reports)
  assert set(res["gains"]) == {"student_takd", "student_direct"}
  np.testing.assert_allclose(res["gains"]["student_takd"]["last_top1"][
      "per_seed"], np.subtract(takd, alone))
  np.testing.assert_allclose(
      res["comparisons"]["student_takd vs student_direct"]["last_top1"][
          "per_seed"], np.subtract(takd, direct))
  md = seed_experiment.format_markdown(c, res)
  ta_row = next(l for l in md.splitlines() if l.startswith("| ta |"))
  assert ta_row.count("n/a (other network)") == 2
  assert "| student_takd vs student_direct | -0.35 [" in md


def test_mnist_takd_shares_the_main_jobs_phases():
  """The TAKD recipe's teacher / student-alone / direct phases are the main
  job's configs (so their runs are bit-identical on one machine)."""
  from experiments import seed_experiment
  takd, main = _config("mnist_takd", debug=False), _config("mnist_seed",
                                                          debug=False)
  for seed in main.seed_experiment.seeds:
    for a, b in (("student", "student"), ("teacher_cnn", "teacher_cnn"),
                 ("student_direct", "distill_cnn")):
      x = seed_experiment.phase_config(takd, a, seed).to_dict()
      y = seed_experiment.phase_config(main, b, seed).to_dict()
      x["report"].pop("notes"), y["report"].pop("notes")
      assert x == y, (a, b)
  ph = takd.seed_experiment.phases
  assert (ph.ta.model.name, ph.ta.teacher.name, ph.student_takd.teacher.name,
          ph.student_takd.model.name) == ("mlp_teacher", "cnn_teacher",
                                          "mlp_teacher", "mlp_student")
