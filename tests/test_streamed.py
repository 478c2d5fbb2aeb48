"""Streamed datasets: the authors' on-disk layouts, the tf.data streams, and the streamed loop end
to end on tiny fabricated datasets (a few dozen small JPEGs in exactly the real layouts)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh

pytest.importorskip("tensorflow")

from mln_jax import config as config_lib, experiment, file_lists, input_pipeline, loop  # noqa: E402
from mln_jax import runtime, streamed, trained  # noqa: E402
from mln_jax.train_state import state_from_config  # noqa: E402

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import fake_layouts  # noqa: E402
import tiny_config  # noqa: E402

PREP = input_pipeline.Preprocessing(resize_size=20, image_size=16, hflip=True)


@pytest.fixture(scope="module")
def clothing_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("clothing1m")
  fake_layouts.clothing1m(root)
  return root


@pytest.fixture(scope="module")
def webvision_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("webvision")
  fake_layouts.webvision(root, imagenet_val=root / "imagenet_val")
  return root


TINY_STREAMED = {
    "data.num_meta": 0, "data.resize_size": 20, "data.image_size": 16, "model.name": "conv_bn",
    "model.blocks": ((8,),), "model.feature_dim": 16, "batch_size": 8, "eval_batch_size": 16,
    "num_epochs": 3, "warmup_epochs": 1, "optim.learning_rate": 0.05, "optim.lr_boundaries": (2,),
    "log_every_steps": 2, "checkpoint_every_steps": 2, "report": False}


def tiny_streamed(name, data_dir, **overrides):
  """A seconds-long streamed config: 16x16 crops, a one-block CNN, 3 epochs (1 warm-up)."""
  return tiny_config.with_overrides(config_lib.streamed_config(), **{
      **TINY_STREAMED, "data.name": name, "data.data_dir": str(data_dir), **overrides})


def test_clothing1m_layout_is_read(clothing_root):
  truth = fake_layouts.clothing1m(clothing_root)  # same seed: the same files and labels
  dataset = file_lists.clothing1m(clothing_root)
  assert dataset.num_classes == 14
  assert (len(dataset.train), len(dataset.meta), len(dataset.tests["test"])) == (48, 24, 16)
  np.testing.assert_array_equal(dataset.train.labels, truth["noisy"])
  assert dataset.train.files[7] == str(clothing_root / "images/7/0/00007.jpg")
  # The first quarter of the noisy images also has a clean label (as ~37k real ones do).
  np.testing.assert_array_equal(dataset.clean_train_labels[:12], truth["truth"][:12])
  assert np.all(dataset.clean_train_labels[12:] == -1)


def test_webvision_layout_keeps_the_first_classes_and_splits_val_by_seed(webvision_root):
  dataset = file_lists.webvision(webvision_root, num_classes=4, num_meta=8, seed=0,
                                 imagenet_val_dir=str(webvision_root / "imagenet_val"))
  assert len(dataset.train) == 4 * 8 and dataset.train.labels.max() == 3
  assert dataset.train.files[0] == str(webvision_root / "google/q0001/000000.jpg")
  assert len(dataset.meta) == 8 and len(dataset.tests["test"]) == 4 * 5 - 8
  assert not set(dataset.meta.files) & set(dataset.tests["test"].files)
  assert all("/val_images/" in f for f in dataset.meta.files)
  imagenet = dataset.tests["imagenet_val"]
  assert len(imagenet) == 4 * 3 and sorted(set(imagenet.labels.tolist())) == [0, 1, 2, 3]
  assert "/n01440764/" in imagenet.files[0]  # class 0 is the first synset of info/synsets.txt
  again = file_lists.webvision(webvision_root, 4, 8, seed=0)
  other = file_lists.webvision(webvision_root, 4, 8, seed=1)
  np.testing.assert_array_equal(again.meta.files, dataset.meta.files)
  assert set(other.meta.files) != set(dataset.meta.files)


def test_image_folder_layout_with_and_without_a_train_list(tmp_path):
  fake_layouts.image_folder(tmp_path)
  (tmp_path / "train/cat/._000.jpg").write_bytes(b"macOS resource fork")  # not an image
  fake_layouts.write_image(tmp_path / "train/cat/.ipynb_checkpoints/000.jpg", 0,
                           np.random.default_rng(0))  # a hidden folder: not a training image
  dataset = file_lists.image_folder(tmp_path)
  assert dataset.num_classes == 3
  assert (len(dataset.train), len(dataset.meta), len(dataset.tests["test"])) == (36, 18, 12)
  assert dataset.train.labels.tolist() == [0] * 12 + [1] * 12 + [2] * 12  # cat, dog, fish
  (tmp_path / "noisy.txt").write_text("train/cat/000.jpg 2\ntrain/dog/001.jpg 0\n")
  listed = file_lists.image_folder(tmp_path, train_list="noisy.txt")
  assert listed.train.labels.tolist() == [2, 0]
  assert listed.train.files[0] == str(tmp_path / "train/cat/000.jpg")
  assert dataset.class_names == listed.class_names == ("cat", "dog", "fish")
  (tmp_path / "noisy.txt").write_text("train/cat/000.jpg -2\n")
  with pytest.raises(ValueError, match=r"classes: cat, dog, fish\): label -2 lies outside \[0, 3\) "
                                       r"or −1 \(unlabelled\)"):
    file_lists.image_folder(tmp_path, train_list="noisy.txt")


@pytest.mark.slow
def test_image_folder_run_with_unlabelled_lines_names_its_classes(tmp_path):
  fake_layouts.image_folder(tmp_path / "mine")
  files = sorted((tmp_path / "mine/train").rglob("*.jpg"))
  # Every third training image has no label (−1): it joins phase 2 only.
  classes = ("cat", "dog", "fish")
  label = lambda i, f: -1 if i % 3 == 0 else classes.index(f.parent.name)
  lines = [f"{f.relative_to(tmp_path / 'mine')} {label(i, f)}" for i, f in enumerate(files)]
  (tmp_path / "mine/noisy.txt").write_text("\n".join(lines) + "\n")
  config = tiny_streamed("image_folder", tmp_path / "mine", **{"data.train_list": "noisy.txt",
                                                                "num_epochs": 2})
  results = experiment.train_and_evaluate(config, str(tmp_path / "run"))
  assert (results["num_train"], results["num_labelled"]) == (36, 24)
  assert results["class_names"] == list(classes)
  with np.load(tmp_path / "run/soft_labels.npz") as export:
    assert export["class_names"].tolist() == list(classes)
    assert (export["given_label"] == -1).sum() == 12


def _break(root: pathlib.Path, what: str) -> None:
  if what == "list":
    (root / "clean_val_key_list.txt").unlink()
  elif what == "image":
    os.remove(root / "images/0/0/00000.jpg")
  elif what == "line":
    with open(root / "noisy_label_kv.txt", "a") as f:
      f.write("images/x.jpg not-a-label\n")
  elif what == "label":
    text = (root / "noisy_label_kv.txt").read_text().splitlines()
    text[0] = text[0].split()[0] + " 14"
    (root / "noisy_label_kv.txt").write_text("\n".join(text) + "\n")
  elif what == "key":
    with open(root / "clean_test_key_list.txt", "a") as f:
      f.write("images/unlabelled.jpg\n")


@pytest.mark.parametrize("what, error, message", [
    ("list", FileNotFoundError, r"clean_val_key_list.txt does not exist: not a Clothing1M folder"),
    ("image", FileNotFoundError, r"images/0/0/00000.jpg \(listed in .*noisy_train_key_list.txt\)"),
    ("line", ValueError, r"noisy_label_kv.txt, line 49: expected '<image path> <integer label>'"),
    ("label", ValueError, r"label 14 lies outside \[0, 14\)"),
    ("key", ValueError, r"lists 1 images without a label in .*clean_label_kv.txt, e.g. "
                        r"'images/unlabelled.jpg'"),
])
def test_broken_clothing1m_layouts_are_named(tmp_path, what, error, message):
  fake_layouts.clothing1m(tmp_path)
  _break(tmp_path, what)
  with pytest.raises(error, match=message):
    file_lists.clothing1m(tmp_path)


def test_webvision_resized_release_and_bad_labels(tmp_path):
  fake_layouts.webvision(tmp_path)
  (tmp_path / "val_images").rename(tmp_path / "val_images_256")  # the resized release's name
  dataset = file_lists.webvision(tmp_path, 4, 8, seed=0)
  assert all("/val_images_256/" in f for f in dataset.meta.files)
  lines = (tmp_path / "info/val_filelist.txt").read_text().splitlines()
  lines[0] = lines[0].split()[0] + " -1"
  (tmp_path / "info/val_filelist.txt").write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"val_filelist.txt: label -1 lies outside \[0, 1000\)"):
    file_lists.webvision(tmp_path, 4, 8, seed=0)


def test_other_layout_errors(tmp_path, webvision_root):
  with pytest.raises(FileNotFoundError, match="info/train_filelist_google.txt does not exist"):
    file_lists.webvision(tmp_path, 4, 8, seed=0)
  with pytest.raises(ValueError, match="0 < num_meta < 20"):
    file_lists.webvision(webvision_root, 4, 20, seed=0)
  fake_layouts.image_folder(tmp_path / "mine")
  (tmp_path / "mine/train/bird").mkdir()
  with pytest.raises(ValueError, match="class folders .*bird.* they must be the same"):
    file_lists.image_folder(tmp_path / "mine")
  (tmp_path / "flat/meta").mkdir(parents=True)
  with pytest.raises(ValueError, match="flat/meta has no class folders"):
    file_lists.image_folder(tmp_path / "flat")
  with pytest.raises(FileNotFoundError, match="no data_dir set for clothing1m"):
    file_lists.load(tiny_streamed("clothing1m", "").data, seed=0)


def _stack(stream):
  batches = list(stream)
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def test_streams_are_deterministic_per_seed_and_resume_mid_epoch(clothing_root):
  images = file_lists.clothing1m(clothing_root).train
  indices = np.arange(len(images))
  stream = lambda seed, epoch, start=0: _stack(input_pipeline.train_batches(
      images, indices, 8, PREP, seed, epoch, start))
  first = stream(0, 0)
  assert first["image"].shape == (6, 8, 16, 16, 3) and first["image"].dtype == np.uint8
  again, other_seed, other_epoch = stream(0, 0), stream(1, 0), stream(0, 1)
  resumed = stream(0, 0, 2)
  for key in first:
    np.testing.assert_array_equal(again[key], first[key])
    np.testing.assert_array_equal(resumed[key], first[key][2:])
  assert not np.array_equal(other_seed["label"], first["label"])
  assert not np.array_equal(other_epoch["label"], first["label"])
  # An epoch visits every image once (48 = 6 batches of 8).
  assert sorted(first["label"].ravel().tolist()) == sorted(images.labels.tolist())


def test_meta_stream_cycles_through_whole_passes(clothing_root):
  meta = file_lists.clothing1m(clothing_root).meta  # 24 images
  order = input_pipeline.cycling_order(len(meta), num_steps=7, batch_size=8, seed=0, epoch=3)
  assert order.shape == (7, 8)
  flat = order.ravel()
  assert sorted(flat[:24]) == list(range(24)) and sorted(flat[24:48]) == list(range(24))
  batches = _stack(input_pipeline.meta_batches(meta, 7, 8, PREP, seed=0, epoch=3))
  np.testing.assert_array_equal(batches["label"], meta.labels[order])


def test_meta_set_in_memory_gives_the_streamed_meta_batches(clothing_root):
  meta = file_lists.clothing1m(clothing_root).meta
  pixels = input_pipeline.decode_all(meta, PREP, batch_size=10)  # 24 = 10 + 10 + 4 (padded)
  assert pixels.shape == (24, 16, 16, 3) and pixels.dtype == np.uint8
  order, flips = input_pipeline.meta_schedule(len(meta), 5, 8, seed=0, epoch=2, hflip=True)
  gathered = np.where(flips[..., None, None, None], pixels[order][:, :, :, ::-1], pixels[order])
  streamed = _stack(input_pipeline.meta_batches(meta, 5, 8, PREP, seed=0, epoch=2))
  np.testing.assert_array_equal(gathered, streamed["image"])
  np.testing.assert_array_equal(meta.labels[order], streamed["label"])
  assert 0 < flips.mean() < 1


def test_preprocessing_resizes_crops_and_flips(tmp_path):
  # A 40x80 image: left half black, right half white, a red centre mark.
  pixels = np.zeros((40, 80, 3), np.uint8)
  pixels[:, 40:] = 255
  pixels[18:22, 38:42] = (255, 0, 0)
  from PIL import Image
  Image.fromarray(pixels).save(tmp_path / "a.png")
  images = file_lists.ImageList(np.asarray([str(tmp_path / "a.png")] * 2), np.asarray([0, 0]))
  order, flips = np.asarray([[0, 1]]), np.asarray([[False, True]])
  shorter = input_pipeline.Preprocessing(20, 16, resize_mode="shorter_side")
  batch = next(iter(input_pipeline.stream_of(images, order, flips, shorter, 0)))
  plain, flipped = batch["image"]
  assert plain.shape == (16, 16, 3)
  # Shorter side 40 -> 20 keeps the aspect (20x40); the centre crop keeps the red mark in the
  # middle.
  assert plain[8, 8, 0] > 150 and plain[8, 8, 1] < 100
  assert plain[8, 0].mean() < 60 and plain[8, 15].mean() > 200  # black left, white right
  np.testing.assert_array_equal(flipped, plain[:, ::-1])
  square = input_pipeline.Preprocessing(20, 16, resize_mode="square")
  squashed = next(iter(input_pipeline.stream_of(images, order, flips, square, 0)))
  assert squashed["image"].shape == (2, 16, 16, 3)
  assert not np.array_equal(squashed["image"][0], plain)  # 40x80 -> 20x20 squashes the image
  with pytest.raises(ValueError, match="resize_mode='crop'"):
    input_pipeline.Preprocessing(20, 16, resize_mode="crop")


def test_eval_stream_covers_every_image_once(clothing_root):
  test = file_lists.clothing1m(clothing_root).tests["test"]  # 16 images, batches of 6
  batches = _stack(input_pipeline.eval_batches(test, 6, PREP))
  assert batches["valid"].shape == (3, 6) and batches["valid"].sum() == 16
  np.testing.assert_array_equal(batches["label"].ravel()[:16], test.labels)


def test_processes_read_disjoint_parts_of_every_batch(clothing_root, monkeypatch):
  images = file_lists.clothing1m(clothing_root).train
  whole = _stack(input_pipeline.train_batches(images, np.arange(48), 8, PREP, 0, 0))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  parts = []
  for index in range(2):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    parts.append(_stack(input_pipeline.train_batches(images, np.arange(48), 8, PREP, 0, 0)))
  assert parts[0]["image"].shape == (6, 4, 16, 16, 3)
  for key in whole:
    np.testing.assert_array_equal(np.concatenate([parts[0][key], parts[1][key]], 1), whole[key])


def test_device_batches_are_sharded_over_four_devices(clothing_root):
  assert jax.device_count() == 4
  mesh = Mesh(np.array(jax.devices()), ("data",))
  images = file_lists.clothing1m(clothing_root).train
  stream = input_pipeline.train_batches(images, np.arange(48), 8, PREP, 0, 0)
  on_devices = list(input_pipeline.device_batches(stream, mesh, prefetch=2))
  host = list(stream)
  assert len(on_devices) == len(host) == 6
  for device_batch, host_batch in zip(on_devices, host):
    image = device_batch["image"]
    assert image.shape == (8, 16, 16, 3) and len(image.addressable_shards) == 4
    assert {s.data.shape for s in image.addressable_shards} == {(2, 16, 16, 3)}
    np.testing.assert_array_equal(np.asarray(image), host_batch["image"])


def _history_without_times(results):
  return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in results["history"]]


@pytest.mark.slow
def test_clothing1m_run_resumed_mid_epoch_equals_an_uninterrupted_run(tmp_path, clothing_root,
                                                                      monkeypatch):
  config = tiny_streamed("clothing1m", clothing_root)
  whole = experiment.train_and_evaluate(config, str(tmp_path / "whole"))
  assert [r["phase"] for r in whole["history"]] == ["warm-up", "metalabelnet", "metalabelnet"]
  for record in whole["history"]:
    assert 0 <= record["test_accuracy"] <= record["test_top5"] <= 1
  assert whole["last"]["test_accuracy"] >= 0.5  # 4 colour classes, 25% label noise
  assert whole["noise"]["measured_on"] == 12
  assert os.path.exists(tmp_path / "whole" / "results.json")
  # The soft-label export: every training image, in list order, with its file; label issues are
  # measured on the 12 noisy images that also have a clean label.
  exported = np.load(tmp_path / "whole" / "soft_labels.npz")
  dataset = file_lists.clothing1m(clothing_root)
  np.testing.assert_array_equal(exported["image_file"], dataset.train.files)
  np.testing.assert_array_equal(exported["given_label"], dataset.train.labels)
  np.testing.assert_array_equal(exported["clean_label"], dataset.clean_train_labels)
  assert exported["soft_label"].shape == (48, 14)
  np.testing.assert_allclose(exported["soft_label"].sum(1), 1, rtol=1e-5)
  assert whole["label_issues"]["measured_on"] == 12
  assert whole["label_issues"]["labelled"] == 12
  # The trained run gives soft labels for any images of its size: here its own training images.
  state, run_config = trained.load_trained_state(str(tmp_path / "whole"))
  pixels = input_pipeline.decode_all(dataset.train, PREP)
  np.testing.assert_allclose(trained.soft_labels_for(state, pixels, run_config),
                             exported["soft_label"], rtol=1e-5, atol=1e-6)

  # This run streams its meta batches from disk (the uninterrupted one keeps the meta set in device
  # memory): the same batches, so the same numbers, and the streamed path resumes mid-epoch too.
  streamed_meta = tiny_streamed("clothing1m", clothing_root, **{"data.meta_in_memory": False})
  # Killed at step 4 of the second epoch, after the checkpoint at its step 2.
  tiny_config.run_killed(monkeypatch, lambda: experiment.train_and_evaluate(
      streamed_meta, str(tmp_path / "killed")), epoch=1, step=4)
  assert not os.path.exists(tmp_path / "killed" / "results.json")
  resumed = experiment.train_and_evaluate(streamed_meta, str(tmp_path / "killed"))
  assert _history_without_times(resumed) == _history_without_times(whole)
  restore = lambda d: ocp.CheckpointManager(str(d / "checkpoints")).restore(
      None, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  jax.tree.map(np.testing.assert_array_equal, restore(tmp_path / "killed"),
               restore(tmp_path / "whole"))

  # Preemption notices (orbax's sync point; JAX's runtime asks at every step) in a run with
  # checkpoints at epoch ends only: at global step 9 (epoch 2, step 3 of 6, inside a logging
  # window) and at step 12 (the last of epoch 2). Each time the run checkpoints and stops.
  epoch_ends_only = tiny_streamed("clothing1m", clothing_root, checkpoint_every_steps=0)
  # And at step 18, the run's last: its checkpoint holds the finished training, so the resumed run
  # only exports and writes its results.
  for notice, message in ((9, r"at step 9 \(epoch 2, step 3/6\)"), (12, "at the end of epoch 2"),
                          (18, "at the end of epoch 3")):
    asked = []

    def reached_preemption(self, step, notice=notice, asked=asked):
      asked.append(step)
      return step == notice

    with monkeypatch.context() as patch:
      patch.setattr(ocp.CheckpointManager, "reached_preemption", reached_preemption)
      with pytest.raises(loop.Preempted, match=message):
        experiment.train_and_evaluate(epoch_ends_only, str(tmp_path / f"notice{notice}"))
    # Asked after every step (orbax also asks when saving).
    assert sorted(set(asked)) == list(range(1, notice + 1))
    checkpoints = ocp.CheckpointManager(str(tmp_path / f"notice{notice}" / "checkpoints"))
    assert checkpoints.latest_step() == notice
  # The first resumes streaming its meta set: a setting that may change on resume (e.g. when the
  # device memory runs short), as it does not change the numbers.
  resume_configs = {9: tiny_streamed("clothing1m", clothing_root, checkpoint_every_steps=0,
                                     **{"data.meta_in_memory": False}), 12: epoch_ends_only,
                    18: epoch_ends_only}
  for notice, resume_config in resume_configs.items():
    resumed = experiment.train_and_evaluate(resume_config, str(tmp_path / f"notice{notice}"))
    assert _history_without_times(resumed) == _history_without_times(whole)
    with np.load(tmp_path / f"notice{notice}" / "soft_labels.npz") as soft:
      np.testing.assert_allclose(soft["soft_label"], exported["soft_label"], rtol=1e-6)


def test_evaluation_counts_every_image_once_despite_padding(tmp_path, clothing_root):
  from mln_jax import augment, steps
  config = tiny_streamed("clothing1m", clothing_root)
  meta = file_lists.clothing1m(clothing_root).meta  # 24 images: batches of 16 leave 8 padded
  state = state_from_config(config, (16, 16, 3), 14, jax.random.PRNGKey(3))
  images = _stack(input_pipeline.eval_batches(meta, 24, PREP))["image"][0]
  ranked = np.argsort(-np.asarray(steps.predict(state, augment.normalise_imagenet(images))), 1)
  # Labels the model gets right (top-1) at even positions, including image 0, which is what the
  # padding repeats: counting padding would inflate both accuracies.
  labels = np.where(np.arange(24) % 2 == 0, ranked[:, 0], ranked[:, 7]).astype(np.int32)
  labels[1] = ranked[1, 3]  # one more top-5 hit that is not a top-1 hit
  mesh = Mesh(np.array(jax.devices()), ("data",))
  evaluate = streamed.make_evaluate(14)
  accuracy = streamed.evaluate_list(evaluate, state, file_lists.ImageList(meta.files, labels),
                                        mesh, 16, PREP)
  assert accuracy == {"accuracy": 12 / 24, "top5": 13 / 24}


def test_an_undecodable_image_is_named(tmp_path):
  fake_layouts.clothing1m(tmp_path)
  (tmp_path / "images/3/0/00003.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  images = file_lists.clothing1m(tmp_path).train
  with pytest.raises(ValueError, match=r"Could not read or decode [^,]*/images/3/0/00003.jpg \("):
    _stack(input_pipeline.train_batches(images, np.arange(48), 48, PREP, 0, 0))


def test_replicated_state_is_built_per_process(monkeypatch):
  mesh = Mesh(np.array(jax.devices()), ("data",))
  tree = {"w": np.arange(6.0).reshape(2, 3), "step": np.int32(4)}
  monkeypatch.setattr(jax, "process_count", lambda: 2)  # takes the multi-process branch
  replicated = runtime.replicate(mesh, tree)
  assert replicated["w"].sharding.is_fully_replicated
  np.testing.assert_array_equal(replicated["w"], tree["w"])
  assert int(replicated["step"]) == 4


@pytest.mark.slow
def test_unlabelled_images_join_phase_2_only(tmp_path, clothing_root):
  config = tiny_streamed("clothing1m", clothing_root, **{"data.num_unlabelled": 24,
                                                         "data.num_meta": 16})
  results = experiment.train_and_evaluate(config, str(tmp_path))
  assert (results["num_train"], results["num_labelled"], results["num_meta"]) == (48, 24, 16)
  # Warm-up: 24 labelled images = 3 batches; phase 2: all 48 = 6 batches per epoch.
  assert [r["steps"] for r in results["history"]] == [3, 6, 6]


@pytest.mark.slow
def test_meta_set_in_memory_or_streamed_trains_the_same(tmp_path, clothing_root):
  kept, read = (experiment.train_and_evaluate(
      tiny_streamed("clothing1m", clothing_root, **{"data.meta_in_memory": flag}),
      str(tmp_path / str(flag))) for flag in (True, False))
  assert len(kept["history"]) == 3
  assert _history_without_times(kept) == _history_without_times(read)


@pytest.mark.slow
def test_sharded_run_matches_a_single_device_run(tmp_path, clothing_root):
  config = tiny_streamed("clothing1m", clothing_root, num_epochs=2)
  one = experiment.train_and_evaluate(
      config, str(tmp_path / "one"), mesh=Mesh(np.array(jax.devices()[:1]), ("data",)))
  four = experiment.train_and_evaluate(
      config, str(tmp_path / "four"), mesh=Mesh(np.array(jax.devices()), ("data",)))
  assert four["device"].endswith("x4")
  assert len(one["history"]) == len(four["history"]) == 2
  for a, b in zip(one["history"], four["history"]):
    for key in ("train/loss", "train/meta_loss", "meta_accuracy", "test_accuracy"):
      if key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


@pytest.mark.slow
def test_webvision_cli_reports_top1_and_top5_on_both_test_sets(tmp_path, webvision_root):
  workdir = tmp_path / "run"
  completed = subprocess.run(
      [sys.executable, "-m", "mln_jax.main", f"--config={TESTS.parent / 'configs/webvision.py'}",
       f"--workdir={workdir}", f"--config.data.data_dir={webvision_root}",
       f"--config.data.imagenet_val_dir={webvision_root / 'imagenet_val'}",
       "--config.data.num_classes=4", "--config.data.num_meta=8", "--config.data.resize_size=20",
       "--config.data.image_size=16", "--config.model.name=conv_bn",
       "--config.model.blocks=((8,),)", "--config.model.feature_dim=16", "--config.batch_size=8",
       "--config.num_epochs=2", "--config.warmup_epochs=1", "--config.log_every_steps=2",
       "--config.checkpoint_every_steps=0"],
      capture_output=True, text=True, cwd=TESTS.parent, timeout=600,
      env={**os.environ, "XLA_FLAGS": ""})
  assert completed.returncode == 0, completed.stderr[-3000:]
  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert results["dataset"] == "webvision" and results["num_classes"] == 4
  assert results["class_names"] == [f"n{1440764 + 17 * c:08d}" for c in range(4)]  # synsets.txt
  assert set(results["best"]) == {"epoch", "meta_accuracy", "meta_top5", "test_accuracy",
                                  "test_top5", "imagenet_val_accuracy", "imagenet_val_top5"}
  assert results["last"]["imagenet_val_top5"] == 1.0  # 4 classes: the top 5 hold every class
  assert "webvision, the dataset's own noisy labels" in completed.stdout


@pytest.mark.parametrize("overrides, message", [
    ({"noise.kind": "uniform"}, "trains on its own .* labels; set --config.noise.kind=none"),
    ({"num_runs": 2}, "stream from disk one at a time"),
    ({"data.image_size": 32}, "needs 0 < image_size <= resize_size"),
    ({"checkpoint_every_steps": 3}, "must be 0 or a multiple of config.log_every_steps=2"),
    ({"data.resize_mode": "crop"}, "choose 'square' or 'shorter_side'"),
    ({"model.pretrained": "w.pth"}, "loads torchvision ResNet weights only"),
    ({"augment.vflip": True}, "centre crops and horizontal flips only"),
])
def test_bad_streamed_configs_are_rejected(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(tiny_streamed("clothing1m", tmp_path, **overrides))


def _torchvision_state_dict(variables):
  """A Flax ResNet's variables under torchvision's names and layouts (what a .pth would hold)."""
  from mln_jax import pretrained
  to_torch = {4: (3, 2, 0, 1), 2: (1, 0), 1: (0,)}
  return {pretrained.torch_name(tuple(k.key for k in path)): np.transpose(np.asarray(leaf),
                                                                         to_torch[leaf.ndim])
          for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}


@pytest.mark.slow
def test_pretrained_resnet_weights_start_the_streamed_run(tmp_path, clothing_root):
  from mln_jax import resnet
  tiny_resnet = {"model.name": "resnet", "model.stage_sizes": (1, 1), "model.num_filters": 4,
                 "num_epochs": 2}
  # "ImageNet" weights: a 1000-class model of the same shape with its own random weights.
  imagenet = resnet.ResNet(num_classes=1000, stage_sizes=(1, 1), num_filters=4).init(
      jax.random.PRNGKey(7), np.zeros((1, 16, 16, 3), np.float32), train=False)
  np.savez(tmp_path / "imagenet.npz", **_torchvision_state_dict(imagenet))
  config = tiny_streamed("clothing1m", clothing_root, **tiny_resnet,
                         **{"model.pretrained": str(tmp_path / "imagenet.npz")})
  state = state_from_config(config, (16, 16, 3), 14, jax.random.PRNGKey(0))
  loaded = streamed.load_pretrained(config, state)
  for name in ("conv1", "layer1_0", "layer2_0"):
    jax.tree.map(np.testing.assert_array_equal, loaded.params[name], imagenet["params"][name])
    jax.tree.map(np.testing.assert_array_equal, loaded.extractor_params[name],
                 imagenet["params"][name])
  jax.tree.map(np.testing.assert_array_equal, loaded.batch_stats, imagenet["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, loaded.params["fc"], state.params["fc"])  # 14 classes
  results = experiment.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["last"]["epoch"] == 2 and results["best"]["test_top5"] > 0
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    experiment.train_and_evaluate(
        tiny_streamed("clothing1m", clothing_root, **tiny_resnet,
                      **{"model.pretrained": str(tmp_path / "missing.npz")}),
        str(tmp_path / "missing"))


def test_a_corrupt_test_image_stops_the_run_before_training(tmp_path):
  fake_layouts.image_folder(tmp_path / "mine")
  (tmp_path / "mine/test/dog/001.jpg").write_bytes(b"\xff\xd8\xff truncated")
  config = tiny_streamed("image_folder", tmp_path / "mine")
  with pytest.raises(ValueError, match="Could not read or decode .*test/dog/001.jpg"):
    experiment.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, no epoch lost


def test_verify_files_checks_every_training_file(tmp_path, monkeypatch):
  fake_layouts.image_folder(tmp_path / "mine")
  (tmp_path / "mine/train/dog/004.jpg").unlink()
  monkeypatch.setattr(file_lists, "_NUM_CHECKED", 0)  # the sampled check misses it
  listed = tmp_path / "mine/list.txt"
  listed.write_text("".join(f"train/{c}/{i:03d}.jpg {n}\n" for n, c in enumerate(("cat", "dog"))
                            for i in range(1, 12)))
  config = tiny_streamed("image_folder", tmp_path / "mine", **{"data.train_list": "list.txt",
                                                              "data.verify_files": True})
  with pytest.raises(FileNotFoundError, match="1 of the 22 files in the training list do not "
                                              "exist, e.g. .*dog/004.jpg"):
    streamed.StreamedSource(config).load()


def test_train_list_paths_may_hold_spaces_and_empty_classes_warn(tmp_path, caplog):
  fake_layouts.image_folder(tmp_path / "mine")
  os.rename(tmp_path / "mine/train/cat/000.jpg", tmp_path / "mine/train/cat/my cat 0.jpg")
  (tmp_path / "mine/list.txt").write_text("train/cat/my cat 0.jpg 0\ntrain/dog/000.jpg 1\n")
  listed = file_lists.image_folder(tmp_path / "mine", train_list="list.txt")
  assert listed.train.files[0].endswith("train/cat/my cat 0.jpg")
  assert list(listed.train.labels) == [0, 1]
  for image in (tmp_path / "mine/test/fish").iterdir():
    image.unlink()
  with caplog.at_level("WARNING"):
    file_lists.image_folder(tmp_path / "mine")
  assert "class 'fish' has none" in caplog.text
