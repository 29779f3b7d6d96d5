"""Distillation losses: pure functions of arrays.

Response-based (`logits`), divergences, feature-based (`features`) and
relation-based (`relations`). Every function validates shapes/dtypes at trace
time, computes in float32 and never differentiates through the teacher.
"""

from kd_jax.losses.logits import kd_loss
from kd_jax.losses.logits import standardize_logits
