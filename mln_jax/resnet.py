"""ResNet with bottleneck blocks, layer for layer torchvision's `resnet50` (v1.5: the stride is on
the 3x3 conv).

Submodules are named after torchvision's state-dict keys with '.' before an index replaced by '_'
(`layer1.0.downsample.1` -> `layer1_0/downsample_1`), so `mln_jax.pretrained` can load torchvision's
ImageNet weights.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mln_jax.layers import (BatchNorm, at_least_float32, kaiming_normal_fan_out, torch_bias_init,
                            torch_linear_kernel)

EXPANSION = 4  # A bottleneck block's output width is 4x its inner width.


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Any) -> nn.Conv:
  # torchvision's convs are bias-free (a BatchNorm follows each) and pad by kernel // 2.
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=kaiming_normal_fan_out, dtype=dtype, name=name)


def _batch_norm(train: bool, name: str, dtype: Any) -> BatchNorm:
  return BatchNorm(use_running_average=not train, dtype=dtype, name=name)


class Bottleneck(nn.Module):
  """1x1 conv (width) -> 3x3 conv (width, stride) -> 1x1 conv (4·width), each with BatchNorm, plus
  the shortcut: identity, or a strided 1x1 conv + BatchNorm (`downsample_0`, `downsample_1`) where
  the shape changes."""
  width: int
  stride: int = 1
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = lambda name: _batch_norm(train, name, self.dtype)
    out_features = self.width * EXPANSION
    y = nn.relu(bn("bn1")(_conv(self.width, 1, 1, "conv1", self.dtype)(x)))
    y = nn.relu(bn("bn2")(_conv(self.width, 3, self.stride, "conv2", self.dtype)(y)))
    y = bn("bn3")(_conv(out_features, 1, 1, "conv3", self.dtype)(y))
    if self.stride != 1 or x.shape[-1] != out_features:
      x = bn("downsample_1")(_conv(out_features, 1, self.stride, "downsample_0", self.dtype)(x))
    return nn.relu(y + x)


class ResNet(nn.Module):
  """Stem (7x7/2 conv, BatchNorm, ReLU, 3x3/2 max-pool), bottleneck stages, global average pool, FC.

  Stage i has `stage_sizes[i]` blocks of inner width `num_filters·2^i`; all but the first halve the
  resolution in their first block. Returns `(logits, features)`, features being the pooled
  `4·num_filters·2^(len(stage_sizes)−1)`-d vector (2048 for ResNet-50) the FC layer reads.
  Inputs are NHWC; torchvision's ImageNet weights expect RGB normalised with the ImageNet mean and
  standard deviation.
  """
  num_classes: int
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  num_filters: int = 64
  dtype: Any = None  # compute dtype (None: that of inputs and parameters); parameters stay float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    x = _conv(self.num_filters, 7, 2, "conv1", self.dtype)(x)
    x = nn.relu(_batch_norm(train, "bn1", self.dtype)(x))
    # Flax pads max-pooling with -inf, as torch does, so border windows see only real pixels.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        stride = 2 if i > 0 and j == 0 else 1
        block = Bottleneck(width=self.num_filters * 2**i, stride=stride, dtype=self.dtype,
                           name=f"layer{i + 1}_{j}")
        x = block(x, train)
    features = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, kernel_init=torch_linear_kernel,
                      bias_init=torch_bias_init(features.shape[-1]), dtype=self.dtype,
                      name="fc")(features)
    # Losses, soft labels and MetaLabelNet work in (at least) float32 whatever the compute dtype.
    return at_least_float32(logits), at_least_float32(features)


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
