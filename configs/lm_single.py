r"""Single LM runs, one per method: ``configs/lm_single.py:<mode>``.

The models, data and recipes of the LM main job (`configs/lm_jane_austen.py`)
as single runs, each in its own workdir. Prepare the corpus once (docs/lm.md),
then train the teacher and the student alone first: the distillation modes
read the teacher from ``workdirs/lm_single/teacher`` and the on-policy modes
(``gkd``, ``minillm``) start from the student of ``workdirs/lm_single/train``
(``--config.teacher.checkpoint=`` / ``--config.model.init_checkpoint=`` to
use others)::

    python -m experiments.main --config=configs/lm_single.py:teacher --workdir=workdirs/lm_single/teacher
    python -m experiments.main --config=configs/lm_single.py:train --workdir=workdirs/lm_single/train
    python -m experiments.main --config=configs/lm_single.py:forward_kl --workdir=workdirs/lm_single/forward_kl
    python -m experiments.main --config=configs/lm_single.py:minillm --workdir=workdirs/lm_single/minillm

Modes:

* ``teacher``: the teacher (``llama_1m``), 300 steps on the whole train split;
* ``train``: the student alone (NLL), 120 steps;
* ``forward_kl`` / ``reverse_kl`` / ``jsd`` / ``tvd``: teacher-forced token KD
  (0.5 NLL + 0.5 divergence, temperature 1; JSD with beta 0.5);
* ``fused``: forward KL through the fused head loss (no ``[B, T, V]`` logits);
* ``topk``: offline KD from the teacher's top-32 cache (written on the
  first run next to the teacher);
* ``inter``: forward KL + hidden states (TinyBERT) + attention relations
  (MiniLMv2);
* ``seq_kd``: sequence-level KD (Kim & Rush 2016): NLL on the teacher's
  32-token continuations of 32-token prompts, generated in the step;
* ``gkd``: on-policy GKD with TRL's defaults (``lmbda`` 0.5, ``beta`` 0.5,
  sampling temperature 0.9, the loss at temperature 1), 120 more updates
  of the ``train`` student on 32-token continuations;
* ``minillm``: MiniLLM with the authors' script values, 120 more updates
  (15 outer steps of 32 rollouts x 4 PPO epochs / minibatches of 16) of
  the ``train`` student.
"""

import ml_collections

from configs import base
from configs import lm_jane_austen as main_job

WORKDIR = "workdirs/lm_single"
MODES = ("teacher", "train", "forward_kl", "reverse_kl", "jsd", "tvd",
         "fused", "topk", "inter", "seq_kd", "gkd", "minillm")


def _terms(name, **kw):
  return {name: dict({"weight": 0.5, "temperature": 1.0}, **kw)}


def _mode(mode: str) -> dict:
  """What `mode` changes in the base below."""
  distill = {"mode": "distill", "loss": {"ce_weight": 0.5}}
  continued = {"mode": "distill",
               "model": {"init_checkpoint": f"{WORKDIR}/train"},
               "data": {"train_sequences": 0},
               "optimizer": {"learning_rate": 1e-3},
               "train": {"eval_every_steps": 40},
               "generation": {"max_new_tokens": main_job.CONTINUATION}}
  if mode == "teacher":
    return {"model": base.lm_model(**main_job.TEACHER).to_dict(),
            "train": {"num_steps": 300, "eval_every_steps": 150},
            "data": {"train_sequences": 0}}
  if mode == "train":
    return {}
  divergence = {"forward_kl": "forward_kl", "reverse_kl": "reverse_kl",
                "jsd": "js_divergence", "tvd": "total_variation",
                "fused": "forward_kl"}
  if mode in divergence:
    kw = {"beta": 0.5} if mode == "jsd" else {}
    out = dict(distill, loss=dict(distill["loss"], terms=_terms(
        divergence[mode], **kw)))
    if mode == "fused":
      out["loss"]["fused_head"] = True
    return out
  if mode == "topk":
    return dict(distill, teacher={"precompute": True, "topk": 32},
                loss=dict(distill["loss"], terms=_terms("topk_kd",
                                                        tail="bucket")))
  if mode == "inter":
    return dict(distill, loss=main_job._distill(  # pylint: disable=protected-access
        forward_kl={"weight": 0.5, "temperature": 1.0},
        hidden={"distiller": "tinybert", "weight": 0.5, "loss": "cosine",
                "layers": "uniform"},
        attention={"distiller": "minilm", "weight": 0.5,
                   "relations": ("qq", "kk", "vv"), "num_relation_heads": 4,
                   "layers": "uniform"})["loss"])
  if mode == "seq_kd":
    return dict(distill, loss={"ce_weight": 1.0, "terms": {}},
                generation={"max_new_tokens": main_job.CONTINUATION,
                            "seq_kd": True, "temperature": 0.9})
  if mode == "gkd":
    return dict(continued, loss={"ce_weight": 0.0, "terms": {
        "js_divergence": {"weight": 1.0, "beta": 0.5}}},  # T = 1 (TRL)
                generation=dict(continued["generation"], lmbda=0.5,
                                temperature=0.9))
  if mode == "minillm":
    return dict(continued, loss={"ce_weight": 1.0, "terms": {}},
                train=dict(continued["train"], batch_size=16),
                generation=dict(continued["generation"], temperature=1.0),
                minillm={"enabled": True, "num_rollouts": 32,
                         "ppo_epochs": 4, "pt_positions": "completion"})
  raise ValueError(f"configs/lm_single.py: unknown mode {mode!r}; modes: "
                   f"{', '.join(MODES)} (e.g. "
                   "--config=configs/lm_single.py:forward_kl).")


def _update(node: ml_collections.ConfigDict, changes: dict) -> None:
  for k, v in changes.items():
    if isinstance(v, dict) and k in node and k not in ("terms", "overrides"):
      _update(node[k], v)
    else:
      node[k] = v


def get_config(mode: str = ""):
  if not mode:
    raise ValueError("configs/lm_single.py needs a mode: "
                     "--config=configs/lm_single.py:<mode> with <mode> one "
                     f"of {', '.join(MODES)}.")
  c = base.lm_config()
  main = main_job.get_config()
  for sec in ("data", "train", "optimizer"):
    c[sec] = main[sec]
  c.train.progress_bar = True
  c.model = base.lm_model(**main_job.STUDENT)
  c.model.init_checkpoint = ""
  c.teacher.update(base.lm_model(**main_job.TEACHER).to_dict())
  c.teacher.checkpoint = f"{WORKDIR}/teacher"
  _update(c, _mode(mode))
  return c
