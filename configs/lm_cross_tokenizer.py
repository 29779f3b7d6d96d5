"""Distillation across tokenizers on Jane Austen's novels (issue 20).

A teacher with its own tokenizer -- metaspace (SentencePiece-style) BPE
with byte fallback, V=4,096: other vocabulary size, other merges, other
pre-tokenization -- trained on the corpus, then the student (the corpus'
byte-level BPE, V=2,048) trained alone, distilled from it with GOLD's
extended ULD and with the hybrid loss, and, as reference points, distilled
from a same-tokenizer teacher (the same architecture on the V=2,048
tokens) with forward KL and with extended ULD (which separates the loss
from the tokenizer). Bits per byte on the whole held-out splits compare
all models across tokenizers; paired gains over seeds with 95% intervals
on test bits per byte (`seed_experiment.gain_metric`); tokens/s per phase.

Prepare both datasets once (the .deb as in configs/lm_jane_austen.py)::

    python experiments/prepare_corpus.py --data_dir workdirs/lm_data \\
        --name jane_austen_v2048_s64 --vocab_size 2048 --seq_len 64 \\
        --source workdirs/lm_data/r-cran-janeaustenr_1.0.0-1_all.deb
    python experiments/prepare_corpus.py --data_dir workdirs/lm_data \\
        --name jane_austen_meta4096_s64 --vocab_size 4096 --seq_len 64 \\
        --pre_tokenizer metaspace \\
        --source workdirs/lm_data/r-cran-janeaustenr_1.0.0-1_all.deb

then::

    python -m experiments.main --config=configs/lm_cross_tokenizer.py \\
        --workdir=workdirs/lm_cross_tokenizer \\
        [--config.data.data_dir=workdirs/lm_data] \\
        [--config.seed_experiment.scale=4]

Phases: both teachers (``llama_1m`` widths: D=128, 2 layers; 300 steps of
32 windows of 64 tokens over the whole train split, trained once with the
first seed and shared) -- the metaspace windows hold ~18% more text than
the byte-level ones (54 metaspace tokens per 64-token student window), the
teachers are compared by their held-out bits per byte -- then per seed
(0, 1, 2) the student (D=64, 1 layer, 0.31M parameters; 120 steps over the
first 3,840 training sequences, AdamW 3e-3, as configs/lm_jane_austen.py)
alone and distilled with 0.5 NLL + 0.5 of the term: ``uld`` (extended ULD,
chain-rule merge, T=1) and ``hybrid`` (GOLD's hybrid, beta 0.5, adaptive
weights, matched vocabulary by bytes) from the metaspace teacher;
``forward_kl`` and ``uld_same`` from the byte-level teacher. Comparisons
(paired, test bits per byte): hybrid vs uld, forward_kl vs uld (the
tokenizer + loss gap), uld_same vs uld (the tokenizer gap at equal loss),
forward_kl vs uld_same (the loss gap on one tokenizer).
"""

import ml_collections

from configs import base

STUDENT_DATA = "jane_austen_v2048_s64"
TEACHER_DATA = "jane_austen_meta4096_s64"
TEACHER = dict(preset="llama_1m")
STUDENT = dict(preset="llama_tiny", hidden_size=64, intermediate_size=172,
               num_layers=1, num_heads=2, num_kv_heads=1)


def _distill(terms, *, cross: bool, ce_weight: float = 0.5):
  phase = {"mode": "distill", "loss": {"ce_weight": ce_weight,
                                       "terms": terms}}
  if cross:
    phase["teacher"] = {"data_name": TEACHER_DATA}
  return phase


def get_config():
  c = base.lm_config()
  c.mode = "seed_experiment"
  c.data.update({"data_dir": "workdirs/lm_data", "name": STUDENT_DATA,
                 "eval_sequences": 0, "train_sequences": 3840})
  c.train.update({"batch_size": 32, "eval_batch_size": 128,
                  "num_steps": 120, "log_every_steps": 20,
                  "eval_every_steps": 60})
  c.optimizer.update({"learning_rate": 3e-3, "warmup_steps": 10,
                      "weight_decay": 0.0, "grad_clip": 1.0})
  c.model = base.lm_model(**STUDENT)
  c.teacher.update(base.lm_model(**TEACHER).to_dict())
  c.teacher.data_name = ""  # per phase: the metaspace teacher's dataset
  c.teacher.seq_len = 0     # teacher tokens per window: automatic
  uld = {"name": "extended_uld", "weight": 0.5, "merge": "chain",
         "student_temperature": 1.0, "teacher_temperature": 1.0}
  hybrid = {"name": "hybrid", "weight": 0.5, "merge": "chain", "beta": 0.5,
            "matched_by": "bytes"}
  teacher = {"mode": "train", "model": base.lm_model(**TEACHER).to_dict(),
             "train": {"num_steps": 300, "eval_every_steps": 150},
             "data": {"train_sequences": 0}}  # the whole train split
  se = c.seed_experiment = ml_collections.ConfigDict()
  se.seeds = (0, 1, 2)
  se.scale = 1.0
  se.phases = ml_collections.ConfigDict({
      "teacher_meta": dict(teacher, data={"train_sequences": 0,
                                          "name": TEACHER_DATA}),
      "teacher": teacher,
      "student": {"mode": "train"},
      "uld": _distill({"uld": uld}, cross=True),
      "hybrid": _distill({"hybrid": hybrid}, cross=True),
      "forward_kl": _distill({"forward_kl": {"weight": 0.5,
                                             "temperature": 1.0}},
                             cross=False),
      "uld_same": _distill({"uld": uld}, cross=False),
  })
  # uld_same: ULD from the same-tokenizer teacher (the alignment is then
  # one token per group) -- teacher.data_name names the student's dataset.
  se.phases.uld_same.teacher = {"data_name": STUDENT_DATA}
  se.order = ("teacher_meta", "teacher", "student", "uld", "hybrid",
              "forward_kl", "uld_same")
  se.shared_phases = ("teacher_meta", "teacher")
  se.student_phase = "student"
  se.distill_from = ml_collections.ConfigDict({
      "uld": "teacher_meta", "hybrid": "teacher_meta",
      "forward_kl": "teacher", "uld_same": "teacher"})
  se.comparisons = (("hybrid", "uld"), ("forward_kl", "uld"),
                    ("uld_same", "uld"), ("forward_kl", "uld_same"))
  se.gain_metric = "test_bpb"
  return c
