"""On-device data augmentation and normalisation of uint8 NHWC image batches."""

import jax
import jax.numpy as jnp


def random_crop_flip(key: jax.Array, images: jax.Array, *, pad: int, hflip: bool,
                     vflip: bool) -> jax.Array:
  """Zero-pads by `pad`, crops back to the original size at a random offset, flips at random.

  Each image gets its own offset and flips (as torchvision's RandomCrop(padding=pad) and
  Random{Horizontal,Vertical}Flip(0.5) do). Works on any dtype; shapes are unchanged.
  """
  batch, height, width, _ = images.shape
  crop_key, h_key, v_key = jax.random.split(key, 3)
  if pad > 0:
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * pad + 1)
    crop = lambda image, offset: jax.lax.dynamic_slice(
        image, (offset[0], offset[1], 0), (height, width, image.shape[-1]))
    images = jax.vmap(crop)(padded, offsets)
  if hflip:
    flip = jax.random.bernoulli(h_key, 0.5, (batch, 1, 1, 1))
    images = jnp.where(flip, images[:, :, ::-1], images)
  if vflip:
    flip = jax.random.bernoulli(v_key, 0.5, (batch, 1, 1, 1))
    images = jnp.where(flip, images[:, ::-1], images)
  return images


def normalise(images: jax.Array) -> jax.Array:
  """uint8 pixels to float32 in [-1, 1]: (x/255 − 0.5)/0.5, the paper's CIFAR-10 normalisation."""
  return (images.astype(jnp.float32) / 255.0 - 0.5) / 0.5


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise_imagenet(images: jax.Array) -> jax.Array:
  """uint8 pixels to float32 with ImageNet's mean and standard deviation (torchvision's convention),
  for the ImageNet-style models of the streamed datasets."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * 255.0
  std = jnp.asarray(IMAGENET_STD, jnp.float32) * 255.0
  return (images.astype(jnp.float32) - mean) / std
