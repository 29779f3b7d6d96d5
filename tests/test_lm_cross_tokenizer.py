"""The LM trainer across tokenizers: the step's wiring, runs, bits per byte.

* The compiled cross-tokenizer step (`kd_jax.train.lm_cross_steps`) against
  float64 NumPy on real tokenizers (byte-level BPE 2,048 student, metaspace
  4,096 teacher trained on the corpus excerpt): the teacher reads its own
  re-tokenization (`Aligner.align`'s token lists, not the batch's index
  arrays), groups merged by the chain rule, CE + extended ULD + hybrid +
  positional ULD with their weights; offline (aligned batch) and on-policy
  (the samples re-tokenized inside the step by the host callback).
* Through the trainer on a tiny corpus prepared twice (byte-level V=300 for
  the student, metaspace V=330 for the teacher, same documents): an LM seed
  experiment through ``python -m experiments.main`` (teacher trained on its
  own tokens, student alone, offline extended ULD, on-policy hybrid, gains
  on bits per byte); bits per byte of a byte-level and a metaspace run
  against an independent computation (the model's float64 NLL over the
  UTF-8 bytes of the decoded held-out targets); an interrupted on-policy run
  resumed equals an uninterrupted one; the config errors.
"""

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from kd_jax import trainer
from kd_jax.data import align
from kd_jax.data import text
from kd_jax.models import lm as lm_models
from kd_jax.train import create_train_state
from kd_jax.train import lm_cross_steps as xsteps
from kd_jax.train import lm_steps
from kd_jax.trainer import ConfigError
from tests import cross_tokenizer_testing as ctt
from tests.test_losses_cross_tokenizer import np_hybrid
from tests.test_losses_cross_tokenizer import np_log_softmax
from tests.test_losses_cross_tokenizer import np_merge
from tests.test_losses_cross_tokenizer import np_sorted_l1
from tests.test_lm_trainer import _cli, _docs, _model, _sections, _teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 16
TEACHER_CTX = 32  # the teacher's context: room for its longer windows


# --- the compiled step vs float64 NumPy ------------------------------------


def _tiny(vocab, seed):
  cfg = lm_models.preset_config("llama_tiny", vocab_size=vocab,
                                hidden_size=16, intermediate_size=32,
                                max_position_embeddings=64)
  model = lm_models.Transformer(cfg, dtype=jnp.float32)
  v = model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))
  return model, v


def _np_expected(s_logits, t_of, tokens, mask, aligner, terms, ce_weight):
  """Loss and per-term values from the token lists, float64."""
  b = tokens.shape[0]
  per = {t.label: np.zeros(b) for t in terms}
  ce_num = ce_den = 0.0
  for i in range(b):
    al = aligner.align(tokens[i], mask[i])
    t_logits = t_of(al.teacher_ids)  # [n_t - 1, Vt], the teacher's own ids
    s_lp = np_log_softmax(s_logits[i].astype(np.float64))
    t_lp = np_log_softmax(t_logits.astype(np.float64))
    w = mask[i, 1:]
    nll = -s_lp[np.arange(len(w)), tokens[i, 1:]]
    ce_num += nll[w].sum()
    ce_den += w.sum()
    groups = [(s, t) for s, t, ok in al.groups if ok]
    s_m = np_merge(s_lp, tokens[i], [g[0] for g in groups], "chain")
    t_m = np_merge(t_lp, al.teacher_ids, [g[1] for g in groups], "chain")
    for term in terms:
      if term.name == "extended_uld":
        d = np_sorted_l1(s_m, t_m)
      elif term.name == "hybrid":
        d = np_hybrid(s_m, t_m, *term.matched_ids, term.beta, None, None)
      else:  # positional: k-th trained row of each side
        s_rows = np.flatnonzero(w)
        t_rows = np.flatnonzero(al.teacher_mask[1:])
        n = min(len(s_rows), len(t_rows))
        d = np_sorted_l1(np.exp(s_lp[s_rows[:n]]), np.exp(t_lp[t_rows[:n]]))
      per[term.label][i] = d.mean() if len(d) else 0.0
  values = {k: v.mean() for k, v in per.items()}
  loss = ce_weight * ce_num / ce_den + sum(
      t.weight * values[t.label] for t in terms)
  return loss, values


@pytest.fixture(scope="module")
def step_inputs():
  s_tok, t_tok = ctt.tokenizer("bpe2k"), ctt.tokenizer("meta4k")
  aligner = align.Aligner(s_tok, t_tok)
  tokens = ctt.windows("bpe2k", 24, 3, seed=5)
  student, s_vars = _tiny(2048, 0)
  teacher, t_vars = _tiny(4096, 1)
  ids = align.vocab_mapping(s_tok, t_tok, by="bytes")
  terms = (xsteps.CrossTerm("extended_uld", 0.7),
           xsteps.CrossTerm("hybrid", 0.4, beta=0.3, matched_ids=ids),
           xsteps.CrossTerm("uld", 0.2, label="positional"))
  lt = align.teacher_length_for(aligner, tokens) + 8

  def t_of(ids_):
    x = jnp.asarray(ids_[None, :-1], jnp.int32)
    return np.asarray(teacher.apply(t_vars, x, train=False)[0][0])

  return dict(aligner=aligner, tokens=tokens, student=student,
              s_vars=s_vars, teacher=teacher, t_vars=t_vars, terms=terms,
              lt=lt, t_of=t_of)


def _run_step(inp, batch, generation=None):
  cross = xsteps.CrossTokenizer(
      inp["terms"], ce_weight=0.3,
      retokenize=align.make_retokenize_fn(inp["aligner"],
                                          teacher_len=inp["lt"]))
  step = jax.jit(xsteps.make_cross_tokenizer_step(
      inp["student"], inp["teacher"], cross, optax.sgd(0.0),
      generation=generation))
  state = create_train_state(inp["s_vars"], optax.sgd(0.0),
                             rng=jax.random.key(0))
  return jax.device_get(step(state, inp["t_vars"], batch)[1])


def _check(inp, metrics, tokens, mask):
  s_logits = np.asarray(inp["student"].apply(
      inp["s_vars"], jnp.asarray(tokens[:, :-1]), train=False)[0])
  loss, values = _np_expected(s_logits, inp["t_of"], tokens, mask,
                              inp["aligner"], inp["terms"], 0.3)
  for k, v in values.items():
    np.testing.assert_allclose(metrics[k], v, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=2e-5)
  assert metrics["truncated"] == 0


def test_offline_step_matches_numpy(step_inputs):
  inp = step_inputs
  tokens = inp["tokens"]
  mask = np.ones(tokens.shape, bool)
  mask[:, :5] = False  # a prompt
  batch = {"tokens": tokens, "mask": mask,
           **inp["aligner"].align_batch(tokens, mask, teacher_len=inp["lt"])}
  metrics = _run_step(inp, batch)
  _check(inp, metrics, tokens, mask)
  assert 0 < metrics["groups"] <= tokens.shape[1] - 1


def test_on_policy_step_retokenizes_the_samples(step_inputs):
  """lmbda=1: the step trains on the "samples" (here: other held-out
  windows after the batch's prompts, returned by a fake sampler ending in
  EOS), re-tokenized for the teacher by the host callback inside jit."""
  inp = step_inputs
  prompt_len, eos = 8, 1
  data = inp["tokens"]
  samples = ctt.windows("bpe2k", 24, 3, seed=9)
  samples[:, :prompt_len] = data[:, :prompt_len]
  samples[0, 15] = eos  # row 0's completion ends early

  def fake_generate(variables, prompts, rng):
    del variables, rng
    return jnp.concatenate([prompts, jnp.asarray(samples[:, prompt_len:])],
                           axis=1)

  gen = lm_steps.Generation(prompt_len, lmbda=1.0, eos_id=eos,
                            student_generate=fake_generate)
  metrics = _run_step(inp, {"tokens": data}, generation=gen)
  mask = align.completion_mask(samples, prompt_len, eos)
  after = np.arange(samples.shape[1])[None, :] > 15
  pad = inp["aligner"].student.specials["<|pad|>"]
  want_tokens = samples.copy()
  want_tokens[0] = np.where(after[0], pad, samples[0])  # read as padding
  assert metrics["on_policy"] == 1.0
  _check(inp, metrics, want_tokens, mask)


# --- through the trainer ----------------------------------------------------


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
  """The same documents prepared for the student (byte-level BPE, V=300)
  and for the teacher (metaspace BPE with byte fallback, V=330)."""
  root = str(tmp_path_factory.mktemp("xtok_data"))
  for name, pre, vocab in (("toy", "byte_level", 300),
                           ("toy_meta", "metaspace", 330)):
    tok = text.train_bpe_tokenizer(_docs(8, 0), vocab_size=vocab,
                                   pre_tokenizer=pre)
    splits = {}
    for split, (n, seed, rows) in {"train": (8, 0, 64),
                                   "validation": (2, 1, 8),
                                   "test": (2, 2, 8)}.items():
      stream = text.encode_documents(tok, _docs(n, seed), eos_id=1)
      splits[split] = text.pack_stream(stream, SEQ)[:rows]
    text.write_tfds_tokens(root, name, splits, tokenizer=tok)
  return root


def _teacher_model(**kw):
  return dict(_teacher(), **kw, overrides=dict(
      _teacher()["overrides"], max_position_embeddings=TEACHER_CTX))


def _cfg(root, mode="distill", name="toy", steps=4, **extra):
  d = dict(_sections(root, steps), task="lm", mode=mode, seed=0,
           model=_model())
  d["data"]["name"] = name
  d.update(extra)
  return ml_collections.ConfigDict(d)


def _xterms(**terms):
  return {"ce_weight": 0.5, "terms": terms or {
      "uld": {"name": "extended_uld", "weight": 0.5}}}


@pytest.fixture(scope="module")
def meta_teacher(corpora, tmp_path_factory):
  """A teacher trained on its own (metaspace) tokens: (workdir, report)."""
  wd = str(tmp_path_factory.mktemp("meta_teacher"))
  rep = trainer.train_and_evaluate(
      _cfg(corpora, "train", "toy_meta", model=_teacher_model()), wd)
  return wd, rep


def _distill_cfg(root, teacher_wd, steps=4, **extra):
  extra.setdefault("loss", _xterms())
  return _cfg(root, steps=steps, teacher=_teacher_model(
      checkpoint=teacher_wd, data_name="toy_meta"), **extra)


CONFIG_FILE = '''
import ml_collections
import sys
sys.path.insert(0, {tests!r})
from test_lm_trainer import _sections, _model
from test_lm_cross_tokenizer import _teacher_model, _xterms

def get_config():
  c = ml_collections.ConfigDict(_sections({data!r}))
  c.task, c.mode = "lm", "seed_experiment"
  c.data.name = "toy"
  c.model = _model()
  c.teacher = _teacher_model(data_name="toy_meta")
  se = c.seed_experiment = ml_collections.ConfigDict()
  se.seeds = (0,)
  hybrid = {{"name": "hybrid", "weight": 0.5, "beta": 0.5}}
  se.phases = ml_collections.ConfigDict({{
      "teacher_meta": {{"mode": "train", "model": _teacher_model(),
                        "data": {{"name": "toy_meta"}},
                        "train": {{"num_steps": 6}}}},
      "student": {{"mode": "train"}},
      "uld": {{"mode": "distill", "loss": _xterms()}},
      "hybrid_on_policy": {{"mode": "distill",
                           "loss": _xterms(hybrid=hybrid),
                           "generation": {{"max_new_tokens": 6,
                                           "lmbda": 0.5}}}},
  }})
  se.order = ("teacher_meta", "student", "uld", "hybrid_on_policy")
  se.shared_phases = ("teacher_meta",)
  se.student_phase = "student"
  se.comparisons = (("hybrid_on_policy", "uld"),)
  se.gain_metric = "test_bpb"
  se.distill_from = ml_collections.ConfigDict(
      {{"uld": "teacher_meta", "hybrid_on_policy": "teacher_meta"}})
  return c
'''


def test_offline_and_on_policy_through_experiments_main(corpora, tmp_path):
  cfg = tmp_path / "xtok_toy.py"
  cfg.write_text(CONFIG_FILE.format(tests=os.path.join(ROOT, "tests"),
                                    data=corpora))
  wd = tmp_path / "wd"
  out = _cli(str(cfg), str(wd))
  assert out.returncode == 0, out.stderr[-3000:]
  with open(wd / "results.json") as f:
    res = json.load(f)
  for p, v in res["phases"].items():
    # Better than uniform: 8 bits per byte, a guess over 330 tokens.
    for k, most in (("last_test_bpb", 8), ("last_validation_bpb", 8),
                    ("last_test_ppl", 330)):
      assert np.isfinite(v[k][0]) and 0 < v[k][0] < most, (p, k)
  reps = {p: json.loads((wd / "seed0" / p / "report.json").read_text())
          for p in res["phases"]}
  assert reps["uld"]["teacher_vocab_size"] == 330
  assert reps["uld"]["teacher_tokenizer"] == "metaspace"
  assert reps["hybrid_on_policy"]["hybrid_matched_tokens"] > 0
  train = [json.loads(l) for l in (wd / "seed0" / "hybrid_on_policy" /
                                   "metrics.jsonl").read_text().splitlines()]
  train = [r for r in train if r["split"] == "train"]
  assert all("hybrid" in r and "on_policy" in r for r in train)
  # The gains are on bits per byte (student alone minus distilled).
  g = res["gains"]["uld"]["last_test_bpb"]["per_seed"][0]
  want = (res["phases"]["student"]["last_test_bpb"][0]
          - res["phases"]["uld"]["last_test_bpb"][0])
  assert g == pytest.approx(want)
  assert "last_test_ppl" not in res["gains"]["uld"]
  assert "gain test bits/byte last" in out.stdout
  assert "hybrid_on_policy vs uld" in out.stdout


def _independent_bpb(model, params, folder, split, tokenizer):
  """sum of float64 NLL of the held-out targets / (ln 2 * their bytes),
  the bytes counted from the decoded text (metaspace: plus the space its
  decoder strips before the first target)."""
  src, _ = text.load_tfds_tokens(folder, split)
  rows = np.stack([np.asarray(src[i]["tokens"]) for i in range(len(src))])
  logits = np.asarray(model.apply({"params": params},
                                  jnp.asarray(rows[:, :-1]),
                                  train=False)[0], np.float64)
  lp = np_log_softmax(logits)
  nll = -np.take_along_axis(lp, rows[:, 1:, None], -1).sum()
  n_bytes = 0
  for r in rows[:, 1:]:
    n_bytes += len(tokenizer.decode(r.tolist()).encode("utf-8"))
    if tokenizer.id_to_token(int(r[0])).startswith(text.METASPACE):
      n_bytes += 1
  return nll / (n_bytes * math.log(2.0))


def test_bits_per_byte_against_an_independent_computation(
    corpora, meta_teacher, tmp_path):
  wd, rep = meta_teacher
  student = trainer.train_and_evaluate(_cfg(corpora, "train", steps=2),
                                       str(tmp_path / "s"))
  for r, name, model_cfg in ((student, "toy", _model()),
                             (rep, "toy_meta", _teacher_model())):
    folder = os.path.join(corpora, name, "1.0.0")
    tok = lm_models.load_tokenizer(folder)
    ov = dict(model_cfg["overrides"])
    cfg = lm_models.preset_config(
        "llama_tiny", vocab_size=tok.get_vocab_size(),
        **dict({"max_position_embeddings": SEQ}, **ov))
    model = lm_models.Transformer(cfg, dtype=jnp.float32)
    params = r["_final_state"].params
    for split in ("validation", "test"):
      want = _independent_bpb(model, params, folder, split, tok)
      assert r[f"last_{split}_bpb"] == pytest.approx(want, rel=2e-5), (
          name, split)
  assert wd


@pytest.mark.slow  # ~40 s at load 10 (passed in the merge-time full run)
def test_resume_matches_an_uninterrupted_on_policy_run(
    corpora, meta_teacher, tmp_path):
  wd, _ = meta_teacher
  gen = {"max_new_tokens": 6, "lmbda": 0.5, "temperature": 0.9}
  mk = lambda: _distill_cfg(corpora, wd, generation=gen)  # noqa: E731
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  ref = trainer.train_and_evaluate(mk(), a)
  trainer.train_and_evaluate(mk(), b)
  shutil.rmtree(os.path.join(b, "checkpoints", "4"))
  os.remove(os.path.join(b, "report.json"))
  rep = trainer.train_and_evaluate(mk(), b)
  assert rep["resumed_from_step"] == 2
  for k in ("last_test_bpb", "last_validation_ppl"):
    assert rep[k] == pytest.approx(ref[k], rel=1e-5), k
  recs = [json.loads(l) for l in open(os.path.join(a, "metrics.jsonl"))]
  on = [r["on_policy"] for r in recs if r["split"] == "train"]
  assert on and all(0 <= x <= 1 for x in on)


def _err(cfg, check=trainer.parse):
  with pytest.raises(ConfigError) as e:
    cfg() if callable(cfg) else check(cfg)
  return str(e.value)


def test_config_errors_are_one_line(corpora, meta_teacher, tmp_path):
  wd, _ = meta_teacher
  plain_teacher = _cfg(corpora, teacher=_teacher_model(checkpoint=wd),
                       loss=_xterms())
  assert _err(plain_teacher).startswith("config.loss.terms.uld:")
  same_vocab_term = _distill_cfg(corpora, wd, loss={
      "ce_weight": 0.5, "terms": {"forward_kl": {"weight": 0.5}}})
  assert "one vocabulary" in _err(same_vocab_term)
  seq_kd = _distill_cfg(corpora, wd, generation={"max_new_tokens": 4,
                                                 "seq_kd": True})
  assert _err(seq_kd).startswith("config.generation.seq_kd:")
  bad = {"merge": ("last", "merge"), "matched_by": ("text", "matched_by"),
         "student_temperature": (0.0, "student_temperature"),
         "beta": (2.0, "beta")}
  for k, (v, word) in bad.items():
    cfg = _distill_cfg(corpora, wd, loss=_xterms(h={
        "name": "hybrid", k: v}))
    assert word in _err(cfg), k
  cfg = _distill_cfg(corpora, wd, loss=_xterms(u={
      "name": "extended_uld", "beta": 0.5}))
  assert "unknown setting" in _err(cfg)
  cfg = _distill_cfg(corpora, wd, loss=_xterms(
      a={"name": "extended_uld", "merge": "first"},
      b={"name": "hybrid", "merge": "chain"}))
  assert "merge rules differ" in _err(cfg)
  cfg = _distill_cfg(corpora, wd)
  cfg.teacher.data_name = "no_such_data"
  assert _err(cfg).startswith("config.teacher.data_name:")
  cfg = _distill_cfg(corpora, wd)
  cfg.teacher.seq_len = 4 * TEACHER_CTX
  msg = _err(cfg, lambda c: trainer.train_and_evaluate(
      c, str(tmp_path / "long")))
  assert msg.startswith("config.teacher.seq_len:") and "context" in msg
  classify = ml_collections.ConfigDict({
      "mode": "distill", "data": {"mock": True},
      "teacher": {"name": "mlp_teacher"}, "loss": _xterms()})
  assert "task 'lm'" in _err(
      lambda: trainer.parse(classify, check_paths=False))


def test_config_file_validates_on_the_toy_corpora(corpora):
  """configs/lm_cross_tokenizer.py: every phase parses (its datasets
  renamed to the toy ones) and the gains are on test bits per byte."""
  from configs import lm_cross_tokenizer as cfg_lib
  from experiments import seed_experiment as se_lib
  c = cfg_lib.get_config()
  c.data.data_dir, c.data.name = corpora, "toy"
  names = {cfg_lib.TEACHER_DATA: "toy_meta", cfg_lib.STUDENT_DATA: "toy"}
  for p in c.seed_experiment.phases:
    ph = c.seed_experiment.phases[p]
    if "data" in ph and "name" in ph.data:
      ph.data.name = names[ph.data.name]
    if "teacher" in ph and "data_name" in ph.teacher:
      ph.teacher.data_name = names[ph.teacher.data_name]
  se_lib.validate(c)
  metrics = se_lib._metrics(c)  # pylint: disable=protected-access
  assert [m.key for m in metrics if m.gain] == ["test_bpb"]
  uld = trainer.parse(se_lib.phase_config(c, "uld", 0), check_paths=False)
  assert uld.teacher.data_name == "toy_meta"
  assert [s.kind for s in uld.loss.terms] == ["cross_tokenizer"]
