"""Cross-fitted soft labels (config.label_issues.cross_fit): each half of the training set is judged
by a run that never saw it."""

import numpy as np
import pytest

import test_all_methods
import tiny_config
from mln_jax import config as config_lib, cross_fit, data, experiment, loop, methods

SHORT = {"num_epochs": 3, "warmup_epochs": 2, "label_issues.gallery_size": 4}


def test_halves_are_disjoint_cover_every_sample_and_follow_the_seed():
  first, second = cross_fit.split_halves(11, seed=3)
  assert (len(first), len(second)) == (5, 6)
  np.testing.assert_array_equal(np.sort(np.concatenate([first, second])), np.arange(11))
  np.testing.assert_array_equal(cross_fit.split_halves(11, seed=3)[0], first)
  assert not np.array_equal(cross_fit.split_halves(11, seed=4)[0], first)


def test_cross_fit_needs_soft_labels_and_data_in_memory():
  config = tiny_config.with_overrides(tiny_config.get_config(), method="cross_entropy")
  with pytest.raises(ValueError, match="soft labels made from"):
    cross_fit.run([config], "/nonexistent")
  # PENCIL's soft labels are a table of its own samples: they cannot judge the other half.
  with pytest.raises(ValueError, match="a table of the samples it trained on"):
    cross_fit.run([tiny_config.with_overrides(tiny_config.get_config(), method="pencil", **{
        "pencil.stage2_epoch": 1, "pencil.stage3_epoch": 2})], "/x")
  every_phase = tiny_config.with_overrides(tiny_config.get_config(), **test_all_methods.SHORT)
  assert [n for n in methods.names()
          if cross_fit.can_cross_fit(methods.with_method(every_phase, n))] == ["metalabelnet"]
  config = tiny_config.with_overrides(tiny_config.get_config(), **{"label_issues.cross_fit": True})
  with pytest.raises(ValueError, match="which none of"):
    experiment.run(tiny_config.with_overrides(config, method="cross_entropy"), "/nonexistent")
  streamed = config_lib.streamed_config()
  streamed.data.name = "clothing1m"
  streamed.data.data_dir = "/data"
  streamed.label_issues.cross_fit = True
  with pytest.raises(ValueError, match="label_issues.cross_fit trains on halves"):
    config_lib.validate_config(streamed)
  with pytest.raises(ValueError, match="seeds drop different labels"):
    config_lib.validate_config(tiny_config.with_overrides(
        config, num_runs=2, **{"data.num_unlabelled": 100}))


def _labels_file(tmp_path, name, labels):
  path = tmp_path / f"{name}.npy"
  np.save(path, labels)
  return str(path)


@pytest.mark.slow
def test_a_half_is_judged_by_the_run_that_never_saw_its_labels(tmp_path, monkeypatch):
  """Changing the labels of half 0 changes half 0's in-sample soft labels, but not its
  cross-fitted ones (the half-1 run never saw them), while half 1's cross-fitted ones change."""
  base = tiny_config.get_config()
  images = data.load_digits_dataset(base.data.num_heldout, base.data.split_seed)
  rng = np.random.default_rng(0)
  num_train = len(images.train_labels)
  noisy = np.where(rng.random(num_train) < 0.4, rng.integers(0, 10, num_train),
                   images.train_labels)
  half0, half1 = cross_fit.split_halves(num_train, base.seed)
  changed = noisy.copy()
  changed[half0] = rng.integers(0, 10, len(half0))
  exports, reports = {}, {}
  for name, labels in (("a", noisy), ("b", changed)):
    config = tiny_config.with_overrides(tiny_config.get_config(), **SHORT, **{
        "noise.kind": "given", "noise.labels_path": _labels_file(tmp_path, name, labels)})
    methods.get(config)
    workdir = tmp_path / name
    reports[name] = cross_fit.run([config], str(workdir))[0]
    with np.load(workdir / "cross_fit/soft_labels.npz") as fitted, \
        np.load(workdir / "cross_fit/half_0/soft_labels.npz") as in_sample:
      exports[name] = fitted["soft_label"], in_sample["soft_label"]
    assert (workdir / "cross_fit/label_issues.csv").exists()
    assert (workdir / "cross_fit/figures/label_issues.png").exists()
  (fitted_a, in_sample_a), (fitted_b, in_sample_b) = exports["a"], exports["b"]
  np.testing.assert_array_equal(fitted_a[half0], fitted_b[half0])
  assert not np.allclose(fitted_a[half1], fitted_b[half1])
  assert not np.allclose(in_sample_a, in_sample_b)  # the half-0 run's own view of half 0
  np.testing.assert_allclose(fitted_a.sum(1), 1, atol=1e-4)
  report = reports["a"]["label_issues"]
  assert report["labelled"] == num_train and report["wrong_labels"] == int(
      np.sum(noisy != images.train_labels))
  assert 0 <= reports["a"]["gallery_precision"] <= 1
  # Finished: the saved reports come back without training.
  monkeypatch.setattr(loop, "train_and_evaluate", lambda *args: pytest.fail("trained again"))
  again = tiny_config.with_overrides(tiny_config.get_config(), **SHORT, **{
      "noise.kind": "given", "noise.labels_path": str(tmp_path / "a.npy")})
  assert cross_fit.run([again], str(tmp_path / "a")) == [reports["a"]]
