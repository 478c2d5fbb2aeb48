"""Layers with PyTorch's semantics, shared by every model: BatchNorm and the initialisers.

The reference implementation is PyTorch, and its numbers depend on PyTorch's defaults (BatchNorm's
unbiased running variance, Kaiming-normal convolutions, ±1/sqrt(fan_in) linear layers). All models
(`models`, `resnet`, `inception_resnet`) build on these, so they behave alike.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from jax.custom_derivatives import SymbolicZero
import jax.numpy as jnp

# PyTorch's defaults, which the reference implementation relies on: convolutions get Kaiming-normal
# (fan_out, ReLU gain) kernels; linear layers and all biases are uniform in ±1/sqrt(fan_in).
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
torch_linear_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
  bound = 1.0 / fan_in**0.5

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def at_least_float32(x: jax.Array) -> jax.Array:
  """bfloat16 -> float32; float32 and float64 (the exactness tests) unchanged."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class BatchNorm(nn.Module):
  """PyTorch's BatchNorm over all axes but the last: normalises with the batch's biased variance
  (two-pass), while the running variance it keeps is the unbiased one; momentum 0.1, eps 1e-5.

  Flax's `nn.BatchNorm` keeps the biased variance, which shifts inference-mode outputs (evaluation
  and the frozen extractor) by a factor sqrt(n/(n−1)) at small n — 0.4% for the FC layer at batch
  128. Statistics are over the global batch, also when the batch is sharded over devices.
  """
  use_running_average: bool
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Any = None  # of the output (None: the input's); statistics are at least float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_dtype = self.dtype or x.dtype
    x = at_least_float32(x)
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axes)
      var = jnp.mean(jnp.square(x - mean), axes)
      if not self.is_initializing():
        count = x.size // features
        unbiased = var * count / max(count - 1, 1)
        running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
        running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased
    return ((x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(out_dtype)


_NHWC = ("NHWC", "HWIO", "NHWC")


def lax_conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """XLA's own stride-1 'SAME' convolution (NHWC, HWIO)."""
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_NHWC)


def conv_as_matmuls(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The same 'SAME' convolution as a sum over kernel taps of (shifted x) @ kernel[i, j]."""
  batch, height, width, channels = x.shape
  kh, kw = kernel.shape[:2]
  padded = jnp.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
  out = sum(padded[:, i:i + height, j:j + width, :].reshape(-1, channels) @ kernel[i, j]
            for i in range(kh) for j in range(kw))
  return out.reshape(batch, height, width, kernel.shape[-1])


@jax.custom_jvp
def conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A stride-1 'SAME' convolution (NHWC, HWIO) whose kernel gradient is fast on CPU.

  XLA:CPU computes ∂L/∂kernel of a convolution as a convolution with an image-sized window, which
  on this project's CPUs takes 5–16× the forward's time (experiments/results/cpu_vs_torch.md). Here
  the tangent's kernel term is written as one matmul per kernel tap on CPU, so its transpose (the
  kernel gradient, also inside second-order meta gradients) is matmuls; other platforms keep the
  convolution. The value is the convolution's, the derivatives equal it to float rounding.
  """
  return lax_conv_same(x, kernel)


def _conv_same_jvp(primals, tangents):
  x, kernel = primals
  dx, dkernel = tangents
  terms = []
  if not isinstance(dx, SymbolicZero):
    terms.append(conv_same(dx, kernel))
  if not isinstance(dkernel, SymbolicZero):
    terms.append(jax.lax.platform_dependent(x, dkernel, cpu=conv_as_matmuls,
                                            default=lax_conv_same))
  out = conv_same(x, kernel)
  return out, sum(terms) if terms else jnp.zeros_like(out)


conv_same.defjvp(_conv_same_jvp, symbolic_zeros=True)


class Conv(nn.Module):
  """`nn.Conv` for stride-1 'SAME' convolutions (same parameters, names and initialisers) computed
  by `conv_same`: a fast kernel gradient on CPU."""
  features: int
  kernel_size: Sequence[int]
  kernel_init: Callable[..., jax.Array]
  bias_init: Callable[..., jax.Array]
  dtype: Any = None  # compute dtype (None: that of inputs and parameters)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features))
    bias = self.param("bias", self.bias_init, (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return conv_same(x, kernel) + bias


def _pool_windows(x: jax.Array, size: int) -> jax.Array:
  """(B, H, W, C) -> (B, H/size, W/size, C, size²): the non-overlapping windows, each in row-major
  order (a remainder row or column is dropped, as by a VALID pooling)."""
  batch, height, width, channels = x.shape
  rows, cols = height // size, width // size
  x = x[:, :rows * size, :cols * size].reshape(batch, rows, size, cols, size, channels)
  return x.transpose(0, 1, 3, 5, 2, 4).reshape(batch, rows, cols, channels, size * size)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def max_pool(x: jax.Array, size: int) -> jax.Array:
  """`nn.max_pool(x, (size, size), strides=(size, size))`, with a gradient XLA:CPU computes fast.

  XLA's gradient of a pooling window is a select-and-scatter, slow on CPU (at batch 128, 2.7× the
  time of this one). Here the tangent takes each window's first maximum (row-major, as
  select-and-scatter and PyTorch do: ties give the whole gradient to the first), a one-hot mask
  whose transpose is elementwise.
  """
  return _pool_windows(x, size).max(-1)


@max_pool.defjvp
def _max_pool_jvp(size, primals, tangents):
  (x,), (dx,) = primals, tangents
  windows = _pool_windows(x, size)
  first_max = jax.nn.one_hot(jnp.argmax(windows, -1), size * size, dtype=x.dtype)
  return windows.max(-1), jnp.sum(_pool_windows(dx, size) * first_max, -1)
