"""The LM main job: language-model distillation on Jane Austen's novels.

Prepare the corpus once (Debian package r-cran-janeaustenr: public-domain
texts from Project Gutenberg, MIT-licensed package; the .deb is downloaded
into the data folder; ~15 s)::

    mkdir -p workdirs/lm_data && (cd workdirs/lm_data && apt-get download r-cran-janeaustenr)
    python experiments/prepare_corpus.py --data_dir workdirs/lm_data --name jane_austen_v2048_s64 --vocab_size 2048 --seq_len 64

then::

    python -m experiments.main --config=configs/lm_jane_austen.py \\
        --workdir=workdirs/lm_jane_austen [--config.seed_experiment.scale=4] \\
        [--config.data.data_dir=workdirs/lm_data] \\
        [--config.train.parallel=jit --config.train.mesh='{"fsdp": 4, "tensor": 2}' \\
         --config.teacher.sharding=tensor]

(the mesh, and runs across processes: docs/lm.md).

Phases (train on Emma, Mansfield Park, Pride and Prejudice and Sense and
Sensibility; perplexity on Northanger Abbey = validation and Persuasion =
test), in two stages, each comparing methods at one stated budget -- the
*loss tokens*: the target positions whose loss term is computed (the
tokens of tokens/s; the per-phase table also gives the tokens the teacher
processes and the sampled tokens, for compute):

Stage A, from scratch (every row 120 updates x 32 rows x 63 targets =
241,920 loss tokens, the same AdamW 3e-3 schedule and data order): a
teacher (``llama_1m``: D=128, 2 layers, 4 heads / 2 KV heads, 0.89M
parameters at V=2048) trained ONCE with the first seed and shared by all
seeds; per seed a student (D=64, 1 layer, 0.30M; the top-level ``model``)
trained alone and distilled with teacher-forced forward KL, reverse KL,
JSD (beta 0.5), offline top-k KD (k=32 cache of the teacher, written by the
phase next to the teacher's workdir), and forward KL plus intermediate
layers (hidden states, TinyBERT; attention relations, MiniLMv2). These rows
compute exactly what the previous version of this config computed.

Stage B, continuing the stage-A ``student`` of the same seed (the
on-policy papers start from a supervised student: GKD, Agarwal et al.,
ICLR 2024; MiniLLM, Gu et al., ICLR 2024): every row 120 more updates of
32 rows x 32 completion targets = 122,880 loss tokens on 32-token
continuations of 32-token data prompts (AdamW 1e-3, 10 warm-up updates,
cosine; the whole training split):

* ``student_continued``: supervised NLL on the data's continuations (the
  baseline of the stage's gains);
* ``gkd_off_policy``: GKD with ``lmbda = 0`` -- JSD(beta 0.5) to the
  teacher on the data's continuations (supervised KD);
* ``gkd_on_policy``: TRL's GKD defaults: ``lmbda = 0.5`` (half the updates
  on the student's own samples), ``beta = 0.5``, sampling temperature 0.9,
  the loss at temperature 1 (TRL's convention; the previous version of this
  config divided the loss logits by 0.9 and trained from scratch on 16
  new tokens after 48);
* ``minillm``: MiniLLM with the authors' script values (teacher-mixed
  sampling alpha 0.2, reward scaling 0.5, gamma 0.95, length
  normalization, PPO clip 0.2, single-step reverse KL, 4 PPO epochs,
  lm_coef 1 with kd_ratio 0.5, temperature 1); 32 rollouts per outer
  step, minibatches of 16 rollouts + 16 pre-training rows (their
  continuation positions), so each of its 120 updates sees 32 x 32 loss
  tokens like the others (15 outer steps of 8 updates).

Gains: stage A vs ``student``, stage B vs ``student_continued`` (paired
over seeds, 95% t-intervals); comparisons: forward KL + intermediate
layers vs forward KL, on- vs off-policy GKD, MiniLLM vs on-policy GKD.

Sized for a 2-core CPU (batch 32 x 64 tokens; the teacher 300 steps over
the whole train split, 0.7 epoch; stage A students one pass over the first
3,840 training sequences, which is also what the top-k cache covers;
perplexity on the first 256 sequences of each held-out split). The
students are far from converged: it measures the methods at small scale.
``--config.seed_experiment.scale=S`` multiplies both models' widths (hidden
and MLP sizes), every phase's steps and the stage-A students' training
sequences by S: ``scale=4`` gives a 7.9M-parameter teacher (D=512) and a
1.8M student trained 1,200 / 480 (+480) steps -- a job for a GPU/TPU host.
"""

import ml_collections

from configs import base

TEACHER = dict(preset="llama_1m")
STUDENT = dict(preset="llama_tiny", hidden_size=64, intermediate_size=172,
               num_layers=1, num_heads=2, num_kv_heads=1)
CONTINUATION = 32  # stage B: 32-token prompts, 32-token continuations


def _distill(ce_weight=0.5, **terms):
  return {"mode": "distill", "loss": {"ce_weight": ce_weight,
                                      "terms": terms}}


def _continued(lr=1e-3, **phase):
  """A stage-B phase: 120 more updates on 32-token continuations of
  32-token prompts (the loss covers the continuation positions)."""
  d = {"data": {"train_sequences": 0},
       "optimizer": {"learning_rate": lr, "warmup_steps": 10},
       "train": {"eval_every_steps": 40},
       "generation": {"max_new_tokens": CONTINUATION}}
  for k, v in phase.items():
    d[k] = dict(d.get(k, {}), **v) if isinstance(v, dict) and k != "loss" else v
  return d


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
  c.model.init_checkpoint = ""
  c.teacher.update(base.lm_model(**TEACHER).to_dict())
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
  jsd_t1 = {"js_divergence": {"weight": 1.0, "beta": 0.5}}  # T = 1 (TRL)
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
      "forward_kl_inter": inter,
      # Stage B: from the supervised student, 120 x 32 x 32 loss tokens.
      "student_continued": _continued(mode="train"),
      "gkd_off_policy": _continued(**_distill(ce_weight=0.0, **jsd_t1)),
      "gkd_on_policy": _continued(
          generation={"lmbda": 0.5, "temperature": 0.9},
          **_distill(ce_weight=0.0, **jsd_t1)),
      "minillm": _continued(
          mode="distill", loss={"ce_weight": 1.0, "terms": {}},
          train={"batch_size": 16},
          generation={"temperature": 1.0},
          minillm={"enabled": True, "num_rollouts": 32, "ppo_epochs": 4,
                   "pt": True, "pt_positions": "completion"}),
  })
  se.order = ("teacher", "student", "forward_kl", "reverse_kl", "jsd",
              "topk_offline", "forward_kl_inter", "student_continued",
              "gkd_off_policy", "gkd_on_policy", "minillm")
  se.comparisons = (("forward_kl_inter", "forward_kl"),
                    ("gkd_on_policy", "gkd_off_policy"),
                    ("minillm", "gkd_on_policy"))
  se.shared_phases = ("teacher",)
  se.student_phase = "student"
  se.distill_from = ml_collections.ConfigDict({
      p: "teacher" for p in ("forward_kl", "reverse_kl", "jsd",
                             "topk_offline", "forward_kl_inter",
                             "gkd_off_policy", "gkd_on_policy", "minillm")})
  se.init_from = ml_collections.ConfigDict({
      p: "student" for p in ("student_continued", "gkd_off_policy",
                             "gkd_on_policy", "minillm")})
  se.baselines = ml_collections.ConfigDict({
      p: "student_continued" for p in ("gkd_off_policy", "gkd_on_policy",
                                       "minillm")})
  return c
