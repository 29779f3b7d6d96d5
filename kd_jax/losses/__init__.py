"""Distillation losses: pure functions of arrays.

Response-based (`logits`), divergences, feature-based (`features`),
relation-based (`relations`), self-distillation (`self_distillation`: BYOT,
Tf-KD_reg), transformers' intermediate layers (`transformer`: hidden states,
self-attention relations), token-level losses for language models (`tokens`:
fused LM-head divergences in bounded memory, sparse top-k teachers;
`minillm`: MiniLLM's policy-gradient terms) and across tokenizers
(`cross_tokenizer`: ULD, GOLD's extended ULD and hybrid loss, bits per byte).
Every function validates shapes/dtypes at trace
time, computes in float32 and never differentiates through the teacher.

`LOGIT_LOSSES`, `FEATURE_LOSSES` and `TOPK_LOSSES` are the explicit
registries behind the short names of `kd_jax.train.Term` (`Term('kd', ...)`
is `kd_loss`): logit losses are functions `(student_logits, teacher_logits,
...)`, feature losses take two feature arrays (or lists of them), top-k
losses a sparse teacher `(student_logits, logprobs, indices, ...)`. Add a
loss with `register_loss(name, fn, on=...)` (or an entry in the dict).
"""

from typing import Callable, Dict

from kd_jax.losses._common import adaptive_avg_pool_to
# Distillation across tokenizers (ULD, GOLD's extended ULD and hybrid).
from kd_jax.losses.cross_tokenizer import TokenAlignment
from kd_jax.losses.cross_tokenizer import aligned_log_probs
from kd_jax.losses.cross_tokenizer import bits_per_byte
from kd_jax.losses.cross_tokenizer import extended_uld_loss
from kd_jax.losses.cross_tokenizer import hybrid_distance
from kd_jax.losses.cross_tokenizer import hybrid_uld_loss
from kd_jax.losses.cross_tokenizer import matched_jsd
from kd_jax.losses.cross_tokenizer import merge_token_groups
from kd_jax.losses.cross_tokenizer import sequence_mean
from kd_jax.losses.cross_tokenizer import target_bytes
from kd_jax.losses.cross_tokenizer import uld_distance
from kd_jax.losses.cross_tokenizer import uld_loss
from kd_jax.losses.cross_tokenizer import uld_objective
from kd_jax.losses.divergences import forward_kl
from kd_jax.losses.divergences import js_divergence
from kd_jax.losses.divergences import reverse_kl
from kd_jax.losses.divergences import total_variation
from kd_jax.losses.features import ab_loss
from kd_jax.losses.features import at_loss
from kd_jax.losses.features import attention_map
from kd_jax.losses.features import fitnet_loss
from kd_jax.losses.features import ft_loss
from kd_jax.losses.features import hcl_loss
from kd_jax.losses.features import nst_loss
from kd_jax.losses.features import ofd_loss
from kd_jax.losses.features import ofd_margin
from kd_jax.losses.features import vid_init_log_scale
from kd_jax.losses.features import vid_loss
from kd_jax.losses.flow import fsp_loss
from kd_jax.losses.flow import kdsvd_loss
from kd_jax.losses.logits import dist_loss
from kd_jax.losses.logits import dkd_loss
from kd_jax.losses.logits import kd_loss
from kd_jax.losses.logits import ofa_loss
from kd_jax.losses.logits import standardize_logits
# MiniLLM's policy-gradient terms (per token; rollout quantities in, not
# logit pairs: not in LOGIT_LOSSES).
from kd_jax.losses.minillm import minillm_advantages
from kd_jax.losses.minillm import minillm_pg_loss
from kd_jax.losses.minillm import minillm_pt_loss
from kd_jax.losses.minillm import minillm_rewards
from kd_jax.losses.minillm import reverse_kl_estimate
from kd_jax.losses.minillm import teacher_mixed_weights
from kd_jax.losses.minillm import token_log_probs
from kd_jax.losses.relations import cc_loss
from kd_jax.losses.relations import crd_loss
from kd_jax.losses.relations import crd_memory_update
from kd_jax.losses.relations import crd_normalization
from kd_jax.losses.relations import pkt_loss
from kd_jax.losses.relations import rkd_loss
from kd_jax.losses.relations import sp_loss
from kd_jax.losses.self_distillation import byot_feature_loss
from kd_jax.losses.self_distillation import soft_cross_entropy
from kd_jax.losses.self_distillation import tf_kd_reg_loss
from kd_jax.losses.self_distillation import virtual_teacher
from kd_jax.losses.transformer import attention_relation_loss
from kd_jax.losses.transformer import hidden_state_loss
# Token-level losses for language models (fused LM heads, sparse teachers).
from kd_jax.losses.tokens import fused_head_divergence
from kd_jax.losses.tokens import fused_head_topk_kd
from kd_jax.losses.tokens import topk_kd_loss

LOGIT_LOSSES: Dict[str, Callable] = {
    "kd": kd_loss,
    "dkd": dkd_loss,
    "dist": dist_loss,
    "ofa": ofa_loss,
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "js_divergence": js_divergence,
    "total_variation": total_variation,
    "soft_cross_entropy": soft_cross_entropy,
}
"""Short name -> loss of `(student_logits, teacher_logits, ...)`."""

FEATURE_LOSSES: Dict[str, Callable] = {
    "ab": ab_loss,
    "at": at_loss,
    "fitnet": fitnet_loss,
    "fsp": fsp_loss,
    "ft": ft_loss,
    "hcl": hcl_loss,
    "kdsvd": kdsvd_loss,
    "nst": nst_loss,
    "ofd": ofd_loss,
    "vid": vid_loss,
    "cc": cc_loss,
    "crd": crd_loss,
    "pkt": pkt_loss,
    "rkd": rkd_loss,
    "sp": sp_loss,
}
"""Short name -> loss of two feature arrays (or lists of them)."""

TOPK_LOSSES: Dict[str, Callable] = {
    "topk_kd": topk_kd_loss,
}
"""Short name -> loss of `(student_logits, teacher_topk_logprobs,
teacher_topk_indices, ...)`: a teacher given by a top-k cache."""

_KINDS = {"logits": LOGIT_LOSSES, "features": FEATURE_LOSSES,
          "topk": TOPK_LOSSES}


def register_loss(name: str, fn: Callable, *, on: str = "logits") -> Callable:
  """Adds `fn` under `name` to the registry of `on` ('logits'/'features').

  Returns `fn`, so it also works as `register_loss('x', fn)` at definition.
  """
  if on not in _KINDS:
    raise ValueError(f"register_loss: `on` must be one of {sorted(_KINDS)}; "
                     f"got {on!r}.")
  if not callable(fn):
    raise TypeError(f"register_loss: {name!r} must map to a callable.")
  other = _KINDS[on].get(name)
  if other is not None and other is not fn:
    raise ValueError(f"loss name {name!r} is already registered ({on}).")
  _KINDS[on][name] = fn
  return fn
