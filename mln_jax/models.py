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
import ml_collections

from mln_jax import inception_resnet, layers, resnet


def _batch_norm(train: bool, dtype: Any) -> layers.BatchNorm:
  return layers.BatchNorm(use_running_average=not train, dtype=dtype)


def _conv(features: int, in_channels: int, dtype: Any) -> layers.Conv:
  return layers.Conv(features, (3, 3), kernel_init=layers.kaiming_normal_fan_out,
                     bias_init=layers.torch_bias_init(in_channels * 9), dtype=dtype)


def _dense(features: int, in_features: int, dtype: Any = None) -> nn.Dense:
  return nn.Dense(features, kernel_init=layers.torch_linear_kernel,
                  bias_init=layers.torch_bias_init(in_features), dtype=dtype)


class ConvBNClassifier(nn.Module):
  """VGG-style CNN: blocks of 3x3 conv+BN+ReLU, 2x2 max-pool after each block, FC+BN+ReLU features,
  FC.

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
      x = layers.max_pool(x, 2)
    x = x.reshape((x.shape[0], -1))
    x = _dense(self.feature_dim, x.shape[-1], self.dtype)(x)
    features = nn.relu(_batch_norm(train, self.dtype)(x))
    logits = _dense(self.num_classes, self.feature_dim, self.dtype)(features)
    # Losses, soft labels and MetaLabelNet work in (at least) float32 whatever the compute dtype.
    return layers.at_least_float32(logits), layers.at_least_float32(features)


CifarCNN = functools.partial(ConvBNClassifier, blocks=((64, 64), (128, 128), (196, 196)),
                             feature_dim=256)


class MLPClassifier(nn.Module):
  """A BatchNorm-free multilayer perceptron on flattened images (a second architecture for
  tests)."""
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
    return layers.at_least_float32(logits), layers.at_least_float32(x)


class MetaLabelNet(nn.Module):
  """The soft-label generator: one linear layer on extractor features; returns soft-label logits.

  The soft labels are `softmax` of the output (SPEC: `ŷ = softmax(W e + b)`); logits are returned so
  that `log ŷ` can be taken stably with `log_softmax`.
  """
  num_classes: int

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    return _dense(self.num_classes, features.shape[-1])(features)


MODEL_NAMES = ("cifar_cnn", "conv_bn", "mlp", "resnet50", "resnet", "inception_resnet_v2")


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds a classifier by name (MODEL_NAMES): the paper's CIFAR CNN, a configurable conv-BN CNN,
  an MLP, ResNet-50 (Clothing1M), a ResNet of any depth, or Inception-ResNet-v2 (WebVision)."""
  if name == "cifar_cnn":
    return CifarCNN(num_classes=num_classes, **kwargs)
  if name == "conv_bn":
    return ConvBNClassifier(num_classes=num_classes, **kwargs)
  if name == "mlp":
    return MLPClassifier(num_classes=num_classes, **kwargs)
  if name in ("resnet50", "resnet"):
    return (resnet.ResNet50 if name == "resnet50" else resnet.ResNet)(num_classes=num_classes,
                                                                      **kwargs)
  if name == "inception_resnet_v2":
    return inception_resnet.InceptionResNetV2(num_classes=num_classes, **kwargs)
  raise ValueError(f"Unknown model {name!r}: choose one of {MODEL_NAMES} "
                   "(--config.model.name=...).")


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """The classifier `config.model` describes, computing in `config.compute_dtype`."""
  kwargs: dict[str, Any] = {"dtype": jnp.bfloat16 if config.compute_dtype == "bfloat16" else None}
  if config.model.name == "conv_bn":
    kwargs.update(blocks=tuple(tuple(b) for b in config.model.blocks),
                  feature_dim=config.model.feature_dim)
  elif config.model.name == "mlp":
    kwargs.update(hidden=tuple(config.model.hidden))
  elif config.model.name == "resnet":
    kwargs.update(stage_sizes=tuple(config.model.stage_sizes), num_filters=config.model.num_filters)
  return create_model(config.model.name, num_classes, **kwargs)
