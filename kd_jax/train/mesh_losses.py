"""Fused LM-head losses on a device mesh: each device its own tokens.

`kd_jax.losses.fused_head_divergence` walks the tokens chunk by chunk with a
`lax.scan`. Under plain `jax.jit` with the tokens sharded over the batch
axes, the scan runs over a *sharded* axis, and XLA's SPMD partitioner
resolves that by all-gathering the scanned tokens: every device then
computes the head loss of the *global* batch, and sharding propagation
carries the replicated layout back into the models (compiling the Llama-3.1
8B -> Llama-3.2 1B step of `experiments/plan_scale.py` on 64 simulated
devices at 64 x 4096 tokens: 547 GiB of temporaries and 1,236 TFLOP of
matmuls per device, against 15.5 GiB and 120 TFLOP with
`shard_fused_loss`; docs/scaling.md).

`shard_fused_loss(mesh)` returns a drop-in `fused_loss` for
`kd_jax.train.lm_steps.make_lm_distill_step(fused=True, fused_loss=...)`
that runs the loss under `jax.shard_map`: the hidden states, mask and
labels ``[B, T, ...]`` are split over the batch axes (dimension 0) and,
when it divides ``T``, over the `token_axes` (dimension 1: the tensor axis,
along which the activations are replicated, so no device computes a token
twice); the head kernels (and biases) enter whole (FSDP shards are gathered
once before the loss, as for any matmul). The per-token losses come back
with the hidden states' sharding; the kernel gradient is summed over the
mesh inside the loss's custom VJP. Values and gradients equal the plain
call's (tests/test_mesh_losses.py).

>>> import jax
>>> from kd_jax.train import sharding
>>> loss = shard_fused_loss(sharding.make_mesh({"data": 1},
...                                            jax.devices()[:1]))
>>> callable(loss)
True
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from kd_jax.train.sharding import BATCH_AXES


def _size(mesh: Mesh, axes) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def _lead_spec(mesh, lead, batch_axes, token_axes):
  """PartitionSpec entries of the leading (token) dimensions."""
  n = _size(mesh, batch_axes)
  if not lead or lead[0] % n:
    raise ValueError(f"shard_fused_loss: the leading (batch) dimension of "
                     f"the hidden states {tuple(lead)} must be a multiple of "
                     f"the batch axes {batch_axes} of size {n}")
  spec = [batch_axes]
  if len(lead) > 1:
    t = _size(mesh, token_axes)
    spec.append(token_axes if token_axes and t > 1 and lead[1] % t == 0
                else None)
  return spec + [None] * (len(lead) - len(spec))


def shard_fused_loss(mesh: Mesh, fused_loss: Optional[Callable] = None, *,
                     batch_axes: Sequence[str] = BATCH_AXES,
                     token_axes: Sequence[str] = ("tensor",)) -> Callable:
  """`fused_loss` (default `kd_jax.losses.fused_head_divergence`) per device.

  Args:
    mesh: the step's mesh (e.g. `MeshParallel(...).mesh`).
    fused_loss: ``f(h_s, k_s, h_t, k_t, *, where=, labels=, **kw)``.
    batch_axes: mesh axes dimension 0 of the hidden states is split over
      (the batch sharding of `MeshParallel`).
    token_axes: mesh axes dimension 1 (time) is split over when they divide
      it; the activations are replicated along them.

  Returns:
    A function with `fused_loss`'s signature (optional ``student_bias`` /
    ``teacher_bias`` keywords enter whole, like the kernels).
  """
  if fused_loss is None:
    from kd_jax.losses import fused_head_divergence  # pylint: disable=g-import-not-at-top
    fused_loss = fused_head_divergence
  batch_axes = tuple(batch_axes)
  token_axes = tuple(a for a in token_axes if a in mesh.shape
                     and a not in batch_axes)
  unknown = [a for a in batch_axes if a not in mesh.shape]
  if unknown:
    raise ValueError(f"shard_fused_loss: batch axes {unknown} are not axes "
                     f"of the mesh {dict(mesh.shape)}")

  def loss(student_hidden, student_kernel, teacher_hidden, teacher_kernel,
           *, where=None, labels=None, student_bias=None, teacher_bias=None,
           **kw):
    lead = tuple(student_hidden.shape[:-1])
    spec = _lead_spec(mesh, lead, batch_axes, token_axes)
    tok, hid = P(*spec), P(*spec, None)
    named = {"where": where, "labels": labels, "student_bias": student_bias,
             "teacher_bias": teacher_bias}
    keys = [k for k, v in named.items() if v is not None]
    specs = [tok if k in ("where", "labels") else P() for k in keys]

    def local(hs, ks, ht, kt, *extra):
      return fused_loss(hs, ks, ht, kt, **dict(zip(keys, extra)), **kw)

    out = (tok, tok) if labels is not None else tok
    return jax.shard_map(
        local, mesh=mesh, in_specs=(hid, P(), hid, P(), *specs),
        out_specs=out)(student_hidden, student_kernel, teacher_hidden,
                       teacher_kernel, *[named[k] for k in keys])

  return loss
