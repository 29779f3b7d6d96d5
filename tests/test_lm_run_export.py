"""A kd_jax-trained LM leaves kd_jax: `experiments/export_hf.py` (run
directory -> Hugging Face folder) and `experiments/cache_teacher.py
--run_dir` (top-k cache from a run's teacher), plus the vocabulary checks of
the cache.

The run is made by the LM trainer itself (2 steps on a tiny corpus). The
independent reference is transformers: the exported folder is loaded with
``AutoModelForCausalLM`` and its float64 log-softmax gives the top-k the
cache must hold.
"""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kd_jax.data import text
from kd_jax.models import lm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..",
                                "experiments"))
import cache_teacher  # noqa: E402  pylint: disable=g-import-not-at-top
import export_hf  # noqa: E402  pylint: disable=g-import-not-at-top

SEQ = 12
WORDS = ("the lady said that her sister was not at home and mister darcy "
         "walked to the house with miss bennet").split()


def _docs(n, seed):
  rng = np.random.default_rng(seed)
  return [" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 200))
          for _ in range(n)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(dataset folder, run directory) of a 2-step LM training run."""
  from kd_jax import trainer  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("run")
  tok = text.train_bpe_tokenizer(_docs(4, 0), vocab_size=300)
  splits = {s: text.pack_stream(text.encode_documents(
      tok, _docs(2, i), eos_id=1), SEQ)[:16]
            for i, s in enumerate(("train", "validation", "test"))}
  folder = text.write_tfds_tokens(str(root / "data"), "toy", splits,
                                  tokenizer=tok)
  model = {"preset": "llama_tiny", "hf_dir": "", "dtype": "float32",
           "remat": False, "overrides": {"hidden_size": 16,
                                         "intermediate_size": 32}}
  cfg = ml_collections.ConfigDict({
      "task": "lm", "mode": "train", "seed": 0, "model": model,
      "data": {"data_dir": str(root / "data"), "name": "toy",
               "version": "1.0.0", "eval_sequences": 0,
               "train_sequences": 0, "eval_splits": ("validation",)},
      "train": {"num_steps": 2, "num_epochs": 0, "batch_size": 4,
                "eval_batch_size": 8, "log_every_steps": 1,
                "eval_every_steps": 2},
      "optimizer": {"name": "adamw", "schedule": "warmup_cosine",
                    "learning_rate": 1e-2, "warmup_steps": 1,
                    "weight_decay": 0.0, "grad_clip": 1.0},
      "checkpoint": {"enabled": True, "keep": 1, "keep_best": False,
                     "async_save": False}})
  workdir = str(root / "run")
  trainer.train_and_evaluate(cfg, workdir)
  return folder, workdir


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_run_exported_and_cached_like_transformers(run, tmp_path, capsys):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  folder, workdir = run
  out = str(tmp_path / "hf")
  export_hf.main(["--run_dir", workdir, "--out", out])
  assert "wrote" in capsys.readouterr().out
  hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok.eos_token_id == 1 and len(hf_tok) <= hf.config.vocab_size
  # The checkpoint, not the initialization, was exported.
  model, variables, _ = export_hf.load_lm_run(workdir)
  init = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  assert not np.allclose(variables["params"]["norm"]["scale"],
                         init["params"]["norm"]["scale"])
  cache_teacher.main(["--dataset", folder, "--run_dir", workdir, "--k", "4",
                      "--splits", "validation", "--batch_size", "8"])
  src, _ = text.load_tfds_tokens(folder, "validation")
  tokens = np.stack([src[i]["tokens"] for i in range(len(src))])
  with torch.no_grad():
    logits = hf(torch.as_tensor(tokens[:, :-1])).logits.numpy()
  logp = _np_log_softmax(logits)
  want_idx = np.argsort(-logp, -1, kind="stable")[..., :4]
  cache = text.TopkCacheSource(folder, "validation", 4)
  assert cache.metadata["teacher"] == workdir
  for i in range(len(src)):
    np.testing.assert_array_equal(cache[i]["teacher_topk_indices"],
                                  want_idx[i])
    np.testing.assert_allclose(cache[i]["teacher_topk_logprobs"],
                               np.take_along_axis(logp[i], want_idx[i], -1),
                               rtol=2.0 ** -8, atol=1e-5)


def _tiny_teacher(path, vocab):
  cfg = lm.LMConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                    num_layers=1, num_heads=2, max_position_embeddings=32)
  model = lm.Transformer(cfg, dtype=jnp.float32)
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(0),
                                           jnp.zeros((1, 4), jnp.int32)))
  lm.save_hf_folder(str(path), cfg, variables)
  return str(path)


def test_vocabulary_mismatch_is_one_line(tmp_path):
  teacher = _tiny_teacher(tmp_path / "t256", 256)
  rows = np.random.default_rng(0).integers(0, 2048, (4, 9)).astype(np.int32)
  big = text.write_tfds_tokens(str(tmp_path), "v2048", {"train": rows},
                               metadata={"vocab_size": 2048})
  with pytest.raises(SystemExit) as e:
    cache_teacher.main(["--dataset", big, "--hf_dir", teacher, "--k", "4"])
  msg = str(e.value)
  assert msg.startswith("cache_teacher: dataset ") and "\n" not in msg
  assert "2048-token vocabulary but the teacher's vocab_size is 256" in msg
  assert not os.path.exists(text.topk_cache_path(big, "train", 4))
  # Without a recorded vocabulary the ids themselves are checked.
  bare = text.write_tfds_tokens(str(tmp_path), "bare", {"train": rows})
  with pytest.raises(SystemExit, match=r"holds token id \d+, outside the "
                     r"teacher's vocabulary \[0, 256\)"):
    cache_teacher.main(["--dataset", bare, "--hf_dir", teacher, "--k", "4"])


def test_run_dir_errors(run, tmp_path):
  folder, workdir = run
  with pytest.raises(SystemExit, match="is not a kd_jax run directory"):
    cache_teacher.main(["--dataset", folder, "--run_dir", str(tmp_path)])
  (tmp_path / "config.json").write_text('{"task": "lm", "mode": '
                                        '"seed_experiment"}')
  with pytest.raises(SystemExit, match="pass one phase's run directory"):
    cache_teacher.main(["--dataset", folder, "--run_dir", str(tmp_path)])
  other = text.write_tfds_tokens(
      str(tmp_path), "other", {"train": np.zeros((2, SEQ), np.int32)},
      tokenizer=text.train_bpe_tokenizer(["something else entirely"] * 3,
                                         vocab_size=280))
  with pytest.raises(SystemExit, match="whose tokenizer differs"):
    cache_teacher.main(["--dataset", other, "--run_dir", workdir])
  with pytest.raises(SystemExit, match="2"):
    cache_teacher.main(["--dataset", folder, "--run_dir", workdir,
                        "--hf_dir", workdir])
