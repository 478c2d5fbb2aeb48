"""Tiny datasets in exactly the on-disk layouts of Clothing1M, WebVision 1.0 and an image folder.

Each image is a small JPEG whose colour depends on its class (plus noise), so a tiny model can learn
from a few dozen of them; sizes vary, so resizing and cropping are exercised.
"""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image

# A distinct colour per class (up to 14, Clothing1M's count).
_PALETTE = np.array([[220, 30, 30], [30, 200, 30], [30, 30, 220], [220, 220, 30], [220, 30, 220],
                     [30, 220, 220], [120, 60, 0], [250, 250, 250], [10, 10, 10], [128, 128, 128],
                     [250, 150, 0], [0, 100, 150], [150, 0, 100], [100, 150, 0]])


def write_image(path: pathlib.Path, label: int, rng: np.random.Generator) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  height, width = rng.integers(20, 40, 2)
  pixels = _PALETTE[label] + rng.normal(0, 20, (height, width, 3))
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=95)


def clothing1m(root: pathlib.Path, num_train: int = 48, num_val: int = 24, num_test: int = 16,
               num_classes: int = 4, noise: float = 0.25, seed: int = 0) -> dict[str, np.ndarray]:
  """Clothing1M's layout; returns the true classes of the noisy training images and the labels."""
  rng = np.random.default_rng(seed)
  lines = {"noisy_label_kv.txt": [], "clean_label_kv.txt": [], "noisy_train_key_list.txt": [],
           "clean_val_key_list.txt": [], "clean_test_key_list.txt": []}
  truth = rng.integers(0, num_classes, num_train)
  noisy = np.where(rng.random(num_train) < noise, rng.integers(0, num_classes, num_train), truth)
  for i in range(num_train):
    key = f"images/{i % 10}/{i // 10}/{i:05d}.jpg"
    write_image(root / key, truth[i], rng)
    lines["noisy_label_kv.txt"].append(f"{key} {noisy[i]}")
    lines["noisy_train_key_list.txt"].append(key)
    if i < num_train // 4:  # as in the real set, some noisy images also have a clean label
      lines["clean_label_kv.txt"].append(f"{key} {truth[i]}")
  for split, count in (("clean_val_key_list.txt", num_val), ("clean_test_key_list.txt", num_test)):
    for i in range(count):
      key = f"images/clean/{split[6:9]}{i:04d}.jpg"
      label = i % num_classes
      write_image(root / key, label, rng)
      lines["clean_label_kv.txt"].append(f"{key} {label}")
      lines[split].append(key)
  for name, content in lines.items():
    (root / name).write_text("\n".join(content) + "\n")
  return {"truth": truth, "noisy": noisy}


def webvision(root: pathlib.Path, num_classes: int = 6, per_class: int = 8, val_per_class: int = 5,
              kept_classes: int = 4, imagenet_val: pathlib.Path | None = None, seed: int = 0
              ) -> None:
  """WebVision 1.0's layout (Google subset, `info/` lists, `val_images/`, synsets), with classes
  beyond `kept_classes` that a run must drop; optionally ILSVRC12 val images in synset folders."""
  rng = np.random.default_rng(seed)
  synsets = [f"n{1440764 + 17 * c:08d}" for c in range(num_classes)]
  train, val = [], []
  for label in range(num_classes):
    for i in range(per_class):
      key = f"google/q{label + 1:04d}/{i:06d}.jpg"
      write_image(root / key, label, rng)
      train.append(f"{key} {label}")
    for i in range(val_per_class):
      name = f"val{label:03d}{i:04d}.jpg"
      write_image(root / "val_images" / name, label, rng)
      val.append(f"{name} {label}")
    if imagenet_val is not None:
      for i in range(3):
        write_image(imagenet_val / synsets[label] / f"ILSVRC2012_val_{label:03d}{i:05d}.JPEG",
                    label, rng)
  (root / "info").mkdir(parents=True, exist_ok=True)
  (root / "info" / "train_filelist_google.txt").write_text("\n".join(train) + "\n")
  (root / "info" / "val_filelist.txt").write_text("\n".join(val) + "\n")
  (root / "info" / "synsets.txt").write_text("\n".join(f"{s} class {i}" for i, s in
                                                       enumerate(synsets)) + "\n")


def image_folder(root: pathlib.Path, classes: tuple[str, ...] = ("cat", "dog", "fish"),
                 per_class: tuple[int, int, int] = (12, 6, 4), seed: int = 0) -> None:
  """`train/`, `meta/` and `test/` folders with one sub-folder per class."""
  rng = np.random.default_rng(seed)
  for split, count in zip(("train", "meta", "test"), per_class):
    for label, name in enumerate(classes):
      for i in range(count):
        write_image(root / split / name / f"{i:03d}.jpg", label, rng)


def food101n(root: pathlib.Path, classes: tuple[str, ...] = ("apple_pie", "baby_back_ribs",
                                                            "beignets"),
             per_class: int = 12, verified_train: int = 5, verified_val: int = 3,
             food101_test: int = 4, seed: int = 0) -> dict[str, list[str]]:
  """Food-101N_release/ and food-101/ as their authors distribute them (header lines, tab-separated
  verification files, test.txt without extensions). Per class: `per_class` noisy images, the first
  `verified_train` of them in verified_train.tsv (label 1 for the even ones), the next
  `verified_val` in verified_val.tsv (1 for the even ones); `food101_test` Food-101 test images.
  Returns the keys written, by list."""
  rng = np.random.default_rng(seed)
  release, food101 = root / "Food-101N_release", root / "food-101"
  (release / "meta").mkdir(parents=True)
  (food101 / "meta").mkdir(parents=True)
  keys = {"imagelist": [], "verified_train": [], "verified_val": [], "test": []}
  lines = {"verified_train": ["class_name/key\tverification_label"],
           "verified_val": ["class_name/key\tverification_label"]}
  for label, name in enumerate(classes):
    for i in range(per_class):
      key = f"{name}/{rng.integers(1 << 62):016x}.jpg"
      # A noisy image: a fifth of them look like another class.
      looks_like = (label + 1) % len(classes) if i % 5 == 4 else label
      write_image(release / "images" / key, looks_like, rng)
      keys["imagelist"].append(key)
      for split, start, count in (("verified_train", 0, verified_train),
                                  ("verified_val", verified_train, verified_val)):
        if start <= i < start + count:
          lines[split].append(f"{key}\t{1 - i % 2}")
          keys[split].append(key)
    for i in range(food101_test):
      key = f"{name}/{100000 + 17 * i + label}"
      write_image(food101 / "images" / f"{key}.jpg", label, rng)
      keys["test"].append(key)
  (release / "meta/classes.txt").write_text("class_name\n" + "\n".join(classes) + "\n")
  (release / "meta/imagelist.tsv").write_text("class_name/key\n" + "\n".join(keys["imagelist"])
                                              + "\n")
  for split in ("verified_train", "verified_val"):
    (release / "meta" / f"{split}.tsv").write_text("\n".join(lines[split]) + "\n")
  (food101 / "meta/classes.txt").write_text("\n".join(classes) + "\n")
  (food101 / "meta/test.txt").write_text("\n".join(keys["test"]) + "\n")
  (food101 / "meta/train.txt").write_text("")
  return keys
