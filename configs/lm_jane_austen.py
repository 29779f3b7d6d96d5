"""The LM main job: language-model distillation on Jane Austen's novels.

Prepare the corpus once (Debian package r-cran-janeaustenr: public-domain
texts from Project Gutenberg, MIT-licensed package; ~15 s)::

    apt-get download r-cran-janeaustenr
    python experiments/prepare_corpus.py --data_dir workdirs/lm_data \\
        --name jane_austen_v2048_s64 --vocab_size 2048 --seq_len 64 \\
        --source r-cran-janeaustenr_1.0.0-1_all.deb

then::

    python -m experiments.main --config=configs/lm_jane_austen.py \\
        --workdir=workdirs/lm_jane_austen [--config.scale=8] \\
        [--config.data.data_dir=workdirs/lm_data] \\
        [--config.train.mesh='{"fsdp": 4, "tensor": 2}' \\
         --config.teacher_model.sharding=tensor]

(the mesh, and runs across processes: docs/lm.md).

Phases (train on Emma, Mansfield Park, Pride and Prejudice, Sense and
Sensibility; perplexity on Northanger Abbey = validation and Persuasion =
test): a teacher (``llama_1m``: D=128, 2 layers, 4 heads / 2 KV heads,
0.89M parameters at V=2048) trained ONCE with the first seed and shared by
all seeds; then per seed a student (D=64, 1 layer, 0.30M) trained alone and
distilled from the teacher with forward KL, reverse KL (MiniLLM's
direction), JSD (beta 0.5), offline top-k KD (k=32 cache of the teacher,
written by the phase itself next to the teacher's workdir) and on-policy
GKD (TRL's defaults lmbda=0.5, beta=0.5, temperature=0.9; 16 new tokens
after a 48-token prompt). Every student phase has the same steps, batch,
optimizer and data order (the seed sets the initialization and the order),
so the paired gains compare methods, not budgets. Token-level KD phases use
``ce_weight=0.5, kd_weight=0.5`` (data NLL + divergence).

Sized for a 2-core CPU (batch 32 x 64 tokens; the teacher 300 steps over
the whole train split, 0.7 epoch; each student phase 120 steps, one pass over
the first 3,840 training sequences, which is also what the top-k cache
covers; perplexity on the first 256 sequences of each held-out split). The
students are far from converged: it measures the methods at small scale.
About 15 minutes on this 2-core CPU (the README gives the measured time).
``--config.scale=S`` multiplies both models' widths (hidden and MLP sizes),
every phase's steps and the students' training sequences by S: ``scale=4``
gives a 7.9M-parameter teacher (D=512) and a 1.8M student trained 1,200 /
480 steps -- a job for a GPU/TPU host.
"""

import ml_collections


def _model(preset, **overrides):
  c = ml_collections.ConfigDict({"preset": preset, "hf_dir": "",
                                 "dtype": "float32", "remat": False,
                                 "overrides": overrides})
  # On a mesh (distilled phases' teacher): 'replicated' | 'fsdp' | 'tensor'
  # | ((regex, spec), ...).
  c.sharding = ml_collections.config_dict.placeholder(object)
  return c


def get_config():
  c = ml_collections.ConfigDict()
  c.task = "lm"
  c.mode = "seed_experiment"
  c.scale = 1.0
  c.data = ml_collections.ConfigDict({
      "data_dir": "workdirs/lm_data", "name": "jane_austen_v2048_s64",
      "version": "1.0.0", "batch_size": 32, "eval_batch_size": 128,
      "eval_sequences": 256, "train_sequences": 3840,
      "eval_splits": ("validation", "test")})
  c.train = ml_collections.ConfigDict({"steps": 120, "log_every": 20,
                                       "eval_every": 60})
  # A device mesh, as the CNN trainer's: e.g. {"fsdp": 4, "tensor": 2}
  # (FSDP x tensor parallel; docs/lm.md), with optional (regex, spec) rules
  # for the student state; teacher_model.sharding places the teacher.
  c.train.mesh = ml_collections.config_dict.placeholder(object)
  c.train.sharding_rules = ml_collections.config_dict.placeholder(object)
  c.optimizer = ml_collections.ConfigDict({
      "learning_rate": 3e-3, "warmup_steps": 10, "weight_decay": 0.0,
      "grad_clip": 1.0})
  c.checkpoint = ml_collections.ConfigDict({"enabled": True, "keep": 1})
  c.kd = ml_collections.ConfigDict({
      "divergence": "forward_kl", "temperature": 1.0, "beta": 0.5,
      "ce_weight": 0.5, "kd_weight": 0.5, "fused": False,
      "chunk_size": 1024, "vocab_size": 0})
  c.gkd = ml_collections.ConfigDict({
      "lmbda": 0.5, "beta": 0.5, "temperature": 0.9, "seq_kd": False,
      "max_new_tokens": 16, "top_k": 0, "top_p": 0.0})
  c.topk = ml_collections.ConfigDict({"k": 32, "tail": "bucket",
                                      "temperature": 1.0, "cache_dir": ""})
  c.teacher_model = _model("llama_1m")
  c.student_model = _model("llama_tiny", hidden_size=64,
                           intermediate_size=172, num_layers=1,
                           num_heads=2, num_kv_heads=1)
  se = c.seed_experiment = ml_collections.ConfigDict()
  se.seeds = (0, 1, 2)
  se.phases = ml_collections.ConfigDict({
      "teacher": {"mode": "train", "train": {"steps": 300,
                                             "eval_every": 150},
                  "data": {"train_sequences": 0}},  # all of the train split
      "student": {"mode": "train"},
      "forward_kl": {"mode": "token_kd", "kd": {"divergence": "forward_kl"}},
      "reverse_kl": {"mode": "token_kd", "kd": {"divergence": "reverse_kl"}},
      "jsd": {"mode": "token_kd", "kd": {"divergence": "js_divergence"}},
      "topk_offline": {"mode": "topk"},
      "gkd_on_policy": {"mode": "gkd"},
  })
  se.order = ("teacher", "student", "forward_kl", "reverse_kl", "jsd",
              "topk_offline", "gkd_on_policy")
  se.teacher_phases = ("teacher",)
  se.shared_phases = ("teacher",)
  se.student_phase = "student"
  se.distill_from = ml_collections.ConfigDict({
      p: "teacher" for p in ("forward_kl", "reverse_kl", "jsd",
                             "topk_offline", "gkd_on_policy")})
  return c
