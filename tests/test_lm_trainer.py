"""The language-model trainer end to end on a tiny corpus made here.

Every mode runs through `experiments.main` (one subprocess: an LM seed
experiment with a shared teacher); resume, the top-k cache round trip through
grain and the bad-input messages run in process.
"""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from kd_jax import trainer
from kd_jax.data import text
from kd_jax.trainer import ConfigError
from kd_jax.trainer import lm as trainer_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ, VOCAB = 16, 300
WORDS = ("the lady said that her sister was not at home and mister darcy "
         "walked to the house with miss bennet").split()


def _docs(n, seed):
  rng = np.random.default_rng(seed)
  return [" ".join(" ".join(WORDS[i:i + 4]) for i in
                   rng.integers(0, len(WORDS) - 4, 60)) + "."
          for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A prepared dataset: BPE tokenizer (V=300), packed 16-token sequences."""
  root = tmp_path_factory.mktemp("lm_data")
  tok = text.train_bpe_tokenizer(_docs(8, 0), vocab_size=VOCAB)
  splits = {}
  for name, (n, seed, rows) in {"train": (8, 0, 64), "validation": (2, 1, 8),
                                "test": (2, 2, 8)}.items():
    stream = text.encode_documents(tok, _docs(n, seed), eos_id=1)
    splits[name] = text.pack_stream(stream, SEQ)[:rows]
  text.write_tfds_tokens(str(root), "toy", splits, tokenizer=tok)
  return str(root)


def _model(**ov):
  base = dict(hidden_size=16, intermediate_size=32, num_layers=1,
              num_heads=2, num_kv_heads=1)
  base.update(ov)
  return {"preset": "llama_tiny", "hf_dir": "", "dtype": "float32",
          "remat": False, "overrides": base}


def _teacher(**kw):
  return dict(_model(hidden_size=32, intermediate_size=48), **kw)


def _sections(data_dir, steps=4):
  return {
      "data": {"data_dir": data_dir, "name": "toy", "version": "1.0.0",
               "eval_sequences": 0, "train_sequences": 0,
               "eval_splits": ("validation", "test")},
      "train": {"batch_size": 4, "eval_batch_size": 8, "num_steps": steps,
                "num_epochs": 0, "log_every_steps": 2, "eval_every_steps": 2},
      "optimizer": {"name": "adamw", "schedule": "warmup_cosine",
                    "learning_rate": 1e-2, "warmup_steps": 1,
                    "weight_decay": 0.0, "grad_clip": 1.0},
      "checkpoint": {"enabled": True, "keep": 2, "keep_best": False,
                     "async_save": False, "every_epochs": 0}}


def _kd(ce=0.5, **terms):
  return {"ce_weight": ce, "terms": terms or {
      "forward_kl": {"weight": 0.5, "temperature": 1.0}}}


def _run_config(data_dir, mode="train", teacher_ckpt="", steps=4, **extra):
  d = dict(_sections(data_dir, steps), task="lm", mode=mode, seed=0,
           model=_model())
  if mode == "distill":
    d["teacher"] = _teacher(checkpoint=teacher_ckpt)
    d["loss"] = _kd()
  for k, v in extra.items():
    d[k] = v
  return ml_collections.ConfigDict(d)


CONFIG_FILE = '''
import ml_collections
import sys
sys.path.insert(0, {tests!r})
from test_lm_trainer import _sections, _model, _teacher, _kd

def _distill(**kw):
  return dict({{"mode": "distill", "loss": _kd()}}, **kw)

def get_config():
  c = ml_collections.ConfigDict(_sections({data!r}))
  c.task, c.mode = "lm", "seed_experiment"
  c.model = _model()
  c.teacher = _teacher(checkpoint="")
  se = c.seed_experiment = ml_collections.ConfigDict()
  se.seeds = (0,)
  jsd = {{"weight": 1.0, "beta": 0.5, "temperature": 0.9}}
  se.phases = ml_collections.ConfigDict({{
      "teacher": {{"mode": "train", "model": _teacher(),
                   "train": {{"num_steps": 6}}}},
      "student": {{"mode": "train"}},
      "forward_kl": _distill(),
      "reverse_kl_fused": _distill(loss=dict(
          _kd(reverse_kl={{"weight": 0.5, "temperature": 1.0}}),
          fused_head=True, chunk_size=64)),
      "jsd": _distill(loss=_kd(js_divergence={{"weight": 0.5,
                                                "beta": 0.5}})),
      "seq_kd": _distill(loss={{"ce_weight": 1.0, "terms": {{}}}},
                         generation={{"max_new_tokens": 4,
                                      "seq_kd": True}}),
      "topk": _distill(teacher={{"precompute": True, "topk": 8}},
                       loss=_kd(topk_kd={{"weight": 0.5, "tail": "bucket"}})),
      "gkd": _distill(loss=_kd(0.0, js_divergence=jsd),
                      generation={{"max_new_tokens": 4, "lmbda": 1.0,
                                   "temperature": 0.9}}),
      "inter": _distill(loss=_kd(
          forward_kl={{"weight": 0.5}},
          hidden={{"distiller": "tinybert", "weight": 0.5}},
          attention={{"distiller": "minilm", "weight": 0.5,
                      "relations": ("qq", "kk", "vv"),
                      "num_relation_heads": 2}})),
  }})
  se.order = ("teacher", "student", "forward_kl", "reverse_kl_fused", "jsd",
              "seq_kd", "topk", "gkd", "inter")
  se.comparisons = (("inter", "forward_kl"),)
  se.shared_phases = ("teacher",)
  se.student_phase = "student"
  se.distill_from = ml_collections.ConfigDict(
      {{p: "teacher" for p in se.order[2:]}})
  return c
'''


def _cli(config_path, workdir, *flags):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)  # one CPU device, like a user's run
  return subprocess.run(
      [sys.executable, "-m", "experiments.main", f"--config={config_path}",
       f"--workdir={workdir}", *flags], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def experiment(corpus, tmp_path_factory):
  """Every mode once, through experiments.main (LM seed experiment)."""
  tmp = tmp_path_factory.mktemp("lm_exp")
  cfg = tmp / "lm_toy.py"
  cfg.write_text(CONFIG_FILE.format(tests=os.path.join(ROOT, "tests"),
                                    data=corpus))
  wd = tmp / "wd"
  out = _cli(str(cfg), str(wd))
  assert out.returncode == 0, out.stderr[-3000:]
  return str(cfg), str(wd), out.stdout


def test_every_mode_runs_end_to_end(experiment):
  _, wd, stdout = experiment
  with open(os.path.join(wd, "results.json")) as f:
    res = json.load(f)
  phases = ("teacher", "student", "forward_kl", "reverse_kl_fused", "jsd",
            "seq_kd", "topk", "gkd", "inter")
  assert set(res["phases"]) == set(phases)
  for p in phases:
    for k in ("last_validation_ppl", "best_validation_ppl", "last_test_ppl"):
      v = res["phases"][p][k][0]
      # Better than a uniform guess over the vocabulary: training happened.
      assert np.isfinite(v) and v < VOCAB, (p, k, v)
    with open(os.path.join(wd, "seed0", p, "report.json")) as f:
      rep = json.load(f)
    assert rep["finished"] and rep["tokens_per_sec"] > 0
  # The paired gain is student-alone minus distilled perplexity.
  g = res["gains"]["jsd"]["last_test_ppl"]["per_seed"][0]
  want = (res["phases"]["student"]["last_test_ppl"][0]
          - res["phases"]["jsd"]["last_test_ppl"][0])
  assert g == pytest.approx(want)
  assert "gain test ppl last" in stdout and "steady tokens/s" in stdout
  with open(os.path.join(wd, "results.md")) as f:
    assert "| gkd | distill |" in f.read()
  # Logit KD + hidden states + attention relations vs logit KD, paired.
  c = res["comparisons"]["inter vs forward_kl"]["last_test_ppl"]
  want = (res["phases"]["forward_kl"]["last_test_ppl"][0]
          - res["phases"]["inter"]["last_test_ppl"][0])
  assert c["per_seed"][0] == pytest.approx(want)
  with open(os.path.join(wd, "seed0", "inter", "report.json")) as f:
    rep = json.load(f)
  assert rep["finished"]


def test_rerun_reuses_finished_phases(experiment):
  cfg, wd, _ = experiment
  out = _cli(cfg, wd, "--config.seed_experiment.seeds=(0,)")
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.count("done before with the same config") == 9


def test_topk_cache_round_trip_through_grain(experiment, corpus):
  """The cache the top-k phase wrote, read back through grain, equals the
  teacher's top-k log-softmax computed here in float64 (bf16 rounding)."""
  from kd_jax.models import lm
  _, wd, _ = experiment
  teacher_wd = os.path.join(wd, "seed0", "teacher")
  folder = os.path.join(corpus, "toy", "1.0.0")
  rc = trainer.parse(_run_config(
      corpus, "distill", teacher_wd, teacher=_teacher(
          checkpoint=teacher_wd, precompute=True, topk=8),
      loss=_kd(topk_kd={"weight": 0.5})))
  task = trainer.make_task(rc, teacher_wd)
  model, tv = task.teacher, task.teacher_variables()
  tokens, _ = text.load_tfds_tokens(folder, "train")
  cache = text.TopkCacheSource(os.path.join(teacher_wd, "topk_cache"),
                               "train", 8)
  ds = text.lm_dataset(text.ZipSource(tokens, cache), batch_size=4,
                       shuffle=False, num_epochs=1)
  batch = ds[1]
  np.testing.assert_array_equal(
      batch["tokens"], np.stack([tokens[i]["tokens"] for i in range(4, 8)]))
  logits = np.asarray(model.apply(tv, batch["tokens"][:, :-1])[0],
                      np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  want_idx = np.argsort(-logp, -1)[..., :8]
  want_lp = np.take_along_axis(logp, want_idx, -1)
  assert batch["teacher_topk_logprobs"].shape == (4, SEQ - 1, 8)
  np.testing.assert_allclose(batch["teacher_topk_logprobs"], want_lp,
                             rtol=1e-2, atol=1e-2)  # stored as bfloat16
  got = np.take_along_axis(logp, batch["teacher_topk_indices"], -1)
  np.testing.assert_allclose(got, want_lp, atol=1e-4)  # same set, ties aside


def test_resume_matches_an_uninterrupted_run(corpus, tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  ref = trainer.train_and_evaluate(_run_config(corpus), a)
  trainer.train_and_evaluate(_run_config(corpus), b)
  # Interrupted after step 2: the step-4 checkpoint and report never written.
  import shutil
  shutil.rmtree(os.path.join(b, "checkpoints", "4"))
  os.remove(os.path.join(b, "report.json"))
  rep = trainer.train_and_evaluate(_run_config(corpus), b)
  assert rep["resumed_from_step"] == 2
  for k in ("last_validation_ppl", "last_test_ppl", "best_validation_ppl"):
    assert rep[k] == pytest.approx(ref[k], rel=1e-5), k
  with open(os.path.join(b, "metrics.jsonl")) as f:
    steps = [json.loads(l)["step"] for l in f if '"eval"' in l]
  assert steps == [2, 4]  # no duplicated records after the resume


def test_bad_inputs_are_one_clear_error(corpus, tmp_path):
  def err(cfg):
    with pytest.raises(ConfigError) as e:
      trainer.train_and_evaluate(cfg, str(tmp_path / "wd"))
    return str(e.value)

  missing = _run_config(str(tmp_path / "nowhere"))
  assert "data folder" in err(missing) and "not found" in err(missing)
  small_vocab = _run_config(corpus)
  small_vocab.model.overrides.vocab_size = 100
  msg = err(small_vocab)
  assert msg.startswith("config.model:") and "tokenizer vocabulary" in msg
  short = _run_config(corpus)
  short.model.overrides.max_position_embeddings = SEQ // 2
  msg = err(short)
  assert "longer than the model's context" in msg and str(SEQ) in msg
  no_teacher = _run_config(corpus, "distill")
  assert "needs a teacher" in err(no_teacher)
  ckpt = _run_config(corpus, "distill", str(tmp_path / "no_teacher_run"))
  assert err(ckpt).startswith("config.teacher.checkpoint:")


def test_teacher_student_vocab_mismatch_needs_vocab_size(corpus, tmp_path):
  t = str(tmp_path / "t")
  tc = _run_config(corpus, steps=1)
  tc.model = _model(hidden_size=32, intermediate_size=48,
                    vocab_size=VOCAB + 12)  # a padded vocabulary
  trainer.train_and_evaluate(tc, t)
  cfg = _run_config(corpus, "distill", t, steps=1)
  cfg.teacher.overrides.vocab_size = VOCAB + 12
  with pytest.raises(ConfigError, match=r"loss\.terms.*vocab_size"):
    trainer.train_and_evaluate(cfg, str(tmp_path / "s"))
  cfg.loss.terms.forward_kl.vocab_size = VOCAB
  rep = trainer.train_and_evaluate(cfg, str(tmp_path / "s"))
  assert np.isfinite(rep["last_test_ppl"])


def test_cli_bad_data_folder_is_one_line(corpus, tmp_path):
  cfg = tmp_path / "c.py"
  cfg.write_text(CONFIG_FILE.format(tests=os.path.join(ROOT, "tests"),
                                    data=str(tmp_path / "missing")))
  out = _cli(str(cfg), str(tmp_path / "wd"))
  assert out.returncode == 2
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "data folder" in errors[0], out.stderr[-2000:]
  assert "Traceback" not in out.stderr


def test_main_job_config_validates_and_scales(corpus):
  """configs/lm_jane_austen.py: every phase parses (on the tiny corpus) and
  `scale` multiplies widths, steps and the students' sequences."""
  import importlib
  from experiments import seed_experiment as se_lib
  c = importlib.import_module("configs.lm_jane_austen").get_config()
  c.data.data_dir, c.data.name = corpus, "toy"
  stage_b = ("student_continued", "gkd_off_policy", "gkd_on_policy",
             "minillm")
  for p in stage_b:  # the toy sequences have 16 tokens
    c.seed_experiment.phases[p].generation.max_new_tokens = 4
  se_lib.validate(c)
  assert se_lib.phase_order(c)[0] == "teacher"
  base = se_lib.phase_config(c, "forward_kl", 0)
  c.seed_experiment.scale = 2.0
  big = se_lib.phase_config(c, "forward_kl", 0)
  assert big.train.num_steps == 2 * base.train.num_steps
  assert big.data.train_sequences == 2 * base.data.train_sequences
  assert big.teacher.overrides.hidden_size == 2 * 128  # llama_1m: D=128
  assert se_lib.phase_config(c, "teacher", 0).data.train_sequences == 0
  # MiniLLM's steps stay whole outer steps (U = 4 x 32 / 16 = 8 updates).
  c.seed_experiment.scale = 0.25
  m = se_lib.phase_config(c, "minillm", 0)
  assert (m.train.num_steps, m.train.eval_every_steps) == (32, 8)
  se_lib.validate(c)
  # Stage B: every row the same loss tokens (32 rows x 4 continuation
  # positions here) per update, starting from the supervised student.
  c.seed_experiment.scale = 1.0
  for p in stage_b:
    rc = trainer.parse(se_lib.phase_config(c, p, 0), check_paths=False)
    task_budget = trainer_lm.budget(rc)
    assert task_budget["loss"] == 32 * 4, p
    assert c.seed_experiment.init_from[p] == "student"


def test_unknown_keys_are_refused_with_the_closest_name(corpus):
  """The one schema refuses unknown keys in the LM task too."""
  c = _run_config(corpus, "distill", "/unused")
  c.loss.terms.forward_kl.temprature = 2.0
  with pytest.raises(ConfigError, match=r"loss\.terms\.forward_kl.*"
                     r"unknown hyperparameter 'temprature'"):
    trainer.parse(c)
  c = _run_config(corpus)
  c.data.batch_size = 4  # (the LM schema of earlier versions)
  with pytest.raises(ConfigError, match=r"config\.data\.batch_size: unknown "
                     r"key"):
    trainer.parse(c)
  c = _run_config(corpus)
  c.generation = {"max_new_token": 4}
  with pytest.raises(ConfigError, match=r"config\.generation\.max_new_token: "
                     r"unknown key; did you mean 'max_new_tokens'\?"):
    trainer.parse(c)
  c = _run_config(corpus, "distill", "/unused")
  c.loss.terms.forward_kl.temperature = 0.0
  with pytest.raises(ConfigError, match=r"config\.loss\.terms\.forward_kl: "
                     r".*temperature"):
    trainer.parse(c, check_paths=False)
