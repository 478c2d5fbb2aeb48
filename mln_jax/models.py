"""Classifiers (each returns `(logits, features)`) and the MetaLabelNet soft-label generator.

MetaLabelNet only needs a classifier whose `__call__(x, train)` returns logits and the penultimate
features; any Flax Linen module with that contract works with `meta_step`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's defaults, which the reference implementation relies on: convolutions get Kaiming-normal
# (fan_out, ReLU gain) kernels; linear layers and all biases are uniform in ±1/sqrt(fan_in).
_kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_torch_linear_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
  bound = 1.0 / fan_in**0.5

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _at_least_float32(x: jax.Array) -> jax.Array:
  """bfloat16 -> float32; float32 and float64 (the exactness tests) unchanged."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class BatchNorm(nn.Module):
  """PyTorch's BatchNorm over all axes but the last: normalises with the batch's biased variance
  (two-pass), while the running variance it keeps is the unbiased one; momentum 0.1, eps 1e-5.

  Flax's `nn.BatchNorm` keeps the biased variance, which shifts inference-mode outputs (evaluation and
  the frozen extractor) by a factor sqrt(n/(n−1)) at small n — 0.4% for the FC layer at batch 128.
  Statistics are over the global batch, also when the batch is sharded over devices.
  """
  use_running_average: bool
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Any = None  # of the output (None: the input's); statistics are at least float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_dtype = self.dtype or x.dtype
    x = _at_least_float32(x)
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


def _batch_norm(train: bool, dtype: Any) -> BatchNorm:
  return BatchNorm(use_running_average=not train, dtype=dtype)


def _conv(features: int, in_channels: int, dtype: Any) -> nn.Conv:
  return nn.Conv(features, (3, 3), padding=1, kernel_init=_kaiming_normal_fan_out,
                 bias_init=_torch_bias_init(in_channels * 9), dtype=dtype)


def _dense(features: int, in_features: int, dtype: Any = None) -> nn.Dense:
  return nn.Dense(features, kernel_init=_torch_linear_kernel, bias_init=_torch_bias_init(in_features),
                  dtype=dtype)


class ConvBNClassifier(nn.Module):
  """VGG-style CNN: blocks of 3x3 conv+BN+ReLU, 2x2 max-pool after each block, FC+BN+ReLU features, FC.

  `CifarCNN` is the paper's 8-layer CIFAR-10 network: blocks (64, 64), (128, 128), (196, 196),
  FC 3136 -> 256 -> 10.
  """
  num_classes: int
  blocks: Sequence[Sequence[int]] = ((64, 64), (128, 128), (196, 196))
  feature_dim: int = 256
  dtype: Any = None  # compute dtype (None: that of inputs and parameters); parameters stay float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    for block in self.blocks:
      for width in block:
        x = _conv(width, x.shape[-1], self.dtype)(x)
        x = nn.relu(_batch_norm(train, self.dtype)(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = _dense(self.feature_dim, x.shape[-1], self.dtype)(x)
    features = nn.relu(_batch_norm(train, self.dtype)(x))
    logits = _dense(self.num_classes, self.feature_dim, self.dtype)(features)
    # Losses, soft labels and MetaLabelNet work in (at least) float32 whatever the compute dtype.
    return _at_least_float32(logits), _at_least_float32(features)


CifarCNN = functools.partial(ConvBNClassifier, blocks=((64, 64), (128, 128), (196, 196)), feature_dim=256)


class MLPClassifier(nn.Module):
  """A BatchNorm-free multilayer perceptron on flattened images (a second architecture for tests)."""
  num_classes: int
  hidden: Sequence[int] = (64, 32)
  dtype: Any = None  # compute dtype (None: that of inputs and parameters); parameters stay float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    del train  # No BatchNorm or dropout: training and inference are the same function.
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(_dense(width, x.shape[-1], self.dtype)(x))
    logits = _dense(self.num_classes, x.shape[-1], self.dtype)(x)
    return _at_least_float32(logits), _at_least_float32(x)


class MetaLabelNet(nn.Module):
  """The soft-label generator: one linear layer on extractor features; returns soft-label logits.

  The soft labels are `softmax` of the output (SPEC: `ŷ = softmax(W e + b)`); logits are returned so that
  `log ŷ` can be taken stably with `log_softmax`.
  """
  num_classes: int

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    return _dense(self.num_classes, features.shape[-1])(features)


MODEL_NAMES = ("cifar_cnn", "conv_bn", "mlp", "resnet50", "resnet", "inception_resnet_v2")


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds a classifier by name (MODEL_NAMES): the paper's CIFAR CNN, a configurable conv-BN CNN, an
  MLP, ResNet-50 (Clothing1M), a ResNet of any depth, or Inception-ResNet-v2 (WebVision)."""
  # The large models import this module (BatchNorm), so they are imported here, not at the top.
  if name == "cifar_cnn":
    return CifarCNN(num_classes=num_classes, **kwargs)
  if name == "conv_bn":
    return ConvBNClassifier(num_classes=num_classes, **kwargs)
  if name == "mlp":
    return MLPClassifier(num_classes=num_classes, **kwargs)
  if name in ("resnet50", "resnet"):
    from mln_jax import resnet
    return (resnet.ResNet50 if name == "resnet50" else resnet.ResNet)(num_classes=num_classes,
                                                                      **kwargs)
  if name == "inception_resnet_v2":
    from mln_jax import inception_resnet
    return inception_resnet.InceptionResNetV2(num_classes=num_classes, **kwargs)
  raise ValueError(f"Unknown model {name!r}: choose one of {MODEL_NAMES} (--config.model.name=...).")
