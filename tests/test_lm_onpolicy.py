"""On-policy LM methods in the one trainer: MiniLLM and GKD continuing a
supervised student (``model.init_checkpoint`` / ``seed_experiment.
init_from``), on the tiny corpus of `test_lm_trainer`.

* A seed experiment through `experiments.main` (teacher, student, then the
  student continued, on-policy GKD and MiniLLM from it): MiniLLM runs
  through the CLI, its loop steps count its PPO updates, the budget columns
  and the baselines of the continued phases are in the table.
* The first MiniLLM update of the trainer equals the float64 transcription
  of the authors' code (`test_minillm`) on the samples of the step's key;
  the first on-policy GKD step equals TRL's ``compute_loss`` (at
  temperature 1) on the student's samples drawn at the sampling
  temperature (`test_gkd_trl_loss`).
* A MiniLLM run interrupted after an outer step resumes bit-identically;
  bad MiniLLM / init configs are one `ConfigError` line each; every mode of
  ``configs/lm_single.py`` and the main job parse.
"""

import importlib
import importlib.util
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_gkd_trl_loss import np_trl_compute_loss  # noqa: E402
from test_lm_trainer import _cli  # noqa: E402
from test_lm_trainer import _model  # noqa: E402
from test_lm_trainer import _sections  # noqa: E402
from test_lm_trainer import _teacher  # noqa: E402
from test_lm_trainer import corpus  # noqa: E402,F401  (fixture)
from test_lm_trainer import ROOT  # noqa: E402
from test_lm_trainer import SEQ  # noqa: E402
from test_minillm import ARGS  # noqa: E402
from test_minillm import EOS  # noqa: E402
from test_minillm import np_ppo_loss  # noqa: E402
from test_minillm import np_pt_loss  # noqa: E402
from test_minillm import np_run_sample  # noqa: E402

from kd_jax import trainer  # noqa: E402
from kd_jax.models import lm  # noqa: E402
from kd_jax.train import checkpoints as ckpt_lib  # noqa: E402
from kd_jax.trainer import ConfigError  # noqa: E402
from kd_jax.trainer import lm as lm_trainer  # noqa: E402
from kd_jax.trainer import reporting  # noqa: E402

NEW = 6  # sampled tokens after a SEQ - NEW = 10-token prompt


def _minillm(**kw):
  m = {"enabled": True, "num_rollouts": 8, "ppo_epochs": 2, "chunk_size": 4,
       "pt_positions": "completion"}
  m.update(kw)
  return m


CONFIG_FILE = '''
import ml_collections
import sys
sys.path.insert(0, {tests!r})
from test_lm_trainer import _sections, _model, _teacher
from test_lm_onpolicy import _minillm, NEW

def get_config():
  c = ml_collections.ConfigDict(_sections({data!r}))
  c.task, c.mode = "lm", "seed_experiment"
  c.model = dict(_model(), init_checkpoint="")
  c.teacher = _teacher(checkpoint="")
  se = c.seed_experiment = ml_collections.ConfigDict()
  se.seeds = (0,)
  cont = {{"generation": {{"max_new_tokens": NEW}}}}
  se.phases = ml_collections.ConfigDict({{
      "teacher": {{"mode": "train", "model": _teacher(),
                   "train": {{"num_steps": 6}}}},
      "student": {{"mode": "train"}},
      "student_continued": dict(cont, mode="train"),
      "gkd": dict(mode="distill", loss={{"ce_weight": 0.0, "terms": {{
          "js_divergence": {{"weight": 1.0, "beta": 0.5}}}}}},
          generation={{"max_new_tokens": NEW, "lmbda": 1.0,
                       "temperature": 0.9}}),
      "minillm": dict(cont, mode="distill", minillm=_minillm(),
                      train={{"num_steps": 8, "eval_every_steps": 4}},
                      loss={{"ce_weight": 1.0, "terms": {{}}}},
                      generation={{"max_new_tokens": NEW,
                                   "temperature": 1.0}}),
  }})
  se.order = ("teacher", "student", "student_continued", "gkd", "minillm")
  se.comparisons = (("minillm", "gkd"),)
  se.shared_phases = ("teacher",)
  se.student_phase = "student"
  se.distill_from = ml_collections.ConfigDict(
      {{"gkd": "teacher", "minillm": "teacher"}})
  se.init_from = ml_collections.ConfigDict(
      {{p: "student" for p in ("student_continued", "gkd", "minillm")}})
  se.baselines = ml_collections.ConfigDict(
      {{p: "student_continued" for p in ("gkd", "minillm")}})
  return c
'''


@pytest.fixture(scope="module")
def experiment(corpus, tmp_path_factory):  # noqa: F811
  tmp = tmp_path_factory.mktemp("onpolicy")
  cfg = tmp / "lm_onpolicy.py"
  cfg.write_text(CONFIG_FILE.format(tests=os.path.join(ROOT, "tests"),
                                    data=corpus))
  wd = tmp / "wd"
  out = _cli(str(cfg), str(wd))
  assert out.returncode == 0, out.stderr[-3000:]
  return str(cfg), str(wd), out.stdout


def _report(wd, phase):
  with open(os.path.join(wd, "seed0", phase, "report.json")) as f:
    return json.load(f)


def test_minillm_through_the_cli(experiment):
  _, wd, stdout = experiment
  with open(os.path.join(wd, "results.json")) as f:
    res = json.load(f)
  rep = _report(wd, "minillm")
  # 2 outer steps of U = ppo_epochs 2 x (8 rollouts / batch 4) = 4 updates.
  assert rep["steps"] == 8 and rep["steps_per_call"] == 4
  b, length = 4, SEQ - 1
  assert rep["tokens_per_step"] == b * NEW + b * NEW  # rollouts + pt
  assert rep["loss_tokens"] == 8 * 2 * b * NEW
  # Teacher: mixed sampling + rewards of 8 rollouts per 4 updates, then
  # each minibatch and pre-training batch.
  assert rep["teacher_tokens"] == pytest.approx(
      8 * (2 * 8 * length / 4 + 2 * b * length))
  assert rep["generated_tokens"] == pytest.approx(2 * 8 * NEW)
  assert rep["init_checkpoint"].endswith(os.path.join("seed0", "student"))
  with open(os.path.join(wd, "seed0", "minillm", "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  train = [r for r in recs if r["split"] == "train"]
  assert [r["step"] for r in train] == [4, 8]
  for r in train:
    assert all(np.isfinite(r[k]) for k in ("pg_loss", "reg_loss",
                                           "pt_loss", "loss", "reward"))
    assert r["response_len"] <= NEW
  assert [r["step"] for r in recs if r["split"] == "eval"] == [4, 8]
  assert res["gains"]["minillm"]["vs"] == "student_continued"
  g = res["gains"]["gkd"]["last_test_ppl"]["per_seed"][0]
  assert g == pytest.approx(res["phases"]["student_continued"][
      "last_test_ppl"][0] - res["phases"]["gkd"]["last_test_ppl"][0])
  assert res["phases"]["gkd"]["init_from"] == "student"
  # On-policy GKD (lmbda = 1) trains on NEW completion tokens per row.
  assert _report(wd, "gkd")["tokens_per_step"] == b * NEW
  for key in ("gain vs", "starts from", "loss tokens", "minillm vs gkd"):
    assert key in stdout, key


def test_continued_phases_start_from_the_student(experiment):
  """model.init_checkpoint: step 0 of the continued run holds the student
  phase's final parameters (its newest checkpoint)."""
  cfg, wd, _ = experiment
  from experiments import seed_experiment as se_lib
  spec = importlib.util.spec_from_file_location("_onpolicy_config", cfg)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  _, pc, _ = se_lib.phase_inputs(config, wd, "student_continued", 0, [0],
                                 {})
  task = trainer.make_task(trainer.parse(pc), str(wd) + "/unused")
  state = task.init_state()
  assert int(state.step) == 0
  abstract = jax.eval_shape(lambda: state.variables)
  want = ckpt_lib.load_teacher_variables(
      os.path.join(wd, "seed0", "student", "checkpoints"), abstract)
  for a, b in zip(jax.tree.leaves(state.variables), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  fresh = jax.tree.leaves(lm_trainer.init_variables(task.student, 0))
  assert any(not np.array_equal(a, b) for a, b in
             zip(fresh, jax.tree.leaves(state.variables)))


def _distill_config(corpus, wd, **kw):  # noqa: F811
  d = dict(_sections(corpus, 4), task="lm", mode="distill", seed=0,
           model=dict(_model(), init_checkpoint=os.path.join(
               wd, "seed0", "student")),
           teacher=_teacher(checkpoint=os.path.join(wd, "seed0",
                                                    "teacher")))
  d.update(kw)
  return ml_collections.ConfigDict(d)


def _first_call(cfg, workdir):
  """The run's first call: (task, the initial variables, the key of step
  0, constants, host batch, metrics, new state)."""
  task = trainer.make_task(trainer.parse(cfg), workdir)
  state = task.init_state()
  consts, _ = task.constants(reporting.Clock())
  fn, batch = task.call(0, task.rc.train.steps_per_call)
  variables = jax.tree.map(np.array, state.variables)  # copies (donation)
  key = jax.random.fold_in(state.rng, 0)  # step_utils.step_rng of step 0
  new, metrics = fn(task.placement.place_state(state), consts, batch)
  return (task, variables, key, consts, jax.tree.map(np.asarray, batch),
          jax.tree.map(np.asarray, metrics), new)


def _f64(z):
  return np.asarray(z, np.float64)


def test_minillm_first_update_is_the_authors(experiment, corpus, tmp_path):  # noqa: F811
  """One outer step with U = 1 update (ppo_epochs 1, 4 rollouts = one
  minibatch): pg, single-step and pre-training terms equal
  `test_minillm`'s transcription of microsoft/LMOps on the rollout the
  step's key draws (chunks of 2, teacher-mixed at alpha 0.2)."""
  _, wd, _ = experiment
  cfg = _distill_config(
      corpus, wd, loss={"ce_weight": 1.0, "terms": {}},
      generation={"max_new_tokens": NEW, "temperature": 1.0},
      minillm=_minillm(num_rollouts=4, ppo_epochs=1, chunk_size=2))
  task, variables, key, consts, batch, metrics, new = _first_call(
      cfg, str(tmp_path / "m"))
  assert int(new.step) == 1
  p = SEQ - NEW
  prompts = batch["tokens"][:, :p]
  assert not np.any(prompts[:, -1] == EOS)  # the transcription's mask
  # The rollout: make_update_fn's keys (generation, then the order).
  keys = jax.random.split(jax.random.split(key)[0], 2)
  gen = lm.make_generate_fn(task.student, max_new_tokens=NEW,
                            temperature=1.0, eos_id=EOS,
                            mix_in_model=task.teacher, mix_in_alpha=0.2)
  tv = consts["teacher"]
  tokens = np.concatenate([np.asarray(gen(variables, prompts[i:i + 2],
                                          keys[i // 2], tv))
                           for i in (0, 2)])
  pad = lambda z: np.concatenate([_f64(z), np.zeros_like(_f64(z)[:, :1])], 1)
  s_logits = pad(task.student.apply(variables, tokens[:, :-1])[0])
  t_logits = pad(task.teacher.apply(tv, tokens[:, :-1])[0])
  a = dict(ARGS)  # the authors' script values = the section's defaults
  store = np_run_sample(s_logits, t_logits, tokens, p, a)
  _, pg, reg = np_ppo_loss(s_logits, t_logits, store, tokens, p, a)
  pt = batch["pt_tokens"][:, 0]  # [b, U = 1, L]
  labels = pt[:, 1:].copy()
  labels[:, :p - 1] = -100  # pt_positions 'completion': targets >= p
  pt_loss, _ = np_pt_loss(_f64(task.student.apply(variables,
                                                  pt[:, :-1])[0]),
                          _f64(task.teacher.apply(tv, pt[:, :-1])[0]),
                          labels, 0.5)
  np.testing.assert_allclose(metrics["pg_loss"], [pg], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(metrics["reg_loss"], [reg], rtol=1e-4)
  np.testing.assert_allclose(metrics["pt_loss"], [pt_loss], rtol=1e-4)
  np.testing.assert_allclose(metrics["loss"], [pg + reg + pt_loss],
                             rtol=1e-4, atol=1e-5)


def test_gkd_first_step_is_trl(experiment, corpus, tmp_path):  # noqa: F811
  """On-policy GKD (lmbda = 1) in the trainer: the student samples at
  generation.temperature (0.5 here, so that its samples differ from T = 1
  ones), the loss is TRL's compute_loss at T = 1 on those samples (prompt
  and post-EOS labels -100)."""
  _, wd, _ = experiment
  cfg = _distill_config(
      corpus, wd, loss={"ce_weight": 0.0, "terms": {
          "js_divergence": {"weight": 1.0, "beta": 0.5}}},
      generation={"max_new_tokens": NEW, "lmbda": 1.0, "temperature": 0.5})
  task, variables, key, consts, batch, metrics, _ = _first_call(
      cfg, str(tmp_path / "g"))
  p = SEQ - NEW
  k_gen = jax.random.split(jax.random.split(key)[1], 3)[2]  # _complete's
  prompts = batch["tokens"][:, :p]

  def sample(temperature):
    return np.asarray(lm.generate(task.student, variables, prompts,
                                  max_new_tokens=NEW, rng=k_gen, eos_id=EOS,
                                  temperature=temperature))

  tokens = sample(0.5)
  assert not np.array_equal(tokens, sample(1.0))  # the test can tell
  labels = tokens.copy()
  labels[:, :p] = -100
  for row in labels:
    eos = np.flatnonzero(row[p:] == EOS)
    if eos.size:
      row[p + eos[0] + 1:] = -100
  s = _f64(task.student.apply(variables, tokens)[0])
  t = _f64(task.teacher.apply(consts["teacher"], tokens)[0])
  want = np_trl_compute_loss(s, t, labels, 0.5)
  np.testing.assert_allclose(metrics["js_divergence"], want, rtol=1e-4)


def test_minillm_resume_matches_an_uninterrupted_run(experiment, corpus,  # noqa: F811
                                                     tmp_path):
  _, wd, _ = experiment
  cfg = lambda: _distill_config(  # noqa: E731
      corpus, wd, loss={"ce_weight": 1.0, "terms": {}},
      generation={"max_new_tokens": NEW, "temperature": 1.0},
      minillm=_minillm(), train=dict(_sections(corpus)["train"],
                                     num_steps=8, eval_every_steps=4))
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  ref = trainer.train_and_evaluate(cfg(), a)
  shutil.copytree(a, b)
  shutil.rmtree(os.path.join(b, "checkpoints", "8"))
  os.remove(os.path.join(b, "report.json"))
  rep = trainer.train_and_evaluate(cfg(), b)
  assert rep["resumed_from_step"] == 4
  for k in ("last_validation_ppl", "last_test_ppl"):
    assert rep[k] == ref[k], k
  for x, y in zip(jax.tree.leaves(rep["_final_state"].params),
                  jax.tree.leaves(ref["_final_state"].params)):
    np.testing.assert_array_equal(x, y)


def test_bad_configs_are_one_line(experiment, corpus, tmp_path):  # noqa: F811
  _, wd, _ = experiment

  def err(**kw):
    base = dict(loss={"ce_weight": 1.0, "terms": {}},
                generation={"max_new_tokens": NEW, "temperature": 1.0},
                minillm=_minillm(),
                train=dict(_sections(corpus)["train"], num_steps=8,
                           eval_every_steps=4))
    base.update(kw)
    with pytest.raises(ConfigError) as e:
      trainer.parse(_distill_config(corpus, wd, **base))
    assert "\n" not in str(e.value)
    return str(e.value)

  assert err(loss={"ce_weight": 1.0, "terms": {"forward_kl": {}}}
             ).startswith("config.loss.terms: minillm.enabled: MiniLLM's")
  msg = err(train=dict(_sections(corpus)["train"], num_steps=6))
  assert msg.startswith("config.train.num_steps: 6 is not a multiple of 4")
  assert err(minillm=_minillm(num_rollouts=6)).startswith(
      "config.minillm.num_rollouts: 6 must be a multiple of train.batch_size")
  assert err(minillm=_minillm(chunk_size=3)).startswith(
      "config.minillm.chunk_size:")
  assert err(minillm=_minillm(ppo_epochs=0)).startswith(
      "config.minillm.ppo_epochs: must be an int >= 1")
  assert err(minillm=_minillm(kd_ratio=1.5)).startswith(
      "config.minillm.kd_ratio: must be in [0, 1]")
  assert err(minillm=_minillm(pt_positions="prompt")).startswith(
      "config.minillm.pt_positions:")
  assert err(generation={"max_new_tokens": NEW, "top_k": 5}).startswith(
      "config.generation.top_k: minillm.enabled")
  assert err(generation={"max_new_tokens": NEW, "lmbda": 0.5}).startswith(
      "config.generation: minillm.enabled")
  assert err(generation={"max_new_tokens": 0}).startswith(
      "config.generation.max_new_tokens: minillm.enabled")
  assert err(mode="train").startswith("config.mode: minillm.enabled")
  missing = dict(_model(), init_checkpoint=str(tmp_path / "nowhere"))
  assert err(model=missing).startswith(
      "config.model.init_checkpoint: path")
  # A checkpoint of another architecture: one line naming the key.
  other = _distill_config(corpus, wd, model=dict(
      _model(hidden_size=32), init_checkpoint=os.path.join(wd, "seed0",
                                                           "student")),
      loss={"ce_weight": 0.5, "terms": {"forward_kl": {"weight": 0.5}}})
  with pytest.raises(ConfigError, match="config.model.init_checkpoint: "):
    trainer.train_and_evaluate(other, str(tmp_path / "o"))


def test_missing_data_error_prints_the_prepare_command(tmp_path):
  cfg = ml_collections.ConfigDict(dict(
      _sections(str(tmp_path / "lm_data"), 4), task="lm", mode="train",
      seed=0, model=_model()))
  cfg.data.name = "jane_austen_v2048_s64"
  with pytest.raises(ConfigError) as e:
    trainer.parse(cfg)
  d = str(tmp_path / "lm_data")
  assert (f"mkdir -p {d} && (cd {d} && apt-get download r-cran-janeaustenr)"
          f" && python experiments/prepare_corpus.py --data_dir {d} --name "
          "jane_austen_v2048_s64 --vocab_size 2048 --seq_len 64"
          ) in str(e.value)


@pytest.mark.parametrize("mode", importlib.import_module(
    "configs.lm_single").MODES)
def test_single_run_configs_parse(mode, corpus):  # noqa: F811
  """Every mode of configs/lm_single.py is a valid run (on the tiny corpus:
  shorter continuations; teacher / init paths checked by the runs)."""
  c = importlib.import_module("configs.lm_single").get_config(mode)
  c.data.data_dir, c.data.name = corpus, "toy"
  if c.generation.max_new_tokens:
    c.generation.max_new_tokens = NEW
  rc = trainer.parse(c, check_paths=False)
  assert rc.mode == ("train" if mode in ("teacher", "train") else "distill")
  if mode in ("gkd", "minillm"):
    assert rc.model.init_checkpoint == "workdirs/lm_single/train"
  with pytest.raises(ValueError, match="unknown mode 'kd'"):
    importlib.import_module("configs.lm_single").get_config("kd")


def test_single_config_without_a_known_mode_is_one_line(tmp_path):
  for spec, want in (("configs/lm_single.py:kd", "unknown mode 'kd'"),
                     ("configs/lm_single.py", "needs a mode")):
    out = _cli(os.path.join(ROOT, spec), str(tmp_path / "wd"))
    errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1, out.stderr[-2000:]
    assert want in errors[0] and "gkd, minillm" in errors[0]
