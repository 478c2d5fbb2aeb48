"""tf.data input pipelines that stream image lists (`file_lists`) from disk to the devices.

Why plain tf.data over a list of files rather than a tfds builder: Clothing1M and WebVision come as
folders of JPEGs with label lists, which tfds would first copy into TFRecords (hundreds of GB,
hours). Reading the authors' files directly needs no preparation step, and a list makes the order
exact: every epoch's order and flips are drawn in NumPy from `(seed, epoch)`, so a stream is the
same on every run and can be resumed mid-epoch by skipping the steps already taken (before any image
is decoded).

Each process (host) reads only its own slice of every global batch; `device_batches` assembles the
slices into global arrays sharded over a `Mesh` and keeps a few batches in flight to the devices.
Images travel as uint8 and are normalised on the device (`augment.normalise_imagenet`).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

from mln_jax.file_lists import ImageList  # noqa: E402

# TensorFlow only decodes images here: keep it off the accelerators JAX uses.
tf.config.set_visible_devices([], "GPU")

# Salts that keep the random streams of one epoch apart.
_TRAIN_ORDER, _TRAIN_FLIPS, _META_ORDER, _META_FLIPS = range(4)


RESIZE_MODES = ("square", "shorter_side")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """Resize to `resize_size`, centre-crop `image_size` (SPEC: 256/224 for Clothing1M, 320/299 for
  WebVision), and flip horizontally at random where `hflip`.

  `resize_mode` 'square' resizes to resize_size × resize_size, as the paper's words ("resized to
  256x256"); 'shorter_side' keeps the aspect ratio, as torchvision's `Resize(256)`.
  """
  resize_size: int
  image_size: int
  hflip: bool = True
  resize_mode: str = "square"

  def __post_init__(self):
    if self.resize_mode not in RESIZE_MODES:
      raise ValueError(f"resize_mode={self.resize_mode!r}: choose one of {RESIZE_MODES}.")


def _load_image(path: tf.Tensor, flip: tf.Tensor, prep: Preprocessing) -> tf.Tensor:
  """Decodes, resizes, centre-crops and flips one image -> uint8 (image_size, image_size, 3)."""
  image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
  if prep.resize_mode == "square":
    size = tf.constant([prep.resize_size, prep.resize_size])
  else:
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    short, long = tf.minimum(height, width), tf.maximum(height, width)
    # torchvision: the shorter side becomes resize_size, the longer int(resize_size · long / short).
    new_long = tf.cast(prep.resize_size * long / short, tf.int32)
    size = tf.where(height <= width, tf.stack([prep.resize_size, new_long]),
                    tf.stack([new_long, prep.resize_size]))
  image = tf.image.resize(image, size, method="bilinear", antialias=True)
  image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
  top = tf.cast(tf.round((size[0] - prep.image_size) / 2), tf.int32)
  left = tf.cast(tf.round((size[1] - prep.image_size) / 2), tf.int32)
  image = image[top:top + prep.image_size, left:left + prep.image_size]
  image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
  image.set_shape((prep.image_size, prep.image_size, 3))
  return image


def epoch_order(num_items: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
  """A shuffled pass over `num_items` as (steps, batch_size); the last partial batch is dropped."""
  num_steps = num_items // batch_size
  order = np.random.default_rng([seed, epoch, _TRAIN_ORDER]).permutation(num_items)
  return order[:num_steps * batch_size].reshape(num_steps, batch_size)


def cycling_order(num_items: int, num_steps: int, batch_size: int, seed: int, epoch: int
                  ) -> np.ndarray:
  """Meta batches for one training epoch: consecutive shuffled passes over the meta set (cycling
  independently of the training stream, as the reference's restarted meta loader)."""
  rng = np.random.default_rng([seed, epoch, _META_ORDER])
  passes = -(-num_steps * batch_size // num_items)
  order = np.concatenate([rng.permutation(num_items) for _ in range(passes)])
  return order[:num_steps * batch_size].reshape(num_steps, batch_size)


def _flips(shape: tuple[int, ...], seed: int, epoch: int, salt: int, enabled: bool) -> np.ndarray:
  if not enabled:
    return np.zeros(shape, bool)
  return np.random.default_rng([seed, epoch, salt]).random(shape) < 0.5


def _local_slice(order: np.ndarray) -> np.ndarray:
  """This process's columns of each global batch (processes split every batch evenly).

  Process i's columns are the i-th block of the global batch: where the mesh lists the devices
  process by process (`train.make_mesh`, as `jax.devices()` orders them), that is the block its
  devices hold in `device_batches`.
  """
  count, index = jax.process_count(), jax.process_index()
  if order.shape[1] % count:
    raise ValueError(f"The global batch of {order.shape[1]} does not split over {count} processes.")
  per_process = order.shape[1] // count
  return order[:, index * per_process:(index + 1) * per_process]


def _decodes(path: str) -> bool:
  try:
    tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
  except tf.errors.OpError:
    return False
  return True


@dataclasses.dataclass(frozen=True)
class Stream:
  """This process's batches of one pass: the tf.data pipeline and, per batch, the files it reads
  (to name them when one cannot be read or decoded)."""
  dataset: tf.data.Dataset
  files: np.ndarray  # (batches, local batch size)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    index = 0
    iterator = self.dataset.as_numpy_iterator()
    while True:
      try:
        batch = next(iterator)
      except StopIteration:
        return
      except tf.errors.OpError as error:
        # Orders are fixed, so the same batch would fail again on every resume: name the file.
        bad = [f for f in self.files[index] if not _decodes(f)] or list(self.files[index])
        raise ValueError(
            f"Could not read or decode {', '.join(bad)} ({error.message.strip()}). Remove or "
            "replace the file (and its line in the list) and run again.") from error
      yield batch
      index += 1


def stream_of(images: ImageList, order: np.ndarray, flips: np.ndarray, prep: Preprocessing,
              start_step: int, extra: dict[str, np.ndarray] | None = None,
              every_process_whole: bool = False) -> Stream:
  """This process's batches `order[start_step:]` (rows are steps), decoded in parallel, in order;
  with `every_process_whole`, the whole batches in every process."""
  part = (lambda x: x) if every_process_whole else _local_slice
  local, local_flips = part(order)[start_step:], part(flips)[start_step:]
  columns = {"path": images.files[local.ravel()], "flip": local_flips.ravel(),
             "label": images.labels[local.ravel()]}
  for name, values in (extra or {}).items():
    columns[name] = part(values)[start_step:].ravel()
  dataset = tf.data.Dataset.from_tensor_slices(columns)

  def load(example):
    example = dict(example)
    example["image"] = _load_image(example.pop("path"), example.pop("flip"), prep)
    return example

  dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.batch(local.shape[1], drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return Stream(dataset, images.files[local])


def train_batches(images: ImageList, indices: np.ndarray, batch_size: int, prep: Preprocessing,
                  seed: int, epoch: int, start_step: int = 0) -> Stream:
  """One epoch over `images[indices]` in `(seed, epoch)`'s order, from step `start_step` on.

  `batch_size` is global; each process yields its part of every batch (`image` uint8, `label`,
  and the images' positions in the list as `index`).
  """
  order = indices[epoch_order(len(indices), batch_size, seed, epoch)]
  flips = _flips(order.shape, seed, epoch, _TRAIN_FLIPS, prep.hflip)
  return stream_of(images, order, flips, prep, start_step, extra={"index": order.astype(np.int32)})


def meta_schedule(num_items: int, num_steps: int, batch_size: int, seed: int, epoch: int,
                  hflip: bool) -> tuple[np.ndarray, np.ndarray]:
  """Which meta images (and whether flipped) make the `num_steps` meta batches of training epoch
  `epoch`: two (steps, batch_size) arrays."""
  order = cycling_order(num_items, num_steps, batch_size, seed, epoch)
  return order, _flips(order.shape, seed, epoch, _META_FLIPS, hflip)


def meta_batches(images: ImageList, num_steps: int, batch_size: int, prep: Preprocessing,
                 seed: int, epoch: int, start_step: int = 0) -> Stream:
  """The `num_steps` meta batches that go with training epoch `epoch`, from step `start_step` on."""
  order, flips = meta_schedule(len(images), num_steps, batch_size, seed, epoch, prep.hflip)
  return stream_of(images, order, flips, prep, start_step)


def _whole_pass(images: ImageList, prep: Preprocessing, batch_size: int) -> Stream:
  """Every image of the list once, in list order (the last batch padded with the last image), in
  every process."""
  num_steps = -(-len(images) // batch_size)
  order = np.minimum(np.arange(num_steps * batch_size), len(images) - 1).reshape(num_steps, -1)
  return stream_of(images, order, np.zeros(order.shape, bool), dataclasses.replace(prep,
                   hflip=False), 0, every_process_whole=True)


def decode_all(images: ImageList, prep: Preprocessing, batch_size: int = 256) -> np.ndarray:
  """Every image of the list resized and centre-cropped, unflipped, as uint8 (N, size, size, 3) in
  list order, in every process (for a meta set kept in device memory)."""
  pixels = np.empty((len(images), prep.image_size, prep.image_size, 3), np.uint8)
  for index, batch in enumerate(_whole_pass(images, prep, batch_size)):  # filled in place
    rows = pixels[index * batch_size:(index + 1) * batch_size]
    rows[:] = batch["image"][:len(rows)]
  return pixels


def check_decodes(images: ImageList, prep: Preprocessing, batch_size: int = 256) -> None:
  """Reads and decodes every image of the list once, raising ValueError naming any that cannot be
  (before training, for the sets it evaluates on: found later, a broken one costs an epoch)."""
  for _ in _whole_pass(images, prep, batch_size):
    pass


def eval_batches(images: ImageList, batch_size: int, prep: Preprocessing) -> Stream:
  """The whole list once, in order, without flips (`index`: positions in the list); the last batch
  is padded with `valid = False`."""
  prep = dataclasses.replace(prep, hflip=False)
  num_steps = -(-len(images) // batch_size)
  positions = np.arange(num_steps * batch_size).reshape(num_steps, batch_size)
  valid = positions < len(images)
  order = np.where(valid, positions, 0)
  return stream_of(images, order, np.zeros(order.shape, bool), prep, 0,
                   extra={"valid": valid, "index": order.astype(np.int32)})


def device_batches(stream: Stream, mesh: Mesh, prefetch: int = 2
                   ) -> Iterator[dict[str, jax.Array]]:
  """Global batches sharded over `mesh`'s 'data' axis, `prefetch` batches ahead of the consumer.

  Every process contributes its local part (`jax.make_array_from_process_local_data`); transfers are
  asynchronous, so keeping batches in flight overlaps them with the step that runs.
  """
  sharding = NamedSharding(mesh, P("data"))
  queue = collections.deque()
  for batch in stream:
    queue.append({k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()})
    if len(queue) > prefetch:
      yield queue.popleft()
  while queue:
    yield queue.popleft()

