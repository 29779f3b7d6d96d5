"""Layers with PyTorch-equivalent initialization and BatchNorm settings.

Shared by the CNN families so that a Flax model initialises like the
reference PyTorch definition and a converted PyTorch checkpoint computes the
same function:

* `conv`: `nn.Conv` with explicit PyTorch-style padding (never 'SAME', which
  pads asymmetrically for stride-2 convolutions) and Kaiming-normal fan-out
  init (`nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu')`,
  i.e. $w \\sim \\mathcal{N}(0, 2 / (k_h k_w C_{out}))$, untruncated; the
  CIFAR WRN/VGG `normal_(0, sqrt(2/n))` with $n = k_h k_w C_{out}$ is the same
  distribution).
* `batch_norm`: `nn.BatchNorm` with torch's `momentum=0.1` (Flax's `momentum`
  is the weight of the *old* statistics, so 0.9), `eps=1e-5`, scale 1 / bias 0,
  float32 statistics. One difference remains: torch updates `running_var` with
  the unbiased batch variance ($\\times n/(n-1)$, $n = B H W$), Flax with the
  biased one; normalisation itself is identical.
* `torch_conv`, `torch_conv_transpose`, `torch_default_init`,
  `kaiming_uniform_a1`: the PyTorch defaults the distillers' adapters use.
* `linear`: `nn.Linear`'s default init,
  $W, b \\sim \\mathcal{U}(-1/\\sqrt{d_{in}}, 1/\\sqrt{d_{in}})$.

Layout: Flax convolutions are NHWC with HWIO kernels; PyTorch is NCHW with
OIHW kernels (`kd_jax.models.convert` transposes).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models import _canonical_conv

Dtype = Any

kaiming_normal_fan_out = nn.initializers.variance_scaling(
    2.0, "fan_out", "normal")
"""`torch.nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu')`."""

torch_linear_kernel_init = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform")
"""`nn.Linear` default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""


def torch_linear_bias_init(fan_in: int) -> Callable:
  """`nn.Linear` default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def conv(features: int, kernel: int, *, stride: int = 1, padding: int = 0,
         use_bias: bool = False, dtype: Dtype = jnp.float32,
         groups: int = 1, name: Optional[str] = None,
         kernel_init: Callable = kaiming_normal_fan_out) -> nn.Conv:
  """`nn.Conv2d(k, stride, padding, bias)` equivalent (NHWC, HWIO kernel)."""
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride),
      padding=((padding, padding), (padding, padding)), use_bias=use_bias,
      feature_group_count=groups, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=kernel_init, bias_init=nn.initializers.zeros,
      conv_general_dilated=_canonical_conv.conv_general_dilated, name=name)


def batch_norm(train: bool, axis_name: Optional[str] = None, *,
               dtype: Dtype = jnp.float32, use_scale: bool = True,
               use_bias: bool = True,
               name: Optional[str] = None) -> nn.BatchNorm:
  """`nn.BatchNorm2d` equivalent: momentum 0.1 (torch) = 0.9 (Flax), eps 1e-5.

  `axis_name` (training only) normalizes with statistics over that `pmap`
  axis (sync BN; the distillers' adapters pass theirs).
  """
  return nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5,
      dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False,
      use_scale=use_scale, use_bias=use_bias,
      axis_name=axis_name if train else None, name=name)


def uniform_init(bound: float) -> Callable:
  """U(-bound, bound)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def torch_default_init(fan_in: int) -> Callable:
  """PyTorch's default `Conv2d` / `Linear` init, U(+-1/sqrt(fan_in))."""
  return uniform_init(1.0 / math.sqrt(fan_in))


kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
"""`torch.nn.init.kaiming_uniform_(a=1)`: gain 1, bound sqrt(3 / fan_in)."""


def torch_conv(features, kernel, *, stride=1, padding=0, use_bias=True,
               groups=1, fan_in=None, kernel_init=None, name=None) -> nn.Conv:
  """`nn.Conv2d` with explicit symmetric padding and PyTorch's default init.

  `fan_in` given: weights and bias U(+-1/sqrt(fan_in)) (torch's default);
  `kernel_init` overrides the weights' init (bias then 0).
  """
  kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
  ph, pw = (padding, padding) if isinstance(padding, int) else padding
  init = kernel_init or (torch_default_init(fan_in) if fan_in else None)
  kwargs = {}
  if init is not None:
    kwargs["kernel_init"] = init
  if use_bias:
    kwargs["bias_init"] = (torch_default_init(fan_in) if fan_in
                           else nn.initializers.zeros)
  return nn.Conv(features, (kh, kw), strides=(stride, stride),
                 padding=((ph, ph), (pw, pw)), use_bias=use_bias,
                 feature_group_count=groups, param_dtype=jnp.float32,
                 name=name, **kwargs)


def torch_conv_transpose(features, kernel, *, stride, padding, fan_in,
                         name=None) -> nn.ConvTranspose:
  """`nn.ConvTranspose2d(kernel, stride, padding)` (output `(H-1)s - 2p + k`).

  Flax's explicit transposed-conv padding is `k - 1 - p` per side, and
  `transpose_kernel=True` gives PyTorch's gradient-of-conv semantics.
  PyTorch computes the default init's fan-in of a transposed conv from
  `weight.size(1) * k * k` = `out * k * k`.
  """
  q = kernel - 1 - padding
  return nn.ConvTranspose(
      features, (kernel, kernel), strides=(stride, stride),
      padding=((q, q), (q, q)), transpose_kernel=True, use_bias=True,
      kernel_init=torch_default_init(fan_in),
      bias_init=torch_default_init(fan_in), param_dtype=jnp.float32,
      name=name)


def linear(features: int, *, fan_in: int, dtype: Dtype = jnp.float32,
           kernel_init: Optional[Callable] = None,
           bias_init: Optional[Callable] = None,
           name: Optional[str] = None) -> nn.Dense:
  """`nn.Linear(fan_in, features)` equivalent, torch default init unless given.

  Params `kernel` `[fan_in, features]` (= torch `weight.T`) and `bias`.
  """
  return nn.Dense(
      features, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=kernel_init or torch_linear_kernel_init,
      bias_init=bias_init or torch_linear_bias_init(fan_in), name=name)


def check_image_input(x, model: str, *, hw: Optional[Sequence[int]] = None,
                      min_hw: int = 1, channels: int = 3) -> None:
  """Raises ValueError unless `x` is NHWC `[B, H, W, channels]` as expected.

  `hw` fixes (H, W) exactly (CIFAR models); otherwise H, W >= `min_hw`.
  """
  shape = tuple(getattr(x, "shape", ()))
  if hw is not None:
    expected = f"[B, {hw[0]}, {hw[1]}, {channels}]"
    ok = len(shape) == 4 and shape[1:] == (hw[0], hw[1], channels)
  else:
    expected = (f"[B, H, W, {channels}] with H, W >= {min_hw} (e.g. "
                f"[B, 224, 224, {channels}])")
    ok = (len(shape) == 4 and shape[3] == channels and shape[1] >= min_hw
          and shape[2] >= min_hw)
  if not ok:
    raise ValueError(
        f"{model} expects an NHWC image batch `x` of shape {expected}; got "
        f"{shape}. (PyTorch NCHW tensors map to NHWC via "
        f"x.transpose(0, 2, 3, 1).)")
  if not jnp.issubdtype(jnp.result_type(x), jnp.number):
    raise TypeError(f"{model}: `x` must be numeric; got {jnp.result_type(x)}.")


def global_avg_pool(x):
  """Mean over H, W (accumulated in float32), NHWC -> [B, C] in x's dtype."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)


def max_pool_nonoverlapping(x, window: int = 2):
  r"""`nn.max_pool(x, (k, k), strides=(k, k))` (VALID) as a reshape and a max.

  For a `[..., H, W, C]` input and window $k$ the output is
  $y_{i j c} = \max_{0 \le a, b < k} x_{k i + a,\, k j + b,\, c}$ for
  $i < \lfloor H/k \rfloor$, $j < \lfloor W/k \rfloor$ (trailing rows / columns
  that do not fill a window are dropped, as with VALID padding). The pooled
  axes are split into `[H/k, k]`, `[W/k, k]` and reduced with `jnp.max`.

  Forward values equal `nn.max_pool`'s exactly. Gradients are equal wherever
  the maximum of a window is unique (at ties `jnp.max` splits the cotangent
  evenly among the tied inputs, `nn.max_pool` gives it all to one of them).
  Why: XLA lowers the gradient of a `reduce_window` max into index arrays, an
  argmax and a scatter (`select_and_scatter`), which on CPU costs about a
  quarter of a small CNN's train step; the gradient of a plain reduction is
  one compare-and-select fusion.

  Args:
    x: `[..., H, W, C]` array (at least 3-D), H, W >= `window`.
    window: k, the window size and stride of both spatial axes.

  Returns:
    `[..., H // k, W // k, C]` array of x's dtype.
  """
  k = int(window)
  if k < 1:
    raise ValueError(f"max_pool_nonoverlapping: window must be >= 1; got "
                     f"{window}.")
  shape = tuple(getattr(x, "shape", ()))
  if len(shape) < 3 or shape[-3] < k or shape[-2] < k:
    raise ValueError(
        f"max_pool_nonoverlapping expects `x` of shape [..., H, W, C] with H, "
        f"W >= window={k}; got {shape}.")
  *lead, h, w, c = shape
  ho, wo = h // k, w // k
  if k == 1:
    return x
  x = x[..., :ho * k, :wo * k, :]
  x = x.reshape(tuple(lead) + (ho, k, wo, k, c))
  n = len(lead)
  return jnp.max(x, axis=(n + 1, n + 3))


def _boundary_cpu(x):
  first = x.reshape(-1)[0]
  # Two branches with the same values (+0 keeps XLA from folding the
  # conditional away; it maps -0.0 to +0.0 and nothing else).
  return jax.lax.cond(first == first, lambda a: a + 0, lambda a: a + 0, x)


@jax.custom_vjp
def fusion_boundary(x):
  r"""Identity that makes XLA:CPU read `x` from memory instead of recomputing.

  XLA:CPU fuses a chain of elementwise producers into every consumer, even
  when the chain's result is already materialized for another user. In a
  residual stage the block output
  $x_k = \mathrm{relu}(\mathrm{bn}(\mathrm{conv}(\cdot)) + x_{k-1})$ then
  recomputes $x_{k-1}, x_{k-2}, \dots$ from their convolution outputs:
  up to 50 fused inputs per block in ResNet-56. A conditional is a fusion
  boundary, so passing the block input through one makes each block read it
  once. Values are unchanged (up to the sign of zero); the gradient is the
  identity. On backends other than CPU this is a plain identity.
  """
  return jax.lax.platform_dependent(x, cpu=_boundary_cpu, default=lambda a: a)


fusion_boundary.defvjp(lambda x: (fusion_boundary(x), None),
                       lambda _, g: (g,))
