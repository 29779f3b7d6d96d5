"""The LM main job: language-model distillation on Jane Austen's novels.

Prepare the corpus once (Debian package r-cran-janeaustenr: public-domain
texts from Project Gutenberg, MIT-licensed package; ~15 s)::

    mkdir -p workdirs/lm_data && (cd workdirs/lm_data && apt-get download r-cran-janeaustenr)
    python experiments/prepare_corpus.py --data_dir workdirs/lm_data \\
        --name jane_austen_v2048_s64 --vocab_size 2048 --seq_len 64 \\
        --source workdirs/lm_data/r-cran-janeaustenr_1.0.0-1_all.deb

then::

    python -m experiments.main --config=configs/lm_jane_austen.py \\
        --workdir=workdirs/lm_jane_austen [--config.seed_experiment.scale=8] \\
        [--config.data.data_dir=workdirs/lm_data] \\
        [--config.train.parallel=jit --config.train.mesh='{"fsdp": 4, "tensor": 2}' \\
         --config.teacher.sharding=tensor]

(the mesh, and runs across processes: docs/lm.md).

Phases (train on Emma, Mansfield Park, Pride and Prejudice, Sense and
Sensibility; perplexity on Northanger Abbey = validation and Persuasion =
test): a teacher (``llama_1m``: D=128, 2 layers, 4 heads / 2 KV heads,
0.89M parameters at V=2048) trained ONCE with the first seed and shared by
all seeds; then per seed a student (D=64, 1 layer, 0.30M; the top-level
``model``) trained alone and distilled from the teacher with forward KL,
reverse KL (MiniLLM's direction), JSD (beta 0.5), offline top-k KD (k=32
cache of the teacher, written by the phase itself next to the teacher's
workdir) and on-policy GKD (TRL's defaults lmbda=0.5, beta=0.5,
temperature=0.9; 16 new tokens after a 48-token prompt), and forward KL
plus intermediate layers (hidden states, TinyBERT; attention relations,
MiniLMv2), compared with forward KL alone (paired over seeds). Every student
phase has the same steps, batch, optimizer and data order (the seed sets
the initialization and the order). Token-level KD phases use 0.5 NLL + 0.5
divergence.

Sized for a 2-core CPU (batch 32 x 64 tokens; the teacher 300 steps over
the whole train split, 0.7 epoch; each student phase 120 steps, one pass
over the first 3,840 training sequences, which is also what the top-k cache
covers; perplexity on the first 256 sequences of each held-out split). The
students are far from converged: it measures the methods at small scale.
About 15 minutes on this 2-core CPU (the README gives the measured time).
``--config.seed_experiment.scale=S`` multiplies both models' widths (hidden
and MLP sizes), every phase's steps and the students' training sequences
by S: ``scale=4`` gives a 7.9M-parameter teacher (D=512) and a 1.8M
student trained 1,200 / 480 steps -- a job for a GPU/TPU host.
"""

import ml_collections

from configs import base

TEACHER = dict(preset="llama_1m")
STUDENT = dict(preset="llama_tiny", hidden_size=64, intermediate_size=172,
               num_layers=1, num_heads=2, num_kv_heads=1)


def _distill(ce_weight=0.5, **terms):
  return {"mode": "distill", "loss": {"ce_weight": ce_weight,
                                      "terms": terms}}


def get_config():
  c = base.lm_config()
  c.mode = "seed_experiment"
  c.data.update({"data_dir": "workdirs/lm_data",
                 "name": "jane_austen_v2048_s64", "eval_sequences": 256,
                 "train_sequences": 3840})
  c.train.update({"batch_size": 32, "eval_batch_size": 128,
                  "num_steps": 120, "log_every_steps": 20,
                  "eval_every_steps": 60})
  c.optimizer.update({"learning_rate": 3e-3, "warmup_steps": 10,
                      "weight_decay": 0.0, "grad_clip": 1.0})
  c.model = base.lm_model(**STUDENT)
  c.teacher.update(base.lm_model(**TEACHER).to_dict())
  gkd = _distill(ce_weight=0.0, js_divergence={
      "weight": 1.0, "beta": 0.5, "temperature": 0.9})
  gkd["generation"] = {"max_new_tokens": 16, "lmbda": 0.5,
                       "temperature": 0.9}
  topk = _distill(topk_kd={"weight": 0.5, "temperature": 1.0,
                           "tail": "bucket"})
  topk["teacher"] = {"precompute": True, "topk": 32}
  # Logit KD + intermediate layers: the student's block -> the teacher's
  # last (uniform map), hidden states by cosine distance through a learned
  # 64 -> 128 projection (TinyBERT / DistillKit hs_cosine), and MiniLMv2's
  # q-q / k-k / v-v relations with 4 relation heads (2 + 1 KV student heads
  # vs 4 + 2 teacher heads).
  inter = _distill(
      forward_kl={"weight": 0.5, "temperature": 1.0},
      hidden={"distiller": "tinybert", "weight": 0.5, "loss": "cosine",
              "layers": "uniform"},
      attention={"distiller": "minilm", "weight": 0.5,
                 "relations": ("qq", "kk", "vv"), "num_relation_heads": 4,
                 "layers": "uniform"})
  se = c.seed_experiment = ml_collections.ConfigDict()
  se.seeds = (0, 1, 2)
  se.scale = 1.0
  se.phases = ml_collections.ConfigDict({
      "teacher": {"mode": "train", "model": base.lm_model(**TEACHER).to_dict(),
                  "train": {"num_steps": 300, "eval_every_steps": 150},
                  "data": {"train_sequences": 0}},  # the whole train split
      "student": {"mode": "train"},
      "forward_kl": _distill(forward_kl={"weight": 0.5, "temperature": 1.0}),
      "reverse_kl": _distill(reverse_kl={"weight": 0.5, "temperature": 1.0}),
      "jsd": _distill(js_divergence={"weight": 0.5, "temperature": 1.0,
                                     "beta": 0.5}),
      "topk_offline": topk,
      "gkd_on_policy": gkd,
      "forward_kl_inter": inter,
  })
  se.order = ("teacher", "student", "forward_kl", "reverse_kl", "jsd",
              "topk_offline", "gkd_on_policy", "forward_kl_inter")
  se.comparisons = (("forward_kl_inter", "forward_kl"),)
  se.shared_phases = ("teacher",)
  se.student_phase = "student"
  se.distill_from = ml_collections.ConfigDict({
      p: "teacher" for p in ("forward_kl", "reverse_kl", "jsd",
                             "topk_offline", "gkd_on_policy",
                             "forward_kl_inter")})
  return c
