"""CIFAR-10/100 and CIFAR-10N/100N from TensorFlow Datasets, in the python release's order.

tfds stores CIFAR's examples shuffled (by the hash of their key), so a plain read is not the python
release's order that the CIFAR-10 pack, its student probabilities and the CIFAR-N label files
follow. Each tfds CIFAR example carries an `id`, `train_<index>` / `test_<index>`, its position in
the release's files (data_batch_1..5, test_batch); sorting by it restores that order, so the same
seed makes the same meta split and the same noisy labels from every source. Where the ids cannot
say the order (another format, gaps, duplicates) the load stops, naming the problem.

Imports TensorFlow: only `mln_jax.data` and `mln_jax.human_labels` import this module, when a
config asks for tfds.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

# Examples per tf.data batch while reading a split into memory.
_READ_BATCH = 8192


def builder(name: str, data_dir: str, download: bool) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder `name` in `data_dir` (TFDS's default where empty), prepared first
  with `download`; else FileNotFoundError with the command that prepares it."""
  dataset = tfds.builder(name, data_dir=data_dir or None)
  if dataset.is_prepared():
    return dataset
  root = dataset.data_dir_root
  manual = getattr(dataset, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if not download:
    raise FileNotFoundError(
        f"tfds dataset {name!r} is not prepared in {root}. Prepare it once (it downloads): "
        f"`tfds build {name} --data_dir={root}`"
        + (f" --manual_dir=<folder with its manual files: {' '.join(manual.split()[:12])} …>"
           if manual else "")
        + ", or rerun with --config.data.download=True; point --config.data.data_dir at the tfds "
        "data folder if it is prepared elsewhere.")
  try:
    dataset.download_and_prepare()
  except AssertionError as e:  # tfds's word for missing manual files
    raise FileNotFoundError(f"tfds could not prepare {name!r} in {root}: {e}") from None
  return dataset


def read_split(dataset: tfds.core.DatasetBuilder, split: str, images: bool = True
               ) -> dict[str, np.ndarray]:
  """Every example of `split` as numpy arrays, by feature, in tfds's stored order (the images left
  encoded unless `images`)."""
  decoders = None if images else {"image": tfds.decode.SkipDecoding()}
  parts = list(tfds.as_numpy(dataset.as_dataset(split=split, shuffle_files=False,
                                                decoders=decoders).batch(_READ_BATCH)))
  if not parts:
    raise ValueError(f"tfds {dataset.name!r} split {split!r} is empty.")
  return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def python_order(ids: np.ndarray, split: str, where: str) -> np.ndarray:
  """The permutation that sorts a split's examples by their ids `<split>_<index>` into the python
  release's order; ValueError where the ids are not exactly `<split>_0 … <split>_{N-1}`."""
  fix = ("Cannot restore the python release's order that the CIFAR-10 pack, the student "
         "probabilities and the CIFAR-N labels follow: prepare the dataset again with a current "
         "tensorflow-datasets, or use --config.data.source=python.")
  prefix = f"{split}_"
  texts = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
  bad = [t for t in texts if not (t.startswith(prefix) and t[len(prefix):].isdigit())]
  if bad:
    raise ValueError(f"{where}: {len(bad)} of {len(texts)} example ids are not "
                     f"'{prefix}<index>' (e.g. {bad[0]!r}). {fix}")
  positions = np.asarray([int(t[len(prefix):]) for t in texts], np.int64)
  if not np.array_equal(np.sort(positions), np.arange(len(positions))):
    raise ValueError(f"{where}: the ids' indices are not 0..{len(positions) - 1} each once "
                     f"({len(np.unique(positions))} distinct, largest {positions.max()}). {fix}")
  return np.argsort(positions)


def _in_python_order(dataset: tfds.core.DatasetBuilder, split: str, images: bool = True
                     ) -> dict[str, np.ndarray]:
  examples = read_split(dataset, split, images)
  if "id" not in examples:
    raise ValueError(f"tfds {dataset.name!r} {split}: its examples have no 'id' (features "
                     f"{sorted(examples)}), so the python release's order cannot be restored. "
                     "Prepare it again with a current tensorflow-datasets, or use "
                     "--config.data.source=python.")
  order = python_order(examples["id"], split, f"tfds {dataset.name!r} {split}")
  return {key: values[order] for key, values in examples.items()}


def read_cifar(name: str, data_dir: str, download: bool) -> dict[str, object]:
  """tfds 'cifar10' or 'cifar100' in the python release's order: train/test images (uint8 NHWC),
  fine labels, coarse labels (CIFAR-100) and the class names."""
  dataset = builder(name, data_dir, download)
  train, test = _in_python_order(dataset, "train"), _in_python_order(dataset, "test")
  return {"train_images": train["image"], "train_labels": train["label"],
          "train_coarse_labels": train.get("coarse_label"),
          "test_images": test["image"], "test_labels": test["label"],
          "class_names": tuple(dataset.info.features["label"].names)}


def read_human_labels(name: str, data_dir: str, download: bool) -> dict[str, np.ndarray]:
  """tfds 'cifar10_n' / 'cifar100_n' training labels in the python order, under the CIFAR-N
  files' keys (`clean_label`, `worse_label`, …; CIFAR-100N's `noise_label` as `noisy_label`)."""
  train = _in_python_order(builder(name, data_dir, download), "train", images=False)
  renamed = {"label": "clean_label", "noise_label": "noisy_label"}
  return {renamed.get(key, key): values for key, values in train.items()
          if key not in ("id", "image")}
