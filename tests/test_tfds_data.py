"""CIFAR-10/100 and CIFAR-10N/100N from tfds, on `tfds.testing.mock_data` (no network, no files):
the python release's order restored from the ids, and the refusals."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from mln_jax import data, human_labels, tfds_data  # noqa: E402

NUM_TRAIN, NUM_TEST = 200, 20


def python_release(name: str, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """What the python release would hold, in its order: images whose first pixel is their index."""
  rng = np.random.default_rng(seed)
  num_classes = 10 if name == "cifar10" else 100
  splits = {}
  for split, count in (("train", NUM_TRAIN), ("test", NUM_TEST)):
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(count) % 256
    labels = rng.permutation(np.arange(count) % num_classes)  # every class in the training set
    splits[split] = {"id": np.asarray([f"{split}_{i:05d}" for i in range(count)]),
                     "image": images, "label": labels, "coarse_label": labels // 5}
  return splits


def stored_shuffled(splits, seed: int = 1, ids=None):
  """A mocked `_as_dataset` that serves each split in a shuffled order, as tfds stores it."""
  def as_dataset(self, split, **kwargs):
    del kwargs
    examples = dict(splits[str(split)])
    if self.name == "cifar10":
      examples.pop("coarse_label")
    if ids is not None:
      examples["id"] = ids
    order = np.random.default_rng(seed).permutation(len(examples["label"]))
    return tf.data.Dataset.from_tensor_slices({k: v[order] for k, v in examples.items()})
  return as_dataset


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_tfds_cifar_comes_back_in_the_python_order(name):
  release = python_release(name)
  with tfds.testing.mock_data(as_dataset_fn=stored_shuffled(release)):
    dataset = data.load_cifar_tfds(name, download=True)
  np.testing.assert_array_equal(dataset.train_images, release["train"]["image"])
  np.testing.assert_array_equal(dataset.train_labels, release["train"]["label"])
  np.testing.assert_array_equal(dataset.heldout_images, release["test"]["image"])
  np.testing.assert_array_equal(dataset.heldout_labels, release["test"]["label"])
  assert dataset.train_labels.dtype == np.int32 and dataset.num_classes == len(
      dataset.class_names)
  if name == "cifar100":
    # Each fine class's superclass, from the coarse labels (here: class // 5).
    seen = np.unique(release["train"]["label"])
    np.testing.assert_array_equal(dataset.superclass_of[seen], seen // 5)
  else:
    assert dataset.superclass_of is None and dataset.class_names == data.CIFAR10_CLASS_NAMES


def test_load_dataset_reads_tfds_through_the_config(tmp_path):
  release = python_release("cifar10")
  config = type("DataConfig", (), {"name": "cifar10", "source": "tfds", "data_dir": str(tmp_path),
                                   "download": True})
  with tfds.testing.mock_data(as_dataset_fn=stored_shuffled(release)):
    dataset = data.load_dataset(config)
  np.testing.assert_array_equal(dataset.train_labels, release["train"]["label"])


def test_a_dataset_not_prepared_stops_with_the_command_that_prepares_it(tmp_path):
  with tfds.testing.mock_data(as_dataset_fn=stored_shuffled(python_release("cifar10"))):
    with pytest.raises(FileNotFoundError, match=r"not prepared.*tfds build cifar10 "
                       r"--data_dir=.*data\.download=True"):
      data.load_cifar_tfds("cifar10", str(tmp_path), download=False)


@pytest.mark.parametrize("ids, message", [
    (np.asarray([f"x{i}" for i in range(NUM_TRAIN)]), "are not 'train_<index>'"),
    (np.asarray([f"train_{i // 2:05d}" for i in range(NUM_TRAIN)]), "each once"),
])
def test_ids_that_cannot_give_the_order_are_refused(ids, message):
  with tfds.testing.mock_data(as_dataset_fn=stored_shuffled(python_release("cifar10"), ids=ids)):
    with pytest.raises(ValueError, match=message + r".*data\.source=python"):
      data.load_cifar_tfds("cifar10", download=True)


def test_python_order_sorts_by_index_not_by_text():
  ids = np.asarray([b"train_10", b"train_9", b"train_0", b"train_1", b"train_2", b"train_3",
                    b"train_4", b"train_5", b"train_6", b"train_7", b"train_8"])
  order = tfds_data.python_order(ids, "train", "here")
  assert [int(ids[i].split(b"_")[1]) for i in order] == list(range(11))


def cifar_n_release(splits, noisy_key: str, seed: int = 2) -> dict[str, dict[str, np.ndarray]]:
  """tfds cifar10_n / cifar100_n: the training split with its human labels (20% changed)."""
  rng = np.random.default_rng(seed)
  train = dict(splits["train"])
  num_classes = int(train["label"].max()) + 1
  flipped = rng.random(NUM_TRAIN) < 0.2
  train[noisy_key] = np.where(flipped, (train["label"] + 1) % num_classes, train["label"])
  train.pop("image")
  return {"train": train, "test": train}


@pytest.mark.parametrize("name, human_label, noisy_key", [
    ("cifar10", "worse", "worse_label"), ("cifar100", "noisy", "noise_label")])
def test_human_labels_from_tfds_cifar_n(name, human_label, noisy_key):
  release = python_release(name)
  labelled = cifar_n_release(release, noisy_key)

  def as_dataset(self, split, **kwargs):
    source = labelled if self.name.endswith("_n") else release
    return stored_shuffled(source)(self, split, **kwargs)

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    dataset = data.load_cifar_tfds(name, download=True)
    given = human_labels.load(human_label, "", dataset.train_labels, dataset.num_classes,
                              (name, "", True))
  np.testing.assert_array_equal(given, labelled["train"][noisy_key])
  # The guard compares cifar*_n's own clean labels with the images': a mismatch is refused.
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    with pytest.raises(ValueError, match="tfds .*_n: its clean_label differs"):
      human_labels.load(human_label, "", np.roll(dataset.train_labels, 1), dataset.num_classes,
                        (name, "", True))
