"""Inception-ResNet-v2 (Szegedy et al. 2016), the paper's classifier for WebVision (299x299, 50
classes).

The layout is the widely used one of TF-slim's `inception_resnet_v2` (also Keras'
`InceptionResNetV2` and timm's `inception_resnet_v2`): stem, Mixed_5b, 10 x Inception-ResNet-A
(block35), reduction Mixed_6a, 20 x Inception-ResNet-B (block17), reduction Mixed_7a, 10 x
Inception-ResNet-C (block8), 1x1 conv to 1536 channels, global average pool (the features) and a
linear classifier. At 299x299 the grids are 35x35 (A), 17x17 (B) and 8x8 (C).

Initialisation is random, as in the paper's WebVision runs, and the public implementations disagree
(TF-slim and Keras: Glorot uniform; timm: PyTorch's default). Convolutions here get Kaiming-normal
kernels (untruncated; fan_out, ReLU gain), the repository's convention (`models.py`): He scaling is
derived for ReLU networks trained from scratch, and it matters most for the BatchNorm-free residual
projections, whose output adds straight onto the trunk (every other conv is followed by BatchNorm,
which undoes the kernel's scale in the forward pass). The classifier is initialised like PyTorch's
`nn.Linear`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mln_jax import layers

# The smallest input side every valid (unpadded) convolution and pool can take: Mixed_7a's stride-2
# 3x3 needs a 3x3 grid, so Mixed_6a needs 7, maxpool_5a 15, conv2d_4a 17, maxpool_3a 35, conv2d_2a
# 37 and conv2d_1a 75 (out = (in − 3) // 2 + 1 for the stride-2 ones, in − 2 for the others).
MIN_INPUT_SIZE = 75

# Branches of the residual blocks as (features, kernel) per conv, from TF-slim's block35/17/8.
_BLOCK35_BRANCHES = (((32, (1, 1)),),
                     ((32, (1, 1)), (32, (3, 3))),
                     ((32, (1, 1)), (48, (3, 3)), (64, (3, 3))))
_BLOCK17_BRANCHES = (((192, (1, 1)),),
                     ((128, (1, 1)), (160, (1, 7)), (192, (7, 1))))
_BLOCK8_BRANCHES = (((192, (1, 1)),),
                    ((192, (1, 1)), (224, (1, 3)), (256, (3, 1))))


def _width(channels: int, multiplier: float) -> int:
  return max(1, round(channels * multiplier))


class BasicConv(nn.Module):
  """Conv without bias, BatchNorm (eps 1e-3, as TF-slim and timm), ReLU."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: str = "SAME"  # only with stride 1 here, where it is PyTorch's symmetric `kernel // 2`
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides, padding=self.padding,
                use_bias=False, kernel_init=layers.kaiming_normal_fan_out, dtype=self.dtype,
                name="conv")(x)
    x = layers.BatchNorm(use_running_average=not train, epsilon=1e-3, dtype=self.dtype,
                         name="bn")(x)
    return nn.relu(x)


class InceptionResNetBlock(nn.Module):
  """Inception-ResNet-A/B/C: parallel conv branches, concatenated, projected back to the input width
  by a 1x1 conv with bias and no BatchNorm, scaled and added to the input; then ReLU unless `relu`
  is False. Scaling the residual (0.1–0.3) is the paper's fix for instability of wide residual
  Inceptions.
  """
  branches: Sequence[Sequence[tuple[int, tuple[int, int]]]]
  scale: float
  relu: bool = True
  width_multiplier: float = 1.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    outputs = []
    for i, branch in enumerate(self.branches):
      y = x
      for j, (features, kernel) in enumerate(branch):
        y = BasicConv(_width(features, self.width_multiplier), kernel, dtype=self.dtype,
                      name=f"branch{i}_{j}")(y, train)
      outputs.append(y)
    mixed = jnp.concatenate(outputs, axis=-1)
    up = nn.Conv(x.shape[-1], (1, 1), kernel_init=layers.kaiming_normal_fan_out,
                 bias_init=layers.torch_bias_init(mixed.shape[-1]), dtype=self.dtype,
                 name="conv2d")(mixed)
    x = x + self.scale * up
    return nn.relu(x) if self.relu else x


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # Stride 1, padding 1, padded cells excluded from the mean: TF's 'SAME' average pool (TF-slim,
  # Keras) and timm's `count_include_pad=False` agree on this, so border pixels are not darkened.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class Mixed5b(nn.Module):
  """Stem output -> 320 channels: 1x1 96 | 1x1 48, 5x5 64 | 1x1 64, 3x3 96, 3x3 96 | avgpool, 1x1
  64."""
  width_multiplier: float = 1.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    w = functools.partial(_width, multiplier=self.width_multiplier)
    conv = functools.partial(BasicConv, dtype=self.dtype)
    b0 = conv(w(96), (1, 1), name="branch0")(x, train)
    b1 = conv(w(48), (1, 1), name="branch1_0")(x, train)
    b1 = conv(w(64), (5, 5), name="branch1_1")(b1, train)
    b2 = conv(w(64), (1, 1), name="branch2_0")(x, train)
    b2 = conv(w(96), (3, 3), name="branch2_1")(b2, train)
    b2 = conv(w(96), (3, 3), name="branch2_2")(b2, train)
    b3 = conv(w(64), (1, 1), name="branch3")(_avg_pool_3x3(x), train)
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class Mixed6a(nn.Module):
  """Reduction 35 -> 17 (320 -> 1088): 3x3/2 384 | 1x1 256, 3x3 256, 3x3/2 384 | maxpool 3x3/2."""
  width_multiplier: float = 1.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    w = functools.partial(_width, multiplier=self.width_multiplier)
    conv = functools.partial(BasicConv, dtype=self.dtype)
    b0 = conv(w(384), (3, 3), strides=2, padding="VALID", name="branch0")(x, train)
    b1 = conv(w(256), (1, 1), name="branch1_0")(x, train)
    b1 = conv(w(256), (3, 3), name="branch1_1")(b1, train)
    b1 = conv(w(384), (3, 3), strides=2, padding="VALID", name="branch1_2")(b1, train)
    return jnp.concatenate([b0, b1, _max_pool_3x3_s2(x)], axis=-1)


class Mixed7a(nn.Module):
  """Reduction 17 -> 8 (1088 -> 2080): 1x1 256, 3x3/2 384 | 1x1 256, 3x3/2 288 |
  1x1 256, 3x3 288, 3x3/2 320 | maxpool 3x3/2."""
  width_multiplier: float = 1.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    w = functools.partial(_width, multiplier=self.width_multiplier)
    conv = functools.partial(BasicConv, dtype=self.dtype)
    b0 = conv(w(256), (1, 1), name="branch0_0")(x, train)
    b0 = conv(w(384), (3, 3), strides=2, padding="VALID", name="branch0_1")(b0, train)
    b1 = conv(w(256), (1, 1), name="branch1_0")(x, train)
    b1 = conv(w(288), (3, 3), strides=2, padding="VALID", name="branch1_1")(b1, train)
    b2 = conv(w(256), (1, 1), name="branch2_0")(x, train)
    b2 = conv(w(288), (3, 3), name="branch2_1")(b2, train)
    b2 = conv(w(320), (3, 3), strides=2, padding="VALID", name="branch2_2")(b2, train)
    return jnp.concatenate([b0, b1, b2, _max_pool_3x3_s2(x)], axis=-1)


class InceptionResNetV2(nn.Module):
  """Inception-ResNet-v2; `__call__(x, train)` on NHWC images of at least `MIN_INPUT_SIZE` pixels a
  side returns `(logits, features)`, features being the 1536-d global average pool.

  The defaults are the full network (55.8M parameters with 1000 classes). Fewer blocks and a
  `width_multiplier` < 1 (scaling every conv's width) give small variants of the same topology.
  """
  num_classes: int
  num_block35: int = 10   # Inception-ResNet-A, residual scale 0.17
  num_block17: int = 20   # Inception-ResNet-B, scale 0.10
  num_block8: int = 10    # Inception-ResNet-C, scale 0.20; the last one has no ReLU and scale 1.0
  width_multiplier: float = 1.0
  dtype: Any = None  # compute dtype (None: that of inputs and parameters); parameters stay float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    if x.ndim != 4 or min(x.shape[1:3]) < MIN_INPUT_SIZE:
      raise ValueError(f"InceptionResNetV2 needs NHWC images of at least {MIN_INPUT_SIZE}x"
                       f"{MIN_INPUT_SIZE} pixels (its unpadded convolutions and pools shrink "
                       f"smaller ones to nothing); got input shape {x.shape}.")
    w = functools.partial(_width, multiplier=self.width_multiplier)
    conv = functools.partial(BasicConv, dtype=self.dtype)
    block = functools.partial(InceptionResNetBlock, width_multiplier=self.width_multiplier,
                              dtype=self.dtype)
    stage_args = dict(width_multiplier=self.width_multiplier, dtype=self.dtype)

    # Stem: 299 -> 149 -> 147 -> 147 -> 73 -> 73 -> 71 -> 35.
    x = conv(w(32), (3, 3), strides=2, padding="VALID", name="conv2d_1a")(x, train)
    x = conv(w(32), (3, 3), padding="VALID", name="conv2d_2a")(x, train)
    x = conv(w(64), (3, 3), name="conv2d_2b")(x, train)
    x = _max_pool_3x3_s2(x)
    x = conv(w(80), (1, 1), name="conv2d_3b")(x, train)
    x = conv(w(192), (3, 3), padding="VALID", name="conv2d_4a")(x, train)
    x = _max_pool_3x3_s2(x)

    x = Mixed5b(**stage_args, name="mixed_5b")(x, train)
    for i in range(self.num_block35):
      x = block(_BLOCK35_BRANCHES, scale=0.17, name=f"block35_{i}")(x, train)
    x = Mixed6a(**stage_args, name="mixed_6a")(x, train)
    for i in range(self.num_block17):
      x = block(_BLOCK17_BRANCHES, scale=0.10, name=f"block17_{i}")(x, train)
    x = Mixed7a(**stage_args, name="mixed_7a")(x, train)
    for i in range(self.num_block8):
      # TF-slim, Keras and timm all end with an unscaled (scale 1.0), ReLU-free block8; we follow
      # them.
      last = i == self.num_block8 - 1
      x = block(_BLOCK8_BRANCHES, scale=1.0 if last else 0.20, relu=not last,
                name=f"block8_{i}")(x, train)
    x = conv(w(1536), (1, 1), name="conv2d_7b")(x, train)

    features = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, kernel_init=layers.torch_linear_kernel,
                      bias_init=layers.torch_bias_init(features.shape[-1]), dtype=self.dtype,
                      name="classifier")(features)
    # Losses, soft labels and MetaLabelNet work in (at least) float32 whatever the compute dtype.
    return layers.at_least_float32(logits), layers.at_least_float32(features)
