"""Food-101N read in the layout its authors distribute (beside Food-101): both splits, the meta
draw, the layout's errors, and a run on the streamed loop (tiny fabricated layout)."""

import importlib.util
import json
import pathlib
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from mln_jax import config as config_lib, experiment, file_lists  # noqa: E402

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import fake_layouts  # noqa: E402
import test_streamed  # noqa: E402

CLASSES = ("apple_pie", "baby_back_ribs", "beignets")


@pytest.fixture(scope="module")
def food_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("food")
  fake_layouts.food101n(root)
  return root


@pytest.fixture(scope="module")
def keys(food_root, tmp_path_factory):
  # The same seed writes the same keys: read them back from a second copy.
  return fake_layouts.food101n(tmp_path_factory.mktemp("food_again"))


def relative(files, root):
  return [str(pathlib.Path(f).relative_to(root)) for f in files]


def test_literature_split(food_root, keys):
  dataset = file_lists.food101n(food_root, "literature")
  images = food_root / "Food-101N_release/images"
  assert dataset.name == "food101n" and dataset.class_names == CLASSES
  # Verified correct in verified_train.tsv: images 0, 2, 4 of each class, all of them the meta set.
  correct = sorted(k for k in keys["verified_train"]
                   if keys["imagelist"].index(k) % 12 in (0, 2, 4))
  assert relative(dataset.meta.files, images) == correct
  np.testing.assert_array_equal(dataset.meta.labels, [CLASSES.index(k.split("/")[0])
                                                      for k in correct])
  # Training: every other image of imagelist.tsv, in its order, labelled by its folder.
  train = [k for k in keys["imagelist"] if k not in correct]
  assert relative(dataset.train.files, images) == train
  np.testing.assert_array_equal(dataset.train.labels, [CLASSES.index(k.split("/")[0])
                                                       for k in train])
  # Test: Food-101's test.txt, with the extension the list leaves out.
  test = dataset.tests["test"]
  assert relative(test.files, food_root / "food-101/images") == [f"{k}.jpg" for k in keys["test"]]
  np.testing.assert_array_equal(test.labels, np.repeat(np.arange(3), 4))
  # Verified training images left in training: 2 wrong of verified_train and 3 of verified_val
  # (2 wrong) per class.
  assert dataset.noise["verified"] == {"checked": 15, "wrong": 12, "wrong_rate": 12 / 15}
  assert dataset.noise["realised_rate"] is None and dataset.noise["kind"] == "real"


def test_authors_split_needs_no_food101(food_root, tmp_path):
  shutil.copytree(food_root / "Food-101N_release", tmp_path / "Food-101N_release")
  dataset = file_lists.food101n(tmp_path, "authors")
  images = tmp_path / "Food-101N_release/images"
  # Test: the validation images verified correct (image 6 of each class); the wrong ones train.
  assert [pathlib.Path(f).parent.name for f in dataset.tests["test"].files] == list(CLASSES)
  assert len(dataset.meta) == 9 and len(dataset.train) == 36 - 9 - 3
  assert not set(dataset.train.files) & (set(dataset.meta.files) | set(dataset.tests["test"].files))
  assert dataset.noise["verified"] == {"checked": 12, "wrong": 12, "wrong_rate": 1.0}
  assert all(str(images) in f for f in dataset.tests["test"].files)
  with pytest.raises(FileNotFoundError, match="food-101/meta/classes.txt does not exist.*"
                     "food101n_split=authors"):
    file_lists.food101n(tmp_path, "literature")


def test_num_meta_draws_by_seed_and_the_rest_stays_in_training(food_root):
  config = test_streamed.tiny_streamed("food101n", food_root, **{"data.num_meta": 4})
  first = file_lists.load(config.data, seed=0)
  assert len(first.meta) == 4 and len(first.train) == 36 - 4
  again = file_lists.load(config.data, seed=0)
  other = file_lists.load(config.data, seed=1)
  assert list(first.meta.files) == list(again.meta.files) != list(other.meta.files)
  assert not set(first.meta.files) & set(first.train.files)
  assert first.noise["verified"]["checked"] == 15 + 5  # the 5 correct ones not drawn
  config.data.num_meta = 10
  with pytest.raises(ValueError, match="num_meta=10 exceeds the 9 verified-correct"):
    file_lists.load(config.data, seed=0)


def _broken(tmp_path, food_root, file, text):
  shutil.copytree(food_root, tmp_path / "root")
  path = tmp_path / "root" / file
  if text is None:
    path.unlink()
  else:
    path.write_text(text)
  return tmp_path / "root"


@pytest.mark.parametrize("file, text, error, message", [
    ("Food-101N_release/meta/verified_val.tsv", None, FileNotFoundError,
     "verified_val.tsv does not exist: not a Food-101N folder"),
    ("Food-101N_release/meta/imagelist.tsv", "class_name/key\nsushi/abc.jpg\n", ValueError,
     "imagelist.tsv: 'sushi/abc.jpg' is not '<class>/<file>' with a class"),
    ("Food-101N_release/meta/verified_train.tsv",
     "class_name/key\tverification_label\napple_pie/x.jpg\t2\n", ValueError,
     r"verified_train.tsv, line 2: expected '<class>/<file> <0 or 1>'"),
    ("Food-101N_release/meta/verified_train.tsv", "class_name/key\tverification_label\n",
     ValueError, "verifies no image as correct"),
    ("food-101/meta/classes.txt", "apple_pie\nbeignets\nbaby_back_ribs\n", ValueError,
     "list different classes.*line 2 differs"),
    ("Food-101N_release/meta/classes.txt", "class_name\n", ValueError, "lists no classes"),
])
def test_layout_errors_are_named(tmp_path, food_root, file, text, error, message):
  root = _broken(tmp_path, food_root, file, text)
  with pytest.raises(error, match=message):
    file_lists.food101n(root, "literature")


def test_missing_images_and_stray_verifications(tmp_path, food_root, keys, caplog):
  root = _broken(tmp_path, food_root, "food-101/meta/train.txt", "")
  verified = root / "Food-101N_release/meta/verified_train.tsv"
  # As in the real release: a verified image named under another class than imagelist.tsv's.
  stray = f"beignets/{keys['imagelist'][0].split('/')[1]}"
  verified.write_text(verified.read_text() + f"{stray}\t1\n")
  dataset = file_lists.food101n(root, "literature")
  assert len(dataset.meta) == 9 and "1 of its 16 images are not in imagelist.tsv" in caplog.text
  for key in keys["test"]:
    (root / "food-101/images" / f"{key}.jpg").unlink()
  with pytest.raises(FileNotFoundError, match=r"\.jpg \(listed in .*test.txt\) does not exist"):
    file_lists.food101n(root, "literature")


def test_food101n_config_is_the_authors_settings():
  spec = importlib.util.spec_from_file_location("food101n", TESTS.parent / "configs/food101n.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  food = module.get_config()
  config_lib.validate_config(food)
  assert (food.data.name, food.data.num_meta, food.mln.learning_rate) == ("food101n", 10000, 1e-3)
  assert (food.model.name, food.batch_size, food.num_epochs, food.warmup_epochs) == (
      "resnet50", 32, 10, 1)
  assert (food.data.resize_size, food.data.image_size, food.optim.lr_boundaries) == (256, 224, (5,))
  food.data.food101n_split = "mine"
  with pytest.raises(ValueError, match="food101n_split='mine'"):
    config_lib.validate_config(food)


@pytest.mark.slow
@pytest.mark.parametrize("split", ["literature", "authors"])
def test_a_run_on_food101n(tmp_path, food_root, split):
  config = test_streamed.tiny_streamed("food101n", food_root, **{"data.food101n_split": split,
                                                                  "num_epochs": 2})
  experiment.run(config, str(tmp_path))
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["dataset"] == "food101n" and results["num_classes"] == 3
  assert results["class_names"] == list(CLASSES)
  assert results["num_meta"] == 9 and len(results["history"]) == 2
  assert 0 <= results["last"]["test_accuracy"] <= 1
  assert results["noise"]["verified"]["checked"] == (15 if split == "literature" else 12)
