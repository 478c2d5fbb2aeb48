"""Tests for mln_jax.data: the loaders on fabricated files in the real formats, and the splits."""

import io
import pathlib
import pickle
import types

import numpy as np
from PIL import Image
import pytest

from mln_jax import data, dataset

# ----------------------------------------------------------------------------------------------
# Fabricated CIFAR-10 JPEG pack.

_PACK_TRAIN = 12
_PACK_TEST = 7


def _flat_image(value: int) -> np.ndarray:
  """A 32x32 RGB image of one colour, so it survives JPEG coding almost unchanged."""
  return np.full((32, 32, 3), (value, 255 - value, value // 2), np.uint8)


def _jpeg_bytes(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=75)
  return buf.getvalue()


def _encode(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Concatenated JPEG bytes and offsets, as in the pack."""
  files = [_jpeg_bytes(image) for image in images]
  offsets = np.concatenate([[0], np.cumsum([len(f) for f in files])]).astype(np.int64)
  return np.frombuffer(b"".join(files), np.uint8), offsets


def _textured_image(seed: int) -> np.ndarray:
  """A 32x32 RGB image of random 4x4 blocks: real DCT content, yet JPEG keeps it recognisable."""
  blocks = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  return blocks.repeat(4, axis=0).repeat(4, axis=1)


def _pack_arrays() -> dict[str, np.ndarray]:
  """The six arrays of a tiny pack; image i has flat colour 20 * i (train) or 20 * i + 5 (test)."""
  train_jpeg, train_offsets = _encode([_flat_image(20 * i) for i in range(_PACK_TRAIN)])
  test_jpeg, test_offsets = _encode([_flat_image(20 * i + 5) for i in range(_PACK_TEST)])
  return {
      "train_jpeg": train_jpeg,
      "train_offsets": train_offsets,
      "train_label": np.arange(_PACK_TRAIN, dtype=np.int64) * 7 % 10,
      "test_jpeg": test_jpeg,
      "test_offsets": test_offsets,
      "test_label": np.arange(_PACK_TEST, dtype=np.int64) % 10,
  }


def _write_pack(folder: pathlib.Path, arrays: dict[str, np.ndarray]) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  np.savez(folder / data.CIFAR10_PACK_FILE, **arrays)
  return folder


@pytest.fixture
def pack_dir(tmp_path) -> pathlib.Path:
  return _write_pack(tmp_path / "pack", _pack_arrays())


def test_pack_loads_shapes_labels_and_order(pack_dir):
  ds = data.load_cifar10_pack(pack_dir)
  assert ds.name == "cifar10"
  assert ds.train_images.shape == (_PACK_TRAIN, 32, 32, 3)
  assert ds.heldout_images.shape == (_PACK_TEST, 32, 32, 3)
  assert ds.train_images.dtype == np.uint8 and ds.heldout_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32 and ds.heldout_labels.dtype == np.int32
  np.testing.assert_array_equal(ds.train_labels, np.arange(_PACK_TRAIN) * 7 % 10)
  np.testing.assert_array_equal(ds.heldout_labels, np.arange(_PACK_TEST) % 10)
  assert ds.num_classes == 10 and ds.class_names == data.CIFAR10_CLASS_NAMES
  # Order: image i decodes to (about) its own flat colour, and 20 apart from its neighbours.
  for i in range(_PACK_TRAIN):
    np.testing.assert_allclose(ds.train_images[i].mean((0, 1)), _flat_image(20 * i)[0, 0], atol=3)
  for i in range(_PACK_TEST):
    np.testing.assert_allclose(ds.heldout_images[i].mean((0, 1)), _flat_image(20 * i + 5)[0, 0],
                               atol=3)


def test_pack_images_equal_direct_pillow_decode(pack_dir):
  arrays = _pack_arrays()
  ds = data.load_cifar10_pack(pack_dir, num_workers=1)
  jpeg, offsets = arrays["train_jpeg"], arrays["train_offsets"]
  for i in range(_PACK_TRAIN):
    raw = jpeg[offsets[i]:offsets[i + 1]].tobytes()
    expected = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    np.testing.assert_array_equal(ds.train_images[i], expected)


def test_pack_parallel_decode_equals_sequential(pack_dir):
  sequential = data.load_cifar10_pack(pack_dir, num_workers=1)
  parallel = data.load_cifar10_pack(pack_dir, num_workers=3, chunk_size=2)
  np.testing.assert_array_equal(parallel.train_images, sequential.train_images)
  np.testing.assert_array_equal(parallel.heldout_images, sequential.heldout_images)
  np.testing.assert_array_equal(parallel.train_labels, sequential.train_labels)


def test_decode_jpegs_parallel_equals_sequential_on_textured_images():
  images = [_textured_image(seed) for seed in range(23)]
  jpeg, offsets = _encode(images)
  sequential = data.decode_jpegs(jpeg, offsets, num_workers=1)
  assert sequential.shape == (23, 32, 32, 3)
  for chunk_size in (1, 4, 100):
    parallel = data.decode_jpegs(jpeg, offsets, num_workers=4, chunk_size=chunk_size)
    np.testing.assert_array_equal(parallel, sequential)
  # A lossy copy of each source image, in order: far closer to it than to its neighbour.
  sources = np.stack(images).astype(int)
  error = np.abs(sequential - sources).mean()
  assert error < 25
  assert error * 3 < np.abs(sequential - np.roll(sources, 1, axis=0)).mean()


def test_decode_jpegs_reports_a_corrupt_file():
  jpeg, offsets = _encode([_textured_image(seed) for seed in range(6)])
  jpeg = jpeg.copy()
  jpeg[offsets[4]:offsets[4] + 4] = 0  # Destroy file 4's start-of-image marker.
  with pytest.raises(ValueError, match="JPEG file 4"):
    data.decode_jpegs(jpeg, offsets, num_workers=2, chunk_size=1)


def test_pack_missing_folder_and_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"does not exist.*cifar10_jpeg\.npz"):
    data.load_cifar10_pack(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"empty.cifar10_jpeg\.npz not found.*must contain"):
    data.load_cifar10_pack(tmp_path / "empty")


def test_pack_missing_key(tmp_path):
  arrays = _pack_arrays()
  del arrays["test_label"]
  with pytest.raises(ValueError, match="lacks key.*'test_label'"):
    data.load_cifar10_pack(_write_pack(tmp_path, arrays))


@pytest.mark.parametrize("key, change, message", [
    ("train_offsets", lambda o: o[:-1], "describes"),          # Fewer images than labels.
    ("train_offsets", lambda o: o + 1, "from 0 to len"),       # Shifted off the byte array.
    ("test_offsets", lambda o: np.append(o[:-1], o[-1] + 9), "from 0 to len"),  # Past the end.
    ("test_offsets", lambda o: o[[0, 2, 1] + list(range(3, len(o)))], "strictly increasing"),
    ("train_label", lambda l: l[:-1], "describes"),
    ("train_label", lambda l: l.astype(np.float32), "integer"),
])
def test_pack_inconsistent_arrays(tmp_path, key, change, message):
  arrays = _pack_arrays()
  arrays[key] = change(arrays[key])
  with pytest.raises(ValueError, match=message):
    data.load_cifar10_pack(_write_pack(tmp_path, arrays))


def test_pack_label_out_of_range(tmp_path):
  arrays = _pack_arrays()
  arrays["test_label"] = arrays["test_label"] + 10
  with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
    data.load_cifar10_pack(_write_pack(tmp_path, arrays))


def test_pack_wrong_image_size(tmp_path):
  arrays = _pack_arrays()
  arrays["test_jpeg"], arrays["test_offsets"] = _encode([np.zeros((16, 16, 3), np.uint8)] * 7)
  with pytest.raises(ValueError, match=r"\(16, 16, 3\)"):
    data.load_cifar10_pack(_write_pack(tmp_path, arrays))


def test_pack_not_a_zip(tmp_path):
  (tmp_path / data.CIFAR10_PACK_FILE).write_bytes(b"not a zip archive")
  with pytest.raises(ValueError, match="not an .npz"):
    data.load_cifar10_pack(tmp_path)


# ----------------------------------------------------------------------------------------------
# Fabricated CIFAR-10 python-version folder.

_BATCH = 20


def _batch_dict(seed: int, num: int = _BATCH) -> dict[bytes, object]:
  rng = np.random.default_rng(seed)
  return {
      b"batch_label": f"batch {seed}".encode(),
      b"labels": [int(x) for x in rng.integers(0, 10, num)],  # A list, as in the release.
      b"data": rng.integers(0, 256, (num, 3072), dtype=np.uint8),
      b"filenames": [f"{seed}_{i}.png".encode() for i in range(num)],
  }


def _write_python_folder(folder: pathlib.Path) -> dict[str, dict[bytes, object]]:
  """Writes a tiny `cifar-10-batches-py`; returns the batches written, by file name."""
  folder.mkdir(parents=True)
  batches = {f"data_batch_{i}": _batch_dict(i) for i in range(1, 6)}
  batches["test_batch"] = _batch_dict(99)
  # A known pixel: image 0 of data_batch_1 at row 2, column 5 is (R, G, B) = (200, 100, 50).
  pixel = 2 * 32 + 5
  batches["data_batch_1"][b"data"][0, [pixel, 1024 + pixel, 2048 + pixel]] = (200, 100, 50)
  for name, batch in batches.items():
    with open(folder / name, "wb") as f:
      pickle.dump(batch, f)
  meta = {b"label_names": [n.encode() for n in data.CIFAR10_CLASS_NAMES],
          b"num_cases_per_batch": _BATCH, b"num_vis": 3072}
  with open(folder / "batches.meta", "wb") as f:
    pickle.dump(meta, f)
  return batches


def test_python_loader_layout_and_order(tmp_path):
  folder = tmp_path / "cifar-10-batches-py"
  batches = _write_python_folder(folder)
  ds = data.load_cifar10_python(folder)
  assert ds.train_images.shape == (5 * _BATCH, 32, 32, 3)
  assert ds.heldout_images.shape == (_BATCH, 32, 32, 3)
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  assert ds.class_names == data.CIFAR10_CLASS_NAMES and ds.num_classes == 10
  np.testing.assert_array_equal(ds.train_images[0, 2, 5], (200, 100, 50))
  # Every pixel: row entry c * 1024 + h * 32 + w is channel c of pixel (h, w).
  train_rows = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
  n, h, w, c = np.meshgrid(np.arange(5 * _BATCH), np.arange(32), np.arange(32), np.arange(3),
                           indexing="ij")
  np.testing.assert_array_equal(ds.train_images[n, h, w, c], train_rows[n, c * 1024 + h * 32 + w])
  np.testing.assert_array_equal(
      ds.train_labels, sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), []))
  np.testing.assert_array_equal(ds.heldout_labels, batches["test_batch"][b"labels"])
  np.testing.assert_array_equal(ds.heldout_images[3, 31, 0, 2],
                                batches["test_batch"][b"data"][3, 2048 + 31 * 32])


def test_python_loader_missing_batch_file(tmp_path):
  folder = tmp_path / "cifar-10-batches-py"
  _write_python_folder(folder)
  (folder / "data_batch_3").unlink()
  with pytest.raises(FileNotFoundError, match="data_batch_3 not found.*must contain"):
    data.load_cifar10_python(folder)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.load_cifar10_python(tmp_path / "nowhere")


def test_python_loader_wrong_data_shape(tmp_path):
  folder = tmp_path / "cifar-10-batches-py"
  _write_python_folder(folder)
  batch = _batch_dict(4)
  batch[b"data"] = batch[b"data"][:, :3000]
  with open(folder / "data_batch_4", "wb") as f:
    pickle.dump(batch, f)
  with pytest.raises(ValueError, match=r"data_batch_4.*\(N, 3072\)"):
    data.load_cifar10_python(folder)


def test_python_loader_label_count_mismatch_and_garbage(tmp_path):
  folder = tmp_path / "cifar-10-batches-py"
  _write_python_folder(folder)
  batch = _batch_dict(2)
  batch[b"labels"] = batch[b"labels"][:-1]
  with open(folder / "data_batch_2", "wb") as f:
    pickle.dump(batch, f)
  with pytest.raises(ValueError, match="data_batch_2: 19 labels for 20 images"):
    data.load_cifar10_python(folder)
  _write_python_folder(tmp_path / "other")
  (tmp_path / "other" / "test_batch").write_bytes(b"\x00garbage")
  with pytest.raises(ValueError, match="test_batch is not a readable pickle"):
    data.load_cifar10_python(tmp_path / "other")


# ----------------------------------------------------------------------------------------------
# Digits.


def _is_subsequence(part: np.ndarray, whole: np.ndarray) -> bool:
  """Whether the rows of `part` occur in `whole` in the same relative order."""
  j = 0
  for row in whole:
    if j < len(part) and np.array_equal(part[j], row):
      j += 1
  return j == len(part)


def test_digits_shapes_dtype_range_and_order():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  ds = data.load_digits_dataset(num_heldout=300, seed=0)
  assert ds.name == "digits" and ds.num_classes == 10 and len(ds.class_names) == 10
  assert ds.train_images.shape == (1497, 8, 8, 1)
  assert ds.heldout_images.shape == (300, 8, 8, 1)
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  pixels = np.concatenate([ds.train_images.ravel(), ds.heldout_images.ravel()])
  assert pixels.min() == 0 and pixels.max() == 255
  assert set(np.unique(pixels)) <= {v * 255 // 16 for v in range(17)}
  # Both parts keep the original relative order (pixels and labels together).
  original = datasets.load_digits()
  whole = np.concatenate([(original.images * 255 // 16).reshape(-1, 64),
                          original.target[:, None]], axis=1)
  train = np.concatenate([ds.train_images.reshape(-1, 64), ds.train_labels[:, None]], axis=1)
  heldout = np.concatenate([ds.heldout_images.reshape(-1, 64), ds.heldout_labels[:, None]], axis=1)
  assert _is_subsequence(train, whole) and _is_subsequence(heldout, whole)
  np.testing.assert_array_equal(np.bincount(np.concatenate([ds.train_labels, ds.heldout_labels])),
                                np.bincount(original.target))


def test_digits_deterministic_per_seed():
  a = data.load_digits_dataset(num_heldout=100, seed=3)
  b = data.load_digits_dataset(num_heldout=100, seed=3)
  c = data.load_digits_dataset(num_heldout=100, seed=4)
  np.testing.assert_array_equal(a.heldout_images, b.heldout_images)
  np.testing.assert_array_equal(a.train_labels, b.train_labels)
  assert not np.array_equal(a.heldout_images, c.heldout_images)


@pytest.mark.parametrize("num_heldout", [0, 1797])
def test_digits_bad_heldout_size(num_heldout):
  with pytest.raises(ValueError, match="1796"):
    data.load_digits_dataset(num_heldout=num_heldout, seed=0)


# ----------------------------------------------------------------------------------------------
# Splits.


def _pool(num: int = 50) -> tuple[np.ndarray, np.ndarray]:
  """A pool whose image i is filled with i (identifiable) and labelled i % 10."""
  images = np.broadcast_to(np.arange(num, dtype=np.uint8)[:, None, None, None],
                           (num, 4, 4, 3)).copy()
  return images, np.arange(num, dtype=np.int32) % 10


def test_split_meta_test_partitions_the_pool():
  images, labels = _pool()
  meta_x, meta_y, test_x, test_y = data.split_meta_test(images, labels, num_meta=20, seed=1)
  assert meta_x.shape == (20, 4, 4, 3) and test_x.shape == (30, 4, 4, 3)
  assert meta_y.shape == (20,) and test_y.shape == (30,)
  meta_ids, test_ids = meta_x[:, 0, 0, 0].astype(int), test_x[:, 0, 0, 0].astype(int)
  assert not set(meta_ids) & set(test_ids)
  np.testing.assert_array_equal(np.sort(np.concatenate([meta_ids, test_ids])), np.arange(50))
  np.testing.assert_array_equal(meta_y, meta_ids % 10)  # Images keep their own labels.
  np.testing.assert_array_equal(test_y, test_ids % 10)
  assert not np.array_equal(meta_ids, np.arange(20))  # Random, not the first 20.


def test_split_meta_test_deterministic_per_seed():
  images, labels = _pool()
  a = data.split_meta_test(images, labels, num_meta=25, seed=7)
  b = data.split_meta_test(images, labels, num_meta=25, seed=7)
  c = data.split_meta_test(images, labels, num_meta=25, seed=8)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("num_meta", [0, 50, -1])
def test_split_meta_test_bad_size(num_meta):
  images, labels = _pool()
  with pytest.raises(ValueError, match="M = 50"):
    data.split_meta_test(images, labels, num_meta=num_meta, seed=0)


def test_split_meta_test_length_mismatch():
  images, labels = _pool()
  with pytest.raises(ValueError, match="50 images but 49 labels"):
    data.split_meta_test(images, labels[:-1], num_meta=10, seed=0)


def test_choose_unlabelled():
  idx = dataset.choose_unlabelled(num_train=100, num_unlabelled=30, seed=0)
  assert idx.shape == (30,) and np.issubdtype(idx.dtype, np.integer)
  assert np.all(np.diff(idx) > 0)  # Sorted and distinct.
  assert idx.min() >= 0 and idx.max() < 100
  np.testing.assert_array_equal(idx, dataset.choose_unlabelled(100, 30, seed=0))
  assert not np.array_equal(idx, dataset.choose_unlabelled(100, 30, seed=1))
  assert dataset.choose_unlabelled(100, 0, seed=0).shape == (0,)
  assert dataset.choose_unlabelled(100, 99, seed=0).shape == (99,)


@pytest.mark.parametrize("num_unlabelled", [-1, 100])
def test_choose_unlabelled_bad_size(num_unlabelled):
  with pytest.raises(ValueError, match=r"\[0, 99\]"):
    dataset.choose_unlabelled(100, num_unlabelled, seed=0)


# ----------------------------------------------------------------------------------------------
# ImageDataset and load_dataset.


def test_image_dataset_rejects_inconsistent_fields():
  images, labels = _pool(10)
  with pytest.raises(ValueError, match="int32"):
    data.ImageDataset("x", images, labels[:-1], images, labels, 10, tuple("abcdefghij"))
  with pytest.raises(ValueError, match="class names"):
    data.ImageDataset("x", images, labels, images, labels, 10, ("a",))
  with pytest.raises(ValueError, match="uint8"):
    data.ImageDataset("x", images.astype(np.float32), labels, images, labels, 10,
                      tuple("abcdefghij"))


def test_load_dataset_dispatch(pack_dir, tmp_path):
  ds = data.load_dataset(types.SimpleNamespace(name="digits", num_heldout=200, split_seed=0))
  assert ds.name == "digits" and ds.heldout_images.shape == (200, 8, 8, 1)
  config = types.SimpleNamespace(name="cifar10", source="pack", data_dir=str(pack_dir))
  ds = data.load_dataset(config)
  assert ds.train_images.shape == (_PACK_TRAIN, 32, 32, 3)
  folder = tmp_path / "cifar-10-batches-py"
  _write_python_folder(folder)
  config = types.SimpleNamespace(name="cifar10", source="python", data_dir=str(folder))
  ds = data.load_dataset(config)
  assert ds.train_images.shape == (5 * _BATCH, 32, 32, 3)


def test_load_dataset_errors():
  with pytest.raises(ValueError, match="mnist.*cifar10, cifar100, digits"):
    data.load_dataset(types.SimpleNamespace(name="mnist"))
  with pytest.raises(ValueError, match="'hdf5'.*pack, python, tfds"):
    data.load_dataset(types.SimpleNamespace(name="cifar10", source="hdf5", data_dir="/x"))
  with pytest.raises(FileNotFoundError, match=r"--config\.data_dir="):
    data.load_dataset(types.SimpleNamespace(name="cifar10", source="pack", data_dir=""))
  with pytest.raises(FileNotFoundError, match=r"--config\.data_dir="):
    data.load_dataset(types.SimpleNamespace(name="cifar10", source="python"))


# ----------------------------------------------------------------------------------------------
# The real pack.


@pytest.mark.integration
def test_real_cifar10_pack(cifar10_pack):
  ds = data.load_cifar10_pack(cifar10_pack)
  assert ds.train_images.shape == (50000, 32, 32, 3)
  assert ds.heldout_images.shape == (10000, 32, 32, 3)
  assert ds.train_images.dtype == np.uint8
  np.testing.assert_array_equal(ds.train_labels[:10], [6, 9, 9, 4, 1, 1, 2, 7, 8, 3])
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [5000] * 10)
  np.testing.assert_array_equal(ds.heldout_labels, np.arange(10000) // 1000)
