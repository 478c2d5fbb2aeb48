"""Host-side dataset loading: CIFAR-10 (JPEG pack, python release or tfds), CIFAR-100 (python
release or tfds) and scikit-learn digits.

Everything here is plain numpy: images stay uint8 NHWC in host memory and labels are int32. The
held-out pool of a dataset is what the meta (clean) set and the test set are later drawn from by
`split_meta_test`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import pathlib
import pickle
import zipfile
from typing import Any, Sequence

import numpy as np
from PIL import Image

CIFAR10_IMAGE_SHAPE = (32, 32, 3)
CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                       "ship", "truck")
CIFAR10_PACK_FILE = "cifar10_jpeg.npz"
CIFAR10_PACK_KEYS = ("train_jpeg", "train_offsets", "train_label", "test_jpeg", "test_offsets",
                     "test_label")
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_META_FILE = "batches.meta"

CIFAR100_FILES = ("train", "test", "meta")

DATASET_NAMES = ("cifar10", "cifar100", "digits")
# Where each CIFAR can be read from ('tfds': tensorflow-datasets, in the python release's order).
SOURCES = {"cifar10": ("pack", "python", "tfds"), "cifar100": ("python", "tfds")}


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: `==` on array fields is ambiguous.
class ImageDataset:
  """A labelled image classification dataset held in host memory (uint8 NHWC).

  Attributes:
    name: dataset name, e.g. 'cifar10'.
    train_images: (N, H, W, C) uint8 training images.
    train_labels: (N,) int32 clean/given labels, in the dataset's original training order.
    heldout_images: (M, H, W, C) uint8 images of the pool the meta and test sets are drawn from.
    heldout_labels: (M,) int32 labels of the held-out pool.
    num_classes: number of classes C; labels lie in [0, C).
    class_names: the C class names, indexed by label.
    superclass_of: (C,) int array, class c's superclass (CIFAR-100's 20 coarse classes); None
      where a dataset has none.
  """
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  heldout_images: np.ndarray
  heldout_labels: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]
  superclass_of: np.ndarray | None = None

  def __post_init__(self):
    # Every loader funnels through here, so a malformed source fails at load time rather than
    # deep inside training.
    if len(self.class_names) != self.num_classes:
      raise ValueError(f"{self.name}: {len(self.class_names)} class names for "
                       f"{self.num_classes} classes")
    for split, images, labels in (("train", self.train_images, self.train_labels),
                                  ("heldout", self.heldout_images, self.heldout_labels)):
      if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{self.name}: {split} images must be uint8 (N, H, W, C), got "
                         f"{images.dtype} {images.shape}")
      if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
        raise ValueError(f"{self.name}: {split} labels must be int32 of shape {images.shape[:1]}, "
                         f"got {labels.dtype} {labels.shape}")
      if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
        raise ValueError(f"{self.name}: {split} labels outside [0, {self.num_classes})")
    if self.train_images.shape[1:] != self.heldout_images.shape[1:]:
      raise ValueError(f"{self.name}: train images {self.train_images.shape[1:]} and held-out "
                       f"images {self.heldout_images.shape[1:]} differ in shape")
    if self.superclass_of is not None and np.shape(self.superclass_of) != (self.num_classes,):
      raise ValueError(f"{self.name}: superclass_of must hold one superclass per class "
                       f"({self.num_classes}), got shape {np.shape(self.superclass_of)}")


def superclasses_from_labels(fine: np.ndarray, coarse: np.ndarray, num_classes: int,
                             where: str) -> np.ndarray:
  """Class c's superclass, from every sample's fine and coarse label (each class must have one)."""
  superclass_of = np.full(num_classes, -1, np.int64)
  for c in range(num_classes):
    groups = np.unique(coarse[fine == c])
    if not len(groups):
      raise ValueError(f"{where}: class {c} has no training samples")
    if len(groups) != 1:
      raise ValueError(f"{where}: class {c} has {len(groups)} coarse labels {groups[:5].tolist()} "
                       "(each fine class belongs to one superclass)")
    superclass_of[c] = groups[0]
  return superclass_of


# ----------------------------------------------------------------------------------------------
# CIFAR-10, JPEG pack.


def _decode_jpeg(data: bytes) -> np.ndarray:
  """Decodes one JPEG file to an (H, W, 3) uint8 RGB array."""
  # formats=('JPEG',) skips probing the other plugins: the pack holds JPEG files only.
  with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
    if image.mode != "RGB":
      image = image.convert("RGB")
    return np.asarray(image)


def decode_jpegs(jpeg: np.ndarray, offsets: np.ndarray, num_workers: int | None = None,
                 chunk_size: int = 2500) -> np.ndarray:
  """Decodes concatenated JPEG files into an (N, H, W, 3) uint8 array, in order.

  Args:
    jpeg: 1-D uint8 array of concatenated JPEG files.
    offsets: (N + 1,) integer array; file `i` is `jpeg[offsets[i]:offsets[i + 1]]`.
    num_workers: decoding threads; None means `os.cpu_count()`, 1 decodes in the calling thread.
    chunk_size: images per task handed to a thread.

  Returns:
    The decoded images; identical for every `num_workers` and `chunk_size`.

  Raises:
    ValueError: if a file does not decode or the images differ in shape.
  """
  num_images = len(offsets) - 1
  if num_images <= 0:
    raise ValueError("no JPEG files to decode")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

  def decode_one(i: int) -> np.ndarray:
    try:
      return _decode_jpeg(jpeg[offsets[i]:offsets[i + 1]].tobytes())
    except (OSError, SyntaxError) as e:  # What pillow raises for truncated or corrupt files.
      raise ValueError(f"JPEG file {i} does not decode: {e}") from e

  # The first image fixes the shape, so each worker can write its chunk straight into one
  # preallocated output (disjoint slices: no locking, no concatenation copy).
  first = decode_one(0)
  out = np.empty((num_images,) + first.shape, np.uint8)
  out[0] = first

  def decode_range(start: int, stop: int) -> None:
    for i in range(start, stop):
      image = decode_one(i)
      if image.shape != first.shape:
        raise ValueError(f"JPEG file {i} has shape {image.shape}, file 0 has {first.shape}")
      out[i] = image

  num_workers = num_workers or os.cpu_count() or 1
  chunks = [(s, min(s + chunk_size, num_images)) for s in range(1, num_images, chunk_size)]
  if num_workers == 1 or len(chunks) <= 1:
    for start, stop in chunks:
      decode_range(start, stop)
  else:
    # Pillow releases the GIL while it decodes, so threads overlap the C part of the work. For
    # 32x32 images most of the time is Python-side header parsing under the GIL, so the gain is
    # small: none was measured on a 2-core machine.
    with concurrent.futures.ThreadPoolExecutor(max_workers=num_workers) as executor:
      futures = [executor.submit(decode_range, start, stop) for start, stop in chunks]
      for future in futures:
        future.result()  # Re-raises a worker's error here.
  return out


def _check_jpeg_split(npz_file: pathlib.Path, split: str, jpeg: np.ndarray, offsets: np.ndarray,
                      labels: np.ndarray) -> None:
  """Raises ValueError unless one split's byte array, offsets and labels agree."""
  where = f"{npz_file}: {split}"
  if jpeg.ndim != 1 or jpeg.dtype != np.uint8:
    raise ValueError(f"{where}_jpeg must be a 1-D uint8 array, got {jpeg.dtype} {jpeg.shape}")
  if offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer):
    raise ValueError(f"{where}_offsets must be a 1-D integer array, got {offsets.dtype} "
                     f"{offsets.shape}")
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{where}_label must be a 1-D integer array, got {labels.dtype} "
                     f"{labels.shape}")
  if len(offsets) != len(labels) + 1:
    raise ValueError(f"{where}_label has {len(labels)} labels but {split}_offsets describes "
                     f"{len(offsets) - 1} images")
  if len(labels) == 0:
    raise ValueError(f"{where} split is empty")
  if offsets[0] != 0 or offsets[-1] != len(jpeg):
    raise ValueError(f"{where}_offsets must run from 0 to len({split}_jpeg) = {len(jpeg)}, got "
                     f"{offsets[0]}..{offsets[-1]}")
  if np.any(np.diff(offsets) <= 0):
    raise ValueError(f"{where}_offsets must be strictly increasing (every file non-empty)")


def load_cifar10_pack(path: str | os.PathLike[str], num_workers: int | None = None,
                      chunk_size: int = 2500) -> ImageDataset:
  """Loads CIFAR-10 from the shared JPEG pack (`cifar10_jpeg.npz`).

  Training data keep the original training order (data_batch_1..5). The held-out pool is the 10k
  test images in the pack's class-major order, which is not the order of the python release's
  `test_batch`: the same split seed picks different meta sets from the two sources.

  Args:
    path: folder that contains `cifar10_jpeg.npz`.
    num_workers: JPEG decoding threads (see `decode_jpegs`).
    chunk_size: images per decoding task.

  Returns:
    The dataset (50000 training and 10000 held-out 32x32x3 images for the real pack).

  Raises:
    FileNotFoundError: if the folder or the file is missing.
    ValueError: if the file is not a well-formed pack.
  """
  folder = pathlib.Path(path).expanduser()
  contents = f"the folder must contain {CIFAR10_PACK_FILE} (the shared CIFAR-10 JPEG pack)"
  if not folder.is_dir():
    raise FileNotFoundError(f"CIFAR-10 pack folder {folder} does not exist; {contents}")
  npz_file = folder / CIFAR10_PACK_FILE
  if not npz_file.is_file():
    raise FileNotFoundError(f"{npz_file} not found; {contents}")
  # Checked up front: np.load would otherwise try to read a non-zip file as a pickle.
  if not zipfile.is_zipfile(npz_file):
    raise ValueError(f"{npz_file} is not an .npz (zip) archive")

  try:
    with np.load(npz_file, allow_pickle=False) as npz:
      missing = [key for key in CIFAR10_PACK_KEYS if key not in npz.files]
      if missing:
        raise ValueError(f"{npz_file} lacks key(s) {missing}; a pack has "
                         f"{list(CIFAR10_PACK_KEYS)}")
      # Each access decompresses the member, so read every key exactly once.
      arrays = {key: npz[key] for key in CIFAR10_PACK_KEYS}
  except (zipfile.BadZipFile, EOFError, OSError) as e:  # a truncated or corrupted copy
    raise ValueError(f"{npz_file} is damaged ({type(e).__name__}: {e}); copy the pack "
                     "again.") from None

  images = {}
  labels = {}
  for split in ("train", "test"):
    jpeg, offsets, label = (arrays[f"{split}_{k}"] for k in ("jpeg", "offsets", "label"))
    _check_jpeg_split(npz_file, split, jpeg, offsets, label)
    try:
      images[split] = decode_jpegs(jpeg, offsets, num_workers=num_workers, chunk_size=chunk_size)
    except ValueError as e:
      raise ValueError(f"{npz_file}: {split}_jpeg: {e}") from e
    if images[split].shape[1:] != CIFAR10_IMAGE_SHAPE:
      raise ValueError(f"{npz_file}: {split} images are {images[split].shape[1:]}, CIFAR-10 "
                       f"images are {CIFAR10_IMAGE_SHAPE}")
    labels[split] = label.astype(np.int32)
  return ImageDataset(
      name="cifar10",
      train_images=images["train"],
      train_labels=labels["train"],
      heldout_images=images["test"],
      heldout_labels=labels["test"],
      num_classes=len(CIFAR10_CLASS_NAMES),
      class_names=CIFAR10_CLASS_NAMES)


# ----------------------------------------------------------------------------------------------
# CIFAR-10, python-version release.


def _read_pickle(file: pathlib.Path) -> Any:
  """Reads one pickle of the CIFAR-10 python release (pickled by Python 2, hence bytes keys)."""
  # Unpickling can run arbitrary code: only point this at a trusted copy of the release.
  with open(file, "rb") as f:
    try:
      return pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError) as e:
      raise ValueError(f"{file} is not a readable pickle: {e}") from e


def _release_folder(path: str | os.PathLike[str], required: Sequence[str], dataset: str,
                    release: str) -> pathlib.Path:
  """The folder of a CIFAR python release, checked to hold every `required` file."""
  folder = pathlib.Path(path).expanduser()
  contents = f'the folder must contain {", ".join(required)} ({release})'
  if not folder.is_dir():
    raise FileNotFoundError(f"{dataset} folder {folder} does not exist; {contents}")
  for name in required:
    if not (folder / name).is_file():
      raise FileNotFoundError(f"{folder / name} not found; {contents}")
  return folder


def _label_names(file: pathlib.Path, key: bytes, count: int) -> tuple[str, ...]:
  """The `count` class names a release's meta pickle lists under `key`."""
  meta = _read_pickle(file)
  names = meta.get(key) if isinstance(meta, dict) else None
  if names is None or len(names) != count:
    raise ValueError(f"{file}: expected a dict whose {key!r} lists {count} names")
  return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _read_cifar_batch(file: pathlib.Path, label_keys: tuple[bytes, ...] = (b"labels",),
                      what: str = "CIFAR-10 batch") -> tuple[np.ndarray, ...]:
  """Reads one batch file into (N, 32, 32, 3) uint8 images and (N,) int32 labels per key."""
  batch = _read_pickle(file)
  keys = (b"data",) + label_keys
  if not isinstance(batch, dict) or any(key not in batch for key in keys):
    raise ValueError(f"{file} is not a {what}: expected a dict with keys "
                     f"{', '.join(map(repr, keys))}")
  data = np.asarray(batch[b"data"])
  height, width, channels = CIFAR10_IMAGE_SHAPE
  row_size = height * width * channels
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row_size:
    raise ValueError(f"{file}: b'data' must be uint8 of shape (N, {row_size}), got {data.dtype} "
                     f"{data.shape}")
  labels = []
  for key in label_keys:
    values = np.asarray(batch[key])
    if values.shape != (data.shape[0],):
      raise ValueError(f"{file}: {values.size} {key.decode()} for {data.shape[0]} images")
    labels.append(values.astype(np.int32))
  # Each row holds the red plane, then green, then blue (each 32x32 row-major): CHW -> HWC.
  images = data.reshape(-1, channels, height, width).transpose(0, 2, 3, 1)
  return (np.ascontiguousarray(images), *labels)


def load_cifar10_python(path: str | os.PathLike[str]) -> ImageDataset:
  """Loads CIFAR-10 from the python-version release folder `cifar-10-batches-py`.

  Training data are data_batch_1..5 concatenated (the original training order); the held-out pool
  is `test_batch` in its file order.

  Args:
    path: the `cifar-10-batches-py` folder.

  Returns:
    The dataset.

  Raises:
    FileNotFoundError: if the folder or one of its files is missing.
    ValueError: if a file does not have the release's layout.
  """
  folder = _release_folder(path, CIFAR10_TRAIN_BATCHES + (CIFAR10_TEST_BATCH, CIFAR10_META_FILE),
                           "CIFAR-10", "CIFAR-10 python version")
  class_names = _label_names(folder / CIFAR10_META_FILE, b"label_names", len(CIFAR10_CLASS_NAMES))
  train = [_read_cifar_batch(folder / name) for name in CIFAR10_TRAIN_BATCHES]
  test_images, test_labels = _read_cifar_batch(folder / CIFAR10_TEST_BATCH)
  return ImageDataset(
      name="cifar10",
      train_images=np.concatenate([images for images, _ in train]),
      train_labels=np.concatenate([labels for _, labels in train]),
      heldout_images=test_images,
      heldout_labels=test_labels,
      num_classes=len(class_names),
      class_names=class_names)


# ----------------------------------------------------------------------------------------------
# CIFAR-100, python-version release.


def load_cifar100_python(path: str | os.PathLike[str]) -> ImageDataset:
  """Loads CIFAR-100 from the python-version release folder `cifar-100-python`.

  Training data are `train` in file order (the order CIFAR-100N's labels follow), the held-out
  pool `test`; labels are the 100 fine classes, and each class's superclass (20 coarse classes)
  comes from the files' `coarse_labels`.

  Args:
    path: the `cifar-100-python` folder (files `train`, `test`, `meta`).

  Returns:
    The dataset.

  Raises:
    FileNotFoundError: if the folder or one of its files is missing.
    ValueError: if a file does not have the release's layout.
  """
  folder = _release_folder(path, CIFAR100_FILES, "CIFAR-100",
                           "CIFAR-100 python version, cifar-100-python")
  class_names = _label_names(folder / "meta", b"fine_label_names", 100)
  keys = (b"fine_labels", b"coarse_labels")
  train_images, train_labels, train_coarse = _read_cifar_batch(folder / "train", keys,
                                                               "CIFAR-100 file")
  test_images, test_labels, _ = _read_cifar_batch(folder / "test", keys, "CIFAR-100 file")
  return ImageDataset(
      name="cifar100", train_images=train_images, train_labels=train_labels,
      heldout_images=test_images, heldout_labels=test_labels, num_classes=100,
      class_names=class_names,
      superclass_of=superclasses_from_labels(train_labels, train_coarse, 100,
                                             str(folder / "train")))


# ----------------------------------------------------------------------------------------------
# CIFAR-10 and CIFAR-100 from tensorflow-datasets.


def load_cifar_tfds(name: str, data_dir: str = "", download: bool = False) -> ImageDataset:
  """CIFAR-10 or CIFAR-100 from tfds (`data_dir`: TFDS's default where empty), in the python
  release's order, training and test sets alike (`mln_jax.tfds_data`), so that a seed makes the
  same split and the same noise as from the python release. Without `download`, a dataset that is
  not prepared stops with the command that prepares it."""
  from mln_jax import tfds_data  # pylint: disable=g-import-not-at-top (TensorFlow)
  arrays = tfds_data.read_cifar(name, data_dir, download)
  num_classes = 10 if name == "cifar10" else 100
  # tfds's CIFAR-10 names are batches.meta.txt's, the same as ours.
  names = CIFAR10_CLASS_NAMES if name == "cifar10" else arrays["class_names"]
  train_labels = arrays["train_labels"].astype(np.int32)
  coarse = arrays["train_coarse_labels"]
  return ImageDataset(
      name=name, train_images=arrays["train_images"].astype(np.uint8), train_labels=train_labels,
      heldout_images=arrays["test_images"].astype(np.uint8),
      heldout_labels=arrays["test_labels"].astype(np.int32), num_classes=num_classes,
      class_names=tuple(names),
      superclass_of=None if coarse is None else superclasses_from_labels(
          train_labels, coarse, num_classes, f"tfds {name} train"))


# ----------------------------------------------------------------------------------------------
# scikit-learn digits: a tiny real dataset for smoke runs.


def load_digits_dataset(num_heldout: int, seed: int) -> ImageDataset:
  """Loads scikit-learn's bundled 8x8 digits (1797 images) as a (N, 8, 8, 1) uint8 dataset.

  Args:
    num_heldout: size of the held-out pool, a seeded random subset, in [1, 1796].
    seed: seed of that choice.

  Returns:
    The dataset; pixel values 0..16 are scaled to 0..255, and both the training data and the
    held-out pool keep the original relative order.
  """
  # Imported here: scikit-learn is only needed for this small dataset.
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  images = (digits.images.astype(np.int64) * 255 // 16).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  num_images = len(images)
  if not 1 <= num_heldout <= num_images - 1:
    raise ValueError(f"num_heldout must be in [1, {num_images - 1}] for the {num_images} digits, "
                     f"got {num_heldout}")
  heldout = np.zeros(num_images, bool)
  heldout[np.random.default_rng(seed).choice(num_images, num_heldout, replace=False)] = True
  return ImageDataset(
      name="digits",
      train_images=images[~heldout],
      train_labels=labels[~heldout],
      heldout_images=images[heldout],
      heldout_labels=labels[heldout],
      num_classes=10,
      class_names=tuple(str(d) for d in range(10)))


# ----------------------------------------------------------------------------------------------
# Splits.


def split_meta_test(images: np.ndarray, labels: np.ndarray, num_meta: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Splits a held-out pool at random into meta (clean, also validation) data and test data.

  Args:
    images: (M, ...) held-out images.
    labels: (M,) held-out labels.
    num_meta: size of the meta set, in [1, M - 1]; the other M - num_meta samples are the test set.
    seed: seed of the split; the same seed gives the same split.

  Returns:
    (meta_images, meta_labels, test_images, test_labels), each part in pool order.
  """
  num_pool = len(images)
  if len(labels) != num_pool:
    raise ValueError(f"{num_pool} images but {len(labels)} labels")
  if not 1 <= num_meta <= num_pool - 1:
    raise ValueError(f"num_meta must be in [1, M - 1] for a held-out pool of M = {num_pool}, "
                     f"got {num_meta}")
  is_meta = np.zeros(num_pool, bool)
  is_meta[np.random.default_rng(seed).choice(num_pool, num_meta, replace=False)] = True
  return images[is_meta], labels[is_meta], images[~is_meta], labels[~is_meta]


# ----------------------------------------------------------------------------------------------
# Dispatch on the config.


def _choice(value: Any, valid: Sequence[str], what: str) -> str:
  """Returns `value` if it is one of `valid`, else raises ValueError listing them."""
  if value not in valid:
    raise ValueError(f'unknown {what} {value!r}; valid choices: {", ".join(valid)}')
  return value


def load_dataset(data_config: Any) -> ImageDataset:
  """Loads the dataset a data config names.

  Args:
    data_config: an ml_collections-like object with `name` ('cifar10' | 'cifar100' | 'digits');
      for the CIFARs also `source` (SOURCES), `data_dir` and, for tfds, `download`; for digits
      `num_heldout` and `split_seed`.

  Returns:
    The dataset.
  """
  name = _choice(data_config.name, DATASET_NAMES, "dataset name")
  if name == "digits":
    return load_digits_dataset(num_heldout=data_config.num_heldout, seed=data_config.split_seed)
  source = _choice(data_config.source, SOURCES[name], f"{name} source")
  data_dir = getattr(data_config, "data_dir", None)
  if source == "tfds":
    return load_cifar_tfds(name, data_dir or "", bool(getattr(data_config, "download", False)))
  if not data_dir:
    what = {"pack": f"the folder that contains {CIFAR10_PACK_FILE}",
            "python": "the cifar-10-batches-py folder" if name == "cifar10"
                      else "the cifar-100-python folder"}[source]
    raise FileNotFoundError(f"no data_dir set for {name} (source {source!r}); pass "
                            f"--config.data_dir=... ({what}), or --config.data.source=tfds")
  if source == "pack":
    return load_cifar10_pack(data_dir)
  if name == "cifar100":
    return load_cifar100_python(data_dir)
  return load_cifar10_python(data_dir)
