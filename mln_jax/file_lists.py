"""Image lists of the large noisy datasets, read from the layouts their authors distribute.

A dataset that does not fit in device memory is described by lists of (image file, label) pairs; the
tf.data pipeline in `input_pipeline` streams them from disk. Reading a layout needs no TensorFlow,
checks every list file and a sample of the images, and names the first missing file and what the
layout should look like.

Layouts (SPEC, "On-disk formats"):
- Clothing1M: `images/…`, `noisy_label_kv.txt` and `clean_label_kv.txt` (`images/a/b/c.jpg
<label>`),
  `noisy_train_key_list.txt`, `clean_val_key_list.txt`, `clean_test_key_list.txt` (a path a line).
- WebVision 1.0: `info/train_filelist_google.txt` (`google/q0001/x.jpg <label>`),
  `info/val_filelist.txt` (`x.jpg <label>`, images under `val_images/`, or `val_images_256/` in the
  resized release), `info/synsets.txt`; optionally
  the ILSVRC12 validation images sorted into one folder per synset
  (`<imagenet_val_dir>/n01440764/…`).
- Food-101N: `Food-101N_release/` (`images/<class>/<file>.jpg`, `meta/classes.txt`,
  `meta/imagelist.tsv`, `meta/verified_train.tsv`, `meta/verified_val.tsv`, each with a header
  line) beside Food-101's `food-101/` (`images/<class>/<name>.jpg`, `meta/classes.txt`,
  `meta/train.txt`, `meta/test.txt`: `<class>/<name>` lines without the extension).
- image_folder (bring your own): `train/<class>/…` or a `train_list` file (`path <label>`, paths
  relative to the root, label −1 for an unlabelled image), and clean `meta/<class>/…` and
  `test/<class>/…`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

from absl import logging
import numpy as np

from mln_jax import dataset as dataset_lib
from mln_jax.dataset import Dataset

CLOTHING1M_CLASSES = 14
FOOD101_CLASSES = 101
FOOD101N_DIR = "Food-101N_release"
FOOD101_DIR = "food-101"
_FOOD101N_FILES = ("meta/classes.txt", "meta/imagelist.tsv", "meta/verified_train.tsv",
                   "meta/verified_val.tsv")
_FOOD101_FILES = ("meta/classes.txt", "meta/test.txt")
_CLOTHING1M_FILES = ("noisy_label_kv.txt", "clean_label_kv.txt", "noisy_train_key_list.txt",
                     "clean_val_key_list.txt", "clean_test_key_list.txt")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# How many images of each list are checked to exist when a layout is read (all of them would take
# minutes for a million files on a network disk; a wrong root shows up in any sample).
_NUM_CHECKED = 32


@dataclasses.dataclass(frozen=True)
class ImageList:
  """Image files (absolute paths) and their labels; −1 marks an unlabelled image."""
  files: np.ndarray   # str
  labels: np.ndarray  # int32

  def __post_init__(self):
    if len(self.files) != len(self.labels):
      raise ValueError(f"{len(self.files)} files but {len(self.labels)} labels.")

  def __len__(self) -> int:
    return len(self.files)

  def subset(self, indices: np.ndarray) -> "ImageList":
    return ImageList(self.files[indices], self.labels[indices])


def _dataset(name: str, num_classes: int, class_names: tuple[str, ...], train: ImageList,
             meta: ImageList, tests: dict[str, ImageList],
             clean_train_labels: np.ndarray | None = None,
             about_noise: dict[str, Any] | None = None) -> Dataset:
  """A layout's lists as a `Dataset`: the datasets' own labels are the (really) noisy ones, whose
  rate is known only where a training image also has a clean label (Clothing1M's ~37k)."""
  clean = (np.full(len(train), -1, np.int32) if clean_train_labels is None
           else clean_train_labels)
  return Dataset(name, num_classes, class_names, train, meta, tests, clean,
                 dataset_lib.noise_summary("real", None, train.labels, clean, num_classes,
                                           about_noise))


def _layout_error(path: pathlib.Path, dataset: str, expected: str) -> FileNotFoundError:
  return FileNotFoundError(f"{path} does not exist: not a {dataset} folder. Expected {expected}; "
                           f"point --config.data_dir at the dataset's root.")


def _read_pairs(path: pathlib.Path) -> tuple[list[str], np.ndarray]:
  """Lines `relative/path <integer label>` -> paths and labels; names the first malformed line."""
  files, labels = [], []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      parts = line.strip().rsplit(maxsplit=1)  # the label is the last field: paths may have spaces
      if not parts:
        continue
      if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
        raise ValueError(f"{path}, line {number}: expected '<image path> <integer label>', got "
                         f"{line.strip()!r}.")
      files.append(parts[0])
      labels.append(int(parts[1]))
  return files, np.asarray(labels, np.int32)


def _read_keys(path: pathlib.Path) -> list[str]:
  with open(path) as f:
    return [line.strip() for line in f if line.strip()]


def _check_labels(labels: np.ndarray, num_classes: int, where: str, unlabelled: bool = False
                  ) -> None:
  """Labels must lie in [0, num_classes), or be −1 (no label) where `unlabelled` allows it."""
  bad = (labels < (-1 if unlabelled else 0)) | (labels >= num_classes)
  if bad.any():
    allowed = f"[0, {num_classes})" + (" or −1 (unlabelled)" if unlabelled else "")
    raise ValueError(f"{where}: label {int(labels[np.argmax(bad)])} lies outside {allowed}.")


def _check_images_exist(files: np.ndarray, where: str, seed: int = 0) -> None:
  """Checks the first, the last and a random sample of the images."""
  if len(files) == 0:
    raise ValueError(f"{where} lists no images.")
  rng = np.random.default_rng(seed)
  sample = {0, len(files) - 1, *rng.integers(0, len(files), min(_NUM_CHECKED, len(files))).tolist()}
  for index in sorted(sample):
    if not os.path.isfile(files[index]):
      raise FileNotFoundError(f"{files[index]} (listed in {where}) does not exist: the images are "
                              f"not where the layout says. Check --config.data_dir.")


def check_all_exist(files: np.ndarray, where: str) -> None:
  """Every listed file exists (config.data.verify_files; otherwise a sample is checked)."""
  missing = [f for f in files if not os.path.isfile(f)]
  if missing:
    raise FileNotFoundError(f"{len(missing)} of the {len(files)} files in {where} do not exist, "
                            f"e.g. {', '.join(missing[:3])}. Check --config.data_dir, or remove "
                            "their lines.")


def _absolute(root: pathlib.Path, relative: list[str]) -> np.ndarray:
  return np.asarray([str(root / name) for name in relative])


def clothing1m(data_dir: str | os.PathLike[str]) -> Dataset:
  """Clothing1M: the 1M noisy training images, the clean validation set (meta) and clean test set.

  The 50k clean training images are not used (SPEC). Clean labels of noisy training images that also
  appear in `clean_label_kv.txt` (about 37k in the real set) are kept for label-issue reports.
  """
  root = pathlib.Path(data_dir)
  for name in _CLOTHING1M_FILES:
    if not (root / name).is_file():
      raise _layout_error(root / name, "Clothing1M",
                          f"{', '.join(_CLOTHING1M_FILES)} and images/ in {root}")
  noisy_files, noisy_labels = _read_pairs(root / "noisy_label_kv.txt")
  clean_files, clean_labels = _read_pairs(root / "clean_label_kv.txt")
  noisy = dict(zip(noisy_files, noisy_labels.tolist()))
  clean = dict(zip(clean_files, clean_labels.tolist()))

  def listed(key_file: str, labels: dict[str, int], kv_file: str,
             keys: list[str] | None = None) -> ImageList:
    keys = _read_keys(root / key_file) if keys is None else keys
    missing = [k for k in keys if k not in labels]
    if missing:
      raise ValueError(f"{root / key_file} lists {len(missing)} images without a label in "
                       f"{root / kv_file}, e.g. {missing[0]!r}.")
    result = ImageList(_absolute(root, keys), np.asarray([labels[k] for k in keys], np.int32))
    _check_labels(result.labels, CLOTHING1M_CLASSES, str(root / kv_file))
    _check_images_exist(result.files, str(root / key_file))
    return result

  names = root / "category_names_eng.txt"  # in the authors' release; optional here
  class_names = tuple(_read_keys(names)) if names.is_file() else ()
  train_keys = _read_keys(root / "noisy_train_key_list.txt")
  train = listed("noisy_train_key_list.txt", noisy, "noisy_label_kv.txt", train_keys)
  return _dataset(
      "clothing1m", CLOTHING1M_CLASSES,
      class_names if len(class_names) == CLOTHING1M_CLASSES else (),
      train, listed("clean_val_key_list.txt", clean, "clean_label_kv.txt"),
      {"test": listed("clean_test_key_list.txt", clean, "clean_label_kv.txt")},
      clean_train_labels=np.asarray([clean.get(k, -1) for k in train_keys], np.int32))


def _webvision_synsets(root: pathlib.Path, num_classes: int) -> list[str]:
  path = root / "info" / "synsets.txt"
  if not path.is_file():
    raise _layout_error(path, "WebVision 1.0", "info/synsets.txt (one 'n01440764 name' a line)")
  synsets = [line.split()[0] for line in _read_keys(path)]
  if len(synsets) < num_classes:
    raise ValueError(f"{path} lists {len(synsets)} synsets, fewer than num_classes={num_classes}.")
  return synsets[:num_classes]


def webvision(data_dir: str | os.PathLike[str], num_classes: int, num_meta: int, seed: int,
              imagenet_val_dir: str = "") -> Dataset:
  """WebVision 1.0, Google images of the first `num_classes` classes (the paper: 50).

  The verified validation images of those classes (2.5k for 50) are split by `seed` into `num_meta`
  meta images (the paper: 1k) and the test set (the other 1.5k). With `imagenet_val_dir`, the
  ILSVRC12 validation images of the same classes (one folder per synset) are a second test set.
  """
  root = pathlib.Path(data_dir)
  train_list = root / "info" / "train_filelist_google.txt"
  val_list = root / "info" / "val_filelist.txt"
  for path in (train_list, val_list):
    if not path.is_file():
      raise _layout_error(path, "WebVision 1.0",
                          "info/train_filelist_google.txt, info/val_filelist.txt, google/ and "
                          f"val_images/ in {root}")
  train_files, train_labels = _read_pairs(train_list)
  _check_labels(train_labels, 1000, str(train_list))  # WebVision 1.0 has ImageNet's 1000 classes
  keep = train_labels < num_classes
  train = ImageList(_absolute(root, [f for f, k in zip(train_files, keep) if k]),
                    train_labels[keep])
  _check_images_exist(train.files, str(train_list))
  val_files, val_labels = _read_pairs(val_list)
  _check_labels(val_labels, 1000, str(val_list))
  keep = val_labels < num_classes
  # The widely used resized release (shorter side 256) keeps them in val_images_256/.
  val_dir = root / "val_images"
  if not val_dir.is_dir() and (root / "val_images_256").is_dir():
    val_dir = root / "val_images_256"
  val = ImageList(_absolute(val_dir, [f for f, k in zip(val_files, keep) if k]), val_labels[keep])
  _check_images_exist(val.files, str(val_list))
  if not 0 < num_meta < len(val):
    raise ValueError(f"config.data.num_meta={num_meta}: WebVision's {len(val)} validation images "
                     f"of {num_classes} classes are split into meta and test data, so 0 < num_meta "
                     f"< {len(val)}.")
  order = np.random.default_rng(seed).permutation(len(val))
  tests = {"test": val.subset(np.sort(order[num_meta:]))}
  synsets = (_webvision_synsets(root, num_classes) if imagenet_val_dir
             or (root / "info" / "synsets.txt").is_file() else [])
  if imagenet_val_dir:
    tests["imagenet_val"] = _class_folders(pathlib.Path(imagenet_val_dir), synsets)
  return _dataset("webvision", num_classes, tuple(synsets), train,
                  val.subset(np.sort(order[:num_meta])), tests)


def _class_folders(root: pathlib.Path, classes: list[str]) -> ImageList:
  """Images in `root/<class>/` for each class name, labelled by the class's index."""
  files, labels = [], []
  for label, name in enumerate(classes):
    folder = root / name
    if not folder.is_dir():
      raise _layout_error(folder, "class-folder",
                          f"one folder per class ({', '.join(classes[:3])}, …) in {root}")
    # Hidden files and folders (macOS's `._x.jpg`, `.ipynb_checkpoints/`) hold no images.
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES
                    and not any(part.startswith(".")
                                for part in p.relative_to(folder).parts))
    if not images:
      logging.warning("%s holds no images: class %r has none in %s.", folder, name, root)
    files += [str(p) for p in images]
    labels += [label] * len(images)
  result = ImageList(np.asarray(files), np.asarray(labels, np.int32))
  _check_images_exist(result.files, str(root))
  return result


def image_folder(data_dir: str | os.PathLike[str], train_list: str = "") -> Dataset:
  """Your own dataset: `train/<class>/…` (or a `train_list` of `path <label>` lines, paths relative
  to `data_dir`) with noisy labels, and clean `meta/<class>/…` and `test/<class>/…`.

  Classes are the sorted folder names of `meta/` (label i is the i-th name); with `train/`, its
  folders must be the same. In a `train_list`, label −1 marks an image without a label: warm-up
  skips it, phase 2 learns from it through its soft label.
  """
  root = pathlib.Path(data_dir)
  meta_dir = root / "meta"
  if not meta_dir.is_dir():
    raise _layout_error(meta_dir, "image-folder", "meta/<class>/, test/<class>/ and train/<class>/ "
                        "(or --config.data.train_list)")
  classes = sorted(p.name for p in meta_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
  if not classes:
    raise ValueError(f"{meta_dir} has no class folders: the image-folder layout keeps each class's "
                     "images in meta/<class>/ (and test/<class>/, train/<class>/).")
  if train_list:
    list_path = pathlib.Path(train_list)
    list_path = list_path if list_path.is_absolute() else root / list_path
    if not list_path.is_file():
      raise FileNotFoundError(f"config.data.train_list: {list_path} does not exist.")
    files, labels = _read_pairs(list_path)
    _check_labels(labels, len(classes), f"{list_path} (classes: {', '.join(classes)})",
                  unlabelled=True)
    train = ImageList(_absolute(root, files), labels)
    _check_images_exist(train.files, str(list_path))
  else:
    train_dir = root / "train"
    if not train_dir.is_dir():
      raise _layout_error(train_dir, "image-folder", "train/<class>/ or --config.data.train_list")
    train_classes = sorted(p.name for p in train_dir.iterdir()
                           if p.is_dir() and not p.name.startswith("."))
    if train_classes != classes:
      raise ValueError(f"{train_dir} has class folders {train_classes}, {meta_dir} has {classes}: "
                       "they must be the same.")
    train = _class_folders(train_dir, classes)
  return _dataset("image_folder", len(classes), tuple(classes), train,
                  _class_folders(meta_dir, classes),
                  {"test": _class_folders(root / "test", classes)})


def _header_lines(path: pathlib.Path) -> list[str]:
  """The non-empty lines of a Food-101(N) list file, its header line (`class_name…`) dropped."""
  lines = _read_keys(path)
  return lines[1:] if lines and lines[0].startswith("class_name") else lines


def _food_classes(path: pathlib.Path) -> list[str]:
  classes = _header_lines(path)
  if not classes:
    raise ValueError(f"{path} lists no classes (one class name a line).")
  if len(set(classes)) != len(classes):
    raise ValueError(f"{path} lists a class twice.")
  return classes


def _food_labels(keys: list[str], classes: dict[str, int], where: pathlib.Path) -> np.ndarray:
  """Each `<class>/<file>` key's label, the index of its folder's class."""
  labels = np.empty(len(keys), np.int32)
  for i, key in enumerate(keys):
    label = classes.get(key.split("/", 1)[0], -1) if "/" in key else -1
    if label < 0:
      raise ValueError(f"{where}: {key!r} is not '<class>/<file>' with a class of "
                       f"meta/classes.txt.")
    labels[i] = label
  return labels


def _verifications(path: pathlib.Path) -> dict[str, int]:
  """`<class>/<file>.jpg <0|1>` lines (1: the class label was verified correct)."""
  verified = {}
  for number, line in enumerate(_header_lines(path), 2):
    parts = line.split()
    if len(parts) != 2 or parts[1] not in ("0", "1"):
      raise ValueError(f"{path}, line {number}: expected '<class>/<file> <0 or 1>', got "
                       f"{line!r}.")
    verified[parts[0]] = int(parts[1])
  return verified


def food101n(data_dir: str | os.PathLike[str], split: str = "literature", num_meta: int = 0,
             seed: int = 0, food101_dir: str | os.PathLike[str] = "") -> Dataset:
  """Food-101N (Lee et al., CleanNet): 310k web images of Food-101's 101 classes, labelled by their
  search query; about 20% of the labels are wrong. Verification files say for 52,868 training and
  4,741 validation images whether the label is right.

  split='literature': train on the noisy images (all of `imagelist.tsv` but the meta images), meta
  images drawn from those verified correct in `verified_train.tsv`, test on Food-101's 25,250 test
  images (`food-101/meta/test.txt`). split='authors' (the MetaLabelNet code, `get_bigdata_lists`):
  the same meta images, the validation images verified correct as the test set, and every other
  image of `imagelist.tsv` (those verified wrong too) for training; Food-101 is not needed.

  Args:
    data_dir: the folder holding `Food-101N_release/` (and `food-101/`, unless `food101_dir`).
    split: 'literature' | 'authors'.
    num_meta: meta images drawn by `seed` from the verified-correct training images (0: all);
      the others stay in the training set.
    seed: seed of that draw.
    food101_dir: Food-101's folder (default `<data_dir>/food-101`).

  Returns:
    The dataset. The training labels' realised noise is unknown image by image; `noise.verified`
    gives the share verified wrong among the training images that were checked.
  """
  root = pathlib.Path(data_dir)
  release = root / FOOD101N_DIR
  for name in _FOOD101N_FILES:
    if not (release / name).is_file():
      raise _layout_error(release / name, "Food-101N",
                          f"{FOOD101N_DIR}/ with images/<class>/ and "
                          f"{', '.join(_FOOD101N_FILES)} in {root}")
  class_list = _food_classes(release / "meta/classes.txt")
  classes = {name: label for label, name in enumerate(class_list)}
  keys = _header_lines(release / "meta/imagelist.tsv")
  labels = _food_labels(keys, classes, release / "meta/imagelist.tsv")
  in_list = set(keys)
  verified = {}
  for name in ("verified_train", "verified_val"):
    path = release / "meta" / f"{name}.tsv"
    checked = _verifications(path)
    # The real verified_train.tsv names one image under another class than imagelist.tsv does.
    stray = [k for k in checked if k not in in_list]
    if stray:
      logging.warning("%s: %d of its %d images are not in imagelist.tsv (e.g. %s); left out.",
                      path, len(stray), len(checked), stray[0])
    verified[name] = {k: v for k, v in checked.items() if k in in_list}
  correct = sorted(k for k, v in verified["verified_train"].items() if v == 1)
  if not correct:
    raise ValueError(f"{release / 'meta/verified_train.tsv'} verifies no image as correct: the "
                     "meta set would be empty.")
  if num_meta > len(correct):
    raise ValueError(f"config.data.num_meta={num_meta} exceeds the {len(correct)} verified-correct "
                     f"training images of Food-101N.")
  if num_meta:
    chosen = np.random.default_rng(seed).permutation(len(correct))[:num_meta]
    correct = [correct[i] for i in np.sort(chosen)]
  meta_keys = set(correct)
  test_keys = (set() if split == "literature" else
               {k for k, v in verified["verified_val"].items() if v == 1})
  train_index = np.asarray([i for i, k in enumerate(keys)
                            if k not in meta_keys and k not in test_keys], np.int64)
  train_keys = [keys[i] for i in train_index]
  images = release / "images"
  train = ImageList(_absolute(images, train_keys), labels[train_index])
  meta = ImageList(_absolute(images, correct), _food_labels(correct, classes, release))
  _check_images_exist(train.files, str(release / "meta/imagelist.tsv"))
  _check_images_exist(meta.files, str(release / "meta/verified_train.tsv"))
  if split == "literature":
    tests = {"test": _food101_test(pathlib.Path(food101_dir) if food101_dir
                                   else root / FOOD101_DIR, class_list)}
  else:
    ordered = sorted(test_keys)
    tests = {"test": ImageList(_absolute(images, ordered),
                               _food_labels(ordered, classes, release))}
    _check_images_exist(tests["test"].files, str(release / "meta/verified_val.tsv"))
  # Verified training images: a known share of wrong labels, though not which class is right.
  checked = [verified[name][k] for name in verified for k in train_keys if k in verified[name]]
  about = {"verified": {"checked": len(checked), "wrong": checked.count(0),
                        "wrong_rate": checked.count(0) / len(checked) if checked else None}}
  return _dataset("food101n", len(class_list), tuple(class_list), train, meta, tests,
                  about_noise=about)


def _food101_test(folder: pathlib.Path, classes: list[str]) -> ImageList:
  """Food-101's test images (`meta/test.txt`), labelled by Food-101N's class list."""
  for name in _FOOD101_FILES:
    if not (folder / name).is_file():
      raise _layout_error(folder / name, "Food-101",
                          f"images/<class>/ and {', '.join(_FOOD101_FILES)} in {folder} (the test "
                          "set of data.food101n_split=literature; set --config.data.food101_dir, "
                          "or use --config.data.food101n_split=authors)")
  food101_classes = _food_classes(folder / "meta/classes.txt")
  if food101_classes != classes:
    first = next(i for i, (a, b) in enumerate(zip(food101_classes + [""], classes + [""]))
                 if a != b)
    raise ValueError(f"{folder / 'meta/classes.txt'} and Food-101N's meta/classes.txt list "
                     f"different classes ({len(food101_classes)} and {len(classes)}; line "
                     f"{first + 1} differs): the test labels would name other classes.")
  keys = _read_keys(folder / "meta/test.txt")
  result = ImageList(_absolute(folder / "images", [f"{k}.jpg" for k in keys]),
                     _food_labels(keys, {n: i for i, n in enumerate(classes)},
                                  folder / "meta/test.txt"))
  _check_images_exist(result.files, str(folder / "meta/test.txt"))
  return result


def load(data_config: Any, seed: int) -> Dataset:
  """The streamed dataset `data_config.name` names, with `num_meta` and `num_unlabelled` applied.

  `num_meta` (0: all) draws a meta subset by `seed` (the paper's Table IV); `num_unlabelled` drops
  the labels of that many training images chosen by `seed` (Table V): warm-up skips them, phase 2
  uses them like the others.
  """
  if not data_config.data_dir:
    raise FileNotFoundError(f"no data_dir set for {data_config.name}; pass "
                            "--config.data_dir=<the dataset's root folder>.")
  if data_config.name == "clothing1m":
    dataset = clothing1m(data_config.data_dir)
  elif data_config.name == "webvision":
    dataset = webvision(data_config.data_dir, data_config.num_classes, data_config.num_meta, seed,
                        data_config.imagenet_val_dir)
  elif data_config.name == "food101n":
    dataset = food101n(data_config.data_dir, data_config.food101n_split, data_config.num_meta,
                       seed, data_config.food101_dir)
  elif data_config.name == "image_folder":
    dataset = image_folder(data_config.data_dir, data_config.train_list)
  else:
    raise ValueError(f"{data_config.name!r} is not a streamed dataset.")
  meta = dataset.meta
  # webvision and food101n draw their own (their unused clean images go elsewhere).
  if data_config.num_meta and dataset.name not in ("webvision", "food101n"):
    if data_config.num_meta > len(meta):
      raise ValueError(f"config.data.num_meta={data_config.num_meta} exceeds the {len(meta)} meta "
                       f"images of {dataset.name}.")
    meta = meta.subset(np.sort(np.random.default_rng(seed).permutation(len(meta))
                               [:data_config.num_meta]))
  train = ImageList(dataset.train.files, dataset_lib.drop_labels(
      dataset.train.labels, data_config.num_unlabelled, seed))
  return dataclasses.replace(dataset, train=train, meta=meta, noise=dataset_lib.remeasured_noise(
      dataset.noise, train.labels, dataset.clean_train_labels, dataset.num_classes))
