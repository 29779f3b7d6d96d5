"""Distillation losses: pure functions of arrays.

Response-based (`logits`), divergences, feature-based (`features`) and
relation-based (`relations`). Every function validates shapes/dtypes at trace
time, computes in float32 and never differentiates through the teacher.
"""

from kd_jax.losses.divergences import forward_kl
from kd_jax.losses.divergences import js_divergence
from kd_jax.losses.divergences import reverse_kl
from kd_jax.losses.divergences import total_variation
from kd_jax.losses.logits import dist_loss
from kd_jax.losses.logits import dkd_loss
from kd_jax.losses.logits import kd_loss
from kd_jax.losses.logits import ofa_loss
from kd_jax.losses.logits import standardize_logits
# Feature- and relation-based losses (issue 6).
from kd_jax.losses.features import ab_loss
from kd_jax.losses.features import at_loss
from kd_jax.losses.features import attention_map
from kd_jax.losses.features import fitnet_loss
from kd_jax.losses.features import fsp_loss
from kd_jax.losses.features import ft_loss
from kd_jax.losses.features import hcl_loss
from kd_jax.losses.features import kdsvd_loss
from kd_jax.losses.features import nst_loss
from kd_jax.losses.features import ofd_loss
from kd_jax.losses.features import ofd_margin
from kd_jax.losses.features import vid_init_log_scale
from kd_jax.losses.features import vid_loss
from kd_jax.losses.relations import cc_loss
from kd_jax.losses.relations import crd_loss
from kd_jax.losses.relations import crd_memory_update
from kd_jax.losses.relations import crd_normalization
from kd_jax.losses.relations import pkt_loss
from kd_jax.losses.relations import rkd_loss
from kd_jax.losses.relations import sp_loss
# Token-level losses for language models (fused LM heads, sparse teachers).
from kd_jax.losses.tokens import fused_head_divergence
from kd_jax.losses.tokens import fused_head_topk_kd
from kd_jax.losses.tokens import topk_kd_loss
