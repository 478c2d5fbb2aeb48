"""CIFAR-100: the python release (fabricated pickles in exactly its format), its superclasses, and
its noise: class-dependent flips within the groups, uniform, and feature-dependent from a clean
model."""

import pathlib
import pickle
import sys

import numpy as np
import pytest

from mln_jax import data, in_memory, noise

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import tiny_config  # noqa: E402

NUM_TRAIN, NUM_TEST = 400, 120
# Superclasses that are not blocks of consecutive classes, as in the real (alphabetical) release.
SUPERCLASS_OF = np.random.default_rng(5).permutation(np.arange(100) % 20)


def write_cifar100(folder: pathlib.Path, seed: int = 0) -> dict[str, dict[bytes, object]]:
  """A tiny `cifar-100-python`: `train`, `test` and `meta` pickled as the release has them."""
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True)
  files = {}
  for name, count in (("train", NUM_TRAIN), ("test", NUM_TEST)):
    fine = rng.permutation(np.arange(count) % 100)
    files[name] = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                   b"fine_labels": fine.tolist(),
                   b"coarse_labels": SUPERCLASS_OF[fine].tolist(),
                   b"filenames": [f"{name}_{i}.png".encode() for i in range(count)],
                   b"batch_label": name.encode()}
  files["meta"] = {b"fine_label_names": [f"class{c:02d}".encode() for c in range(100)],
                   b"coarse_label_names": [f"super{c:02d}".encode() for c in range(20)]}
  for name, content in files.items():
    with open(folder / name, "wb") as f:
      pickle.dump(content, f)
  return files


@pytest.fixture(scope="module")
def cifar100_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("cifar100") / "cifar-100-python"
  write_cifar100(folder)
  return folder


def test_python_release_layout_order_and_superclasses(cifar100_dir):
  files = {name: pickle.loads((cifar100_dir / name).read_bytes()) for name in ("train", "test")}
  ds = data.load_cifar100_python(cifar100_dir)
  assert ds.name == "cifar100" and ds.num_classes == 100 and ds.class_names[7] == "class07"
  assert ds.train_images.shape == (NUM_TRAIN, 32, 32, 3) and ds.train_images.dtype == np.uint8
  np.testing.assert_array_equal(ds.train_labels, files["train"][b"fine_labels"])
  np.testing.assert_array_equal(ds.heldout_labels, files["test"][b"fine_labels"])
  rows = files["train"][b"data"]
  np.testing.assert_array_equal(ds.train_images[3, 4, 5], rows[3, [4 * 32 + 5, 1024 + 4 * 32 + 5,
                                                                   2048 + 4 * 32 + 5]])
  np.testing.assert_array_equal(ds.superclass_of, SUPERCLASS_OF)


def test_load_dataset_reads_cifar100_and_names_its_sources(cifar100_dir, tmp_path):
  config = tiny_config.with_overrides(tiny_config.get_config(), **{
      "data.name": "cifar100", "data.source": "python", "data.data_dir": str(cifar100_dir)})
  assert data.load_dataset(config.data).num_classes == 100
  config.data.source = "pack"
  with pytest.raises(ValueError, match="unknown cifar100 source 'pack'; valid choices: python, "
                     "tfds"):
    data.load_dataset(config.data)
  config.data.source, config.data.data_dir = "python", ""
  with pytest.raises(FileNotFoundError, match="cifar-100-python folder.*data.source=tfds"):
    data.load_dataset(config.data)


def test_python_release_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.load_cifar100_python(tmp_path / "nowhere")
  folder = tmp_path / "cifar-100-python"
  files = write_cifar100(folder)
  (folder / "meta").unlink()
  with pytest.raises(FileNotFoundError, match="meta not found.*cifar-100-python"):
    data.load_cifar100_python(folder)
  write_cifar100(tmp_path / "b")
  broken = {**files["train"], b"coarse_labels": files["train"][b"coarse_labels"][:-1]}
  (tmp_path / "b" / "train").write_bytes(pickle.dumps(broken))
  with pytest.raises(ValueError, match=f"train: {NUM_TRAIN - 1} coarse_labels for {NUM_TRAIN}"):
    data.load_cifar100_python(tmp_path / "b")
  write_cifar100(tmp_path / "c")
  mixed = {**files["train"], b"coarse_labels": [0] * (NUM_TRAIN - 1) + [1]}
  (tmp_path / "c" / "train").write_bytes(pickle.dumps(mixed))
  with pytest.raises(ValueError, match="has 2 coarse labels"):
    data.load_cifar100_python(tmp_path / "c")
  write_cifar100(tmp_path / "d")
  (tmp_path / "d" / "test").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
  with pytest.raises(ValueError, match="test is not a CIFAR-100 file.*b'fine_labels'"):
    data.load_cifar100_python(tmp_path / "d")


def test_next_in_group_flips():
  # Groups {0, 3, 4} and {1, 2}; 5 is alone and flips nowhere.
  assert noise.next_in_group_flips([7, 9, 9, 7, 7, 8]) == {0: 3, 3: 4, 4: 0, 1: 2, 2: 1}
  blocks = noise.next_in_group_flips(noise.index_block_groups(100))
  assert blocks[0] == 1 and blocks[4] == 0 and blocks[99] == 95 and len(blocks) == 100


def cifar100_config(cifar100_dir, **overrides):
  return tiny_config.with_overrides(tiny_config.get_config(), **{
      "data.name": "cifar100", "data.source": "python", "data.data_dir": str(cifar100_dir),
      "data.num_meta": 60, "batch_size": 16, **overrides})


@pytest.mark.parametrize("flip_groups", ["superclasses", "index_blocks"])
def test_class_dependent_noise_flips_within_the_groups(cifar100_dir, flip_groups):
  image_dataset = data.load_cifar100_python(cifar100_dir)
  config = cifar100_config(cifar100_dir, **{"noise.kind": "class_dependent", "noise.rate": 0.5,
                                            "noise.flip_groups": flip_groups})
  dataset = in_memory.prepare_data(config, image_dataset)
  clean, given = dataset.clean_train_labels, dataset.train.labels
  groups = SUPERCLASS_OF if flip_groups == "superclasses" else np.arange(100) // 5
  changed = clean != given
  # Each class has 4 training images: floor(4 * 0.5) = 2 of them flip, all within the group, to
  # the next class of it.
  assert changed.sum() == 200 and dataset.noise["realised_rate"] == 0.5
  np.testing.assert_array_equal(groups[given], groups[clean])
  flips = noise.next_in_group_flips(groups)
  assert all(flips[c] == g for c, g in zip(clean[changed], given[changed]))
  assert np.asarray(dataset.noise["transition_counts"]).shape == (100, 100)


def test_uniform_and_clean_model_noise_on_cifar100(cifar100_dir, tmp_path):
  image_dataset = data.load_cifar100_python(cifar100_dir)
  uniform = in_memory.prepare_data(cifar100_config(cifar100_dir, **{"noise.rate": 0.99}),
                                   image_dataset)
  # floor(4 * 0.99 / 99) = 0 per class pair: uniform noise needs >= C - 1 images per class.
  assert uniform.noise["realised_rate"] == 0.0
  config = cifar100_config(cifar100_dir, **{
      "noise.kind": "feature_dependent", "noise.probabilities": "clean_model",
      "noise.rate": 0.3, "noise.teacher_epochs": 1})
  dataset = in_memory.prepare_data(config, image_dataset, cache_dir=str(tmp_path))
  assert dataset.noise["realised_rate"] == 0.3  # floor(400 * 0.3) = 120 labels changed
  assert (tmp_path / "clean_model_probabilities_seed0.npz").exists()
  config.noise.probabilities = "student"
  with pytest.raises(ValueError, match="'student' exists for CIFAR-10 only"):
    in_memory.prepare_data(config, image_dataset)
