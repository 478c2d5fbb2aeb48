"""Layers with PyTorch's semantics, shared by every model: BatchNorm and the initialisers.

The reference implementation is PyTorch, and its numbers depend on PyTorch's defaults (BatchNorm's
unbiased running variance, Kaiming-normal convolutions, ±1/sqrt(fan_in) linear layers). All models
(`models`, `resnet`, `inception_resnet`) build on these, so they behave alike.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
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
