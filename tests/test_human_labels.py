"""Real human noise (CIFAR-10N / CIFAR-100N): the label files in the formats their authors
distribute, the guard against a file in another order than the images, the realised noise in
results.json, and a run through the CLI. The files are fabricated in exactly those formats."""

import json
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest

from mln_jax import data, human_labels, in_memory

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import tiny_config  # noqa: E402

CIFAR10N_KEYS = ("aggre_label", "worse_label", "random_label1", "random_label2", "random_label3")


def fabricated_cifar10n(clean: np.ndarray, seed: int = 0, wrong: dict[str, int] | None = None
                        ) -> dict[str, np.ndarray]:
  """CIFAR-10N's dict: clean_label and five label sets, each with exactly `wrong[key]` labels
  changed (to the next class), at random positions."""
  rng = np.random.default_rng(seed)
  wrong = wrong or {"aggre_label": 90, "worse_label": 402, "random_label1": 170,
                    "random_label2": 175, "random_label3": 180}
  sets = {"clean_label": clean.astype(np.int64)}
  for key in CIFAR10N_KEYS:
    labels = clean.astype(np.int64).copy()
    flipped = rng.choice(len(clean), wrong[key], replace=False)
    labels[flipped] = (labels[flipped] + 1) % 10
    sets[key] = labels
  return sets


@pytest.fixture(scope="module")
def clean():
  return np.random.default_rng(7).integers(0, 10, 1000).astype(np.int32)


def save_all_formats(folder: pathlib.Path, sets: dict[str, np.ndarray]) -> list[pathlib.Path]:
  """The file as CIFAR-N distributes it (torch.save, zip format; and the legacy format) and its
  .npz / .npy exports."""
  torch = pytest.importorskip("torch")
  files = [folder / "CIFAR-10_human.pt", folder / "legacy.pt", folder / "export.npz",
           folder / "export.npy"]
  torch.save(sets, files[0])
  torch.save(sets, files[1], _use_new_zipfile_serialization=False)
  np.savez(files[2], **sets)
  np.save(files[3], sets)
  return files


def test_every_format_gives_the_labels_without_torch(tmp_path, clean, monkeypatch):
  sets = fabricated_cifar10n(clean)
  files = save_all_formats(tmp_path, sets)
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
  for file in files:
    for human_label, key in (("worse", "worse_label"), ("aggre", "aggre_label"),
                             ("random2", "random_label2")):
      given = human_labels.load(human_label, str(file), clean, 10)
      assert given.dtype == np.int32
      np.testing.assert_array_equal(given, sets[key], err_msg=f"{file.name} {human_label}")


def test_a_file_of_torch_tensors_is_read_by_torch(tmp_path, clean, monkeypatch):
  torch = pytest.importorskip("torch")
  sets = fabricated_cifar10n(clean)
  path = tmp_path / "tensors.pt"
  torch.save({k: torch.from_numpy(v) for k, v in sets.items()}, path)
  np.testing.assert_array_equal(human_labels.load("worse", str(path), clean, 10),
                                sets["worse_label"])
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ValueError, match="holds torch objects.*needs torch"):
    human_labels.load("worse", str(path), clean, 10)


def test_a_pickle_that_would_build_other_objects_is_refused(tmp_path, clean):
  class Payload:
    def __reduce__(self):
      return (print, ("this must not run",))
  path = tmp_path / "evil.pt"
  with open(path, "wb") as f:  # the legacy torch.save layout, with a payload as the object
    for part in (0x1950a86a20f9469cfc6c, 1001, {}, {"clean_label": Payload()}):
      pickle.dump(part, f, protocol=2)
  with pytest.raises(ValueError,
                     match=r"evil.pt: the file would build a (__builtin__|builtins)\.print"):
    human_labels.load("worse", str(path), clean, 10)


def test_a_file_in_another_order_is_refused_naming_the_cause(tmp_path, clean):
  sets = fabricated_cifar10n(clean)
  order = np.random.default_rng(1).permutation(len(clean))
  shuffled = {key: values[order] for key, values in sets.items()}
  path = tmp_path / "shuffled.npz"
  np.savez(path, **shuffled)
  with pytest.raises(ValueError, match=r"differs from the dataset's clean training labels at "
                     r"\d+ of 1000 positions.*different orders"):
    human_labels.load("worse", str(path), clean, 10)
  # One image's label off: another dataset (or a damaged file), not another order.
  damaged = dict(sets, clean_label=sets["clean_label"].copy())
  damaged["clean_label"][5] = (damaged["clean_label"][5] + 1) % 10
  np.savez(path, **damaged)
  with pytest.raises(ValueError, match=r"at 1 of 1000 positions \(first at index 5.*another "
                     "dataset"):
    human_labels.load("worse", str(path), clean, 10)


@pytest.mark.parametrize("sets, message", [
    ({"worse_label": np.zeros(1000, int)}, "no 'clean_label'.*order cannot be checked"),
    ({"clean_label": None, "noisy_label": np.zeros(1000, int)},
     "no 'worse_label'.*CIFAR-100N file: use --config.noise.human_label=noisy"),
    ({"clean_label": np.zeros(999, int), "worse_label": np.zeros(999, int)},
     "999 labels for 1000 training samples"),
    ({"clean_label": None, "worse_label": np.full(1000, 10)},
     r"worse_label\[0\] = 10 lies outside"),
    ({"clean_label": None, "worse_label": np.zeros((1000, 2), int)}, "must be a 1-D integer"),
])
def test_bad_label_files_are_named(tmp_path, clean, sets, message):
  sets = {k: clean if v is None else v for k, v in sets.items()}
  path = tmp_path / "labels.npz"
  np.savez(path, **sets)
  with pytest.raises(ValueError, match=message):
    human_labels.load("worse", str(path), clean, 10)


def test_other_files_and_paths_are_named(tmp_path, clean):
  np.save(tmp_path / "bare.npy", clean)
  with pytest.raises(ValueError, match="not the dict of label sets.*noise.kind=given"):
    human_labels.load("worse", str(tmp_path / "bare.npy"), clean, 10)
  (tmp_path / "truncated.pt").write_bytes(b"PK\x03\x04garbage")
  with pytest.raises(ValueError, match="truncated.pt is damaged|not a file torch.save wrote"):
    human_labels.load("worse", str(tmp_path / "truncated.pt"), clean, 10)
  with pytest.raises(IsADirectoryError, match="is a folder"):
    human_labels.load("worse", str(tmp_path), clean, 10)
  with pytest.raises(FileNotFoundError, match="UCSC-REAL/cifar-10-100n"):
    human_labels.load("worse", str(tmp_path / "missing.pt"), clean, 10)
  with pytest.raises(ValueError, match="needs its labels"):
    human_labels.load("worse", "", clean, 10)


def test_cifar100n_noisy_labels(tmp_path):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(3)
  clean = rng.integers(0, 100, 500).astype(np.int32)
  noisy = np.where(rng.random(500) < 0.4, rng.integers(0, 100, 500), clean)
  path = tmp_path / "CIFAR-100_human.pt"
  torch.save({"clean_label": clean.astype(np.int64), "noisy_label": noisy,
              "clean_coarse_label": clean // 5, "noisy_coarse_label": noisy // 5}, path)
  np.testing.assert_array_equal(human_labels.load("noisy", str(path), clean, 100), noisy)
  with pytest.raises(ValueError, match="no 'worse_label'"):
    human_labels.load("worse", str(path), clean, 100)


def digits_human(path, human_label="worse", **overrides):
  return tiny_config.with_overrides(tiny_config.get_config(), **{
      "noise.kind": "human", "noise.labels_path": str(path), "noise.human_label": human_label,
      **overrides})


@pytest.fixture(scope="module")
def digits():
  return data.load_digits_dataset(num_heldout=300, seed=0)


def test_realised_rate_and_transition_matrix_are_exact(tmp_path, digits):
  clean = digits.train_labels
  wrong = {"aggre_label": 135, "worse_label": 602, "random_label1": 255, "random_label2": 262,
           "random_label3": 270}
  sets = fabricated_cifar10n(clean, wrong=wrong)
  path = tmp_path / "digits_human.npz"
  np.savez(path, **sets)
  for human_label, key in (("worse", "worse_label"), ("aggre", "aggre_label"),
                           ("random3", "random_label3")):
    dataset = in_memory.prepare_data(digits_human(path, human_label), digits)
    np.testing.assert_array_equal(dataset.train.labels, sets[key])
    noise = dataset.noise
    assert noise["kind"] == "human" and noise["human_label"] == human_label
    assert noise["labels_from"] == str(path) and noise["rate"] is None
    assert noise["realised_rate"] == wrong[key] / len(clean)
    counts = np.asarray(noise["transition_counts"])
    expected = np.zeros((10, 10), int)
    np.add.at(expected, (clean, sets[key]), 1)
    np.testing.assert_array_equal(counts, expected)
    assert np.trace(counts) == len(clean) - wrong[key]
    np.testing.assert_allclose(np.asarray(noise["transition_matrix"]).sum(1), 1.0, atol=1e-5)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "mln_jax.main",
                         f"--config={TESTS / 'tiny_config.py'}", *args],
                        capture_output=True, text=True, cwd=TESTS.parent, timeout=600)


@pytest.mark.slow
def test_cli_run_on_human_labels_and_the_guard(tmp_path, digits):
  torch = pytest.importorskip("torch")
  sets = fabricated_cifar10n(digits.train_labels, wrong={
      "aggre_label": 135, "worse_label": 602, "random_label1": 255, "random_label2": 262,
      "random_label3": 270})
  good = tmp_path / "CIFAR-10_human.pt"
  torch.save(sets, good)
  order = np.random.default_rng(0).permutation(len(digits.train_labels))
  shuffled = tmp_path / "shuffled.pt"
  torch.save({k: v[order] for k, v in sets.items()}, shuffled)
  common = ["--config.noise.kind=human", "--config.noise.human_label=worse",
            "--config.report=True"]

  refused = _cli(f"--workdir={tmp_path / 'refused'}", f"--config.noise.labels_path={shuffled}",
                 *common)
  assert refused.returncode == 2, refused.stderr[-2000:]
  assert "error:" in refused.stderr and "different orders" in refused.stderr
  assert "Traceback" not in refused.stderr
  assert not (tmp_path / "refused" / "checkpoints").exists()  # stopped before training

  run = _cli(f"--workdir={tmp_path / 'run'}", f"--config.noise.labels_path={good}", *common)
  assert run.returncode == 0, run.stderr[-3000:]
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  assert results["noise"]["kind"] == "human" and results["noise"]["human_label"] == "worse"
  assert results["noise"]["realised_rate"] == 602 / len(digits.train_labels)
  assert np.trace(results["noise"]["transition_counts"]) == len(digits.train_labels) - 602
  assert (tmp_path / "run" / "figures" / "noise_transition.png").stat().st_size > 1000
  summary = (tmp_path / "run" / "summary.md").read_text()
  assert "human (worse labels from" in summary and "noise_transition.png" in summary


@pytest.mark.parametrize("overrides, message", [
    ({"noise.kind": "human"}, "needs the annotators' labels.*data.source=tfds"),
    ({"noise.human_label": "worst"}, r"human_label='worst': choose one of \('aggre'"),
    ({"noise.flip_groups": "blocks"}, "flip_groups='blocks'"),
    ({"data.name": "cifar100", "data.source": "pack"}, r"cifar100 reads from one of \('python', "
     "'tfds'\\)"),
])
def test_config_checks_of_the_new_data_and_noise_keys(overrides, message):
  from mln_jax import config as config_lib
  config = tiny_config.with_overrides(tiny_config.get_config(), **overrides)
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(config)
  # tfds's cifar10_n instead of a file is accepted.
  config_lib.validate_config(tiny_config.with_overrides(tiny_config.get_config(), **{
      "noise.kind": "human", "data.name": "cifar10", "data.source": "tfds"}))
