"""The training loop end to end: CLI, results, resume after a kill, and every bad-input error."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mln_jax import config as config_lib, data as data_lib, experiment, in_memory, methods
from mln_jax import runtime, trained
from mln_jax.dataset import Dataset, Split
from mln_jax.train_state import state_from_config

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import tiny_config  # noqa: E402


def tiny(**overrides):
  return tiny_config.with_overrides(tiny_config.get_config(), **overrides)


def parse_command_line(*args):
  """The config `python -m mln_jax.main --config=tests/tiny_config.py ARGS` runs, parsed in process
  by the same flag definition as mln_jax.main."""
  argv = ["main", f"--config={TESTS / 'tiny_config.py'}", *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.slow
def test_cli_runs_both_methods_and_writes_results(tmp_path):
  workdir = tmp_path / "run"
  completed = subprocess.run(
      [sys.executable, "-m", "mln_jax.main", f"--config={TESTS / 'tiny_config.py'}",
       f"--workdir={workdir}", "--config.method=both", "--config.num_epochs=3",
       "--config.warmup_epochs=1"],
      capture_output=True, text=True, cwd=TESTS.parent, timeout=600,
      env={**os.environ, "XLA_FLAGS": ""})
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert "cross_entropy" in completed.stdout and "metalabelnet" in completed.stdout
  assert "img/s" in completed.stderr  # the per-epoch progress line
  comparison = json.loads((workdir / "comparison.json").read_text())
  assert comparison["seeds"] == [0]
  assert 0.0 <= comparison["realised_noise_rate"][0] <= 0.41
  for method in ("cross_entropy", "metalabelnet"):
    results = json.loads((workdir / method / "results.json").read_text())
    assert results["method"] == method
    assert [h["epoch"] for h in results["history"]] == [1, 2, 3]  # counted from 1, as the log
    assert results["last"]["test_accuracy"] == results["history"][-1]["test_accuracy"]
    assert comparison[method]["best_test_accuracy"] == [results["best"]["test_accuracy"]]
    assert results["device"] and results["wall_time_s"] > 0
    assert results["matmul_precision"] == "default"
    if importlib.util.find_spec("tensorflow"):  # clu's TensorBoard writer needs it
      assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / method))
    saved_config = json.loads((workdir / method / "config.json").read_text())
    assert saved_config["num_epochs"] == 3
  mln = json.loads((workdir / "metalabelnet" / "results.json").read_text())
  assert [h["phase"] for h in mln["history"]] == ["warm-up", "metalabelnet", "metalabelnet"]
  assert mln["best"]["epoch"] >= 2  # model selection over phase-2 epochs only
  assert "train/meta_loss" in mln["history"][-1]


def test_a_finished_workdir_returns_its_results_and_refuses_another_config(finished_digits_run):
  finished = tiny(method="cross_entropy", num_epochs=1)
  again = experiment.run(finished, str(finished_digits_run))  # nothing left to train
  assert again["cross_entropy"][0] == json.loads(
      (finished_digits_run / "results.json").read_text())
  with pytest.raises(ValueError, match="different config .*noise"):
    experiment.run(tiny_config.with_overrides(finished, **{"noise.rate": 0.2}),
                   str(finished_digits_run))
  # A cross-entropy run gives no soft labels (instead of an untrained MetaLabelNet's).
  state, run_config = trained.load_trained_state(str(finished_digits_run))
  with pytest.raises(ValueError, match="A cross_entropy run has no soft labels"):
    trained.soft_labels_for(state, np.zeros((4, 8, 8, 1), np.uint8), run_config)


@pytest.mark.slow
def test_metalabelnet_learns_on_digits_and_exports_soft_labels(tmp_path):
  results = experiment.run(tiny(), str(tmp_path))["metalabelnet"][0]
  assert results["last"]["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
  assert results["reference_batch_norm"] is False  # one BatchNorm update per step by default
  labels = np.load(tmp_path / "labels.npz")
  assert np.mean(labels["noisy"] != labels["clean"]) == pytest.approx(
      results["noise"]["realised_rate"])
  # Soft-label statistics per phase-2 epoch; their change is defined from the second one on.
  phase2 = [h for h in results["history"] if h["phase"] == "metalabelnet"]
  assert all(0 <= h["soft_labels/clean_agreement"] <= 1 for h in phase2)
  assert "soft_labels/changed_fraction" not in phase2[0]
  assert 0 <= phase2[1]["soft_labels/changed_fraction"] <= 1
  # The export: one row per training sample, scores consistent with the soft labels.
  export = np.load(tmp_path / "soft_labels.npz")
  assert export["soft_label"].shape == (1497, 10)
  np.testing.assert_array_equal(export["given_label"], labels["noisy"])
  np.testing.assert_allclose(export["label_issue_score"], 1 - export["soft_label"][
      np.arange(1497), export["given_label"]], rtol=1e-6)
  issues = results["label_issues"]
  assert issues["wrong_labels"] == int(np.sum(labels["noisy"] != labels["clean"]))
  assert 0 <= issues["top_k_precision"] <= 1
  # A trained run gives soft labels for any images through the library API.
  state, run_config = trained.load_trained_state(str(tmp_path))
  dataset = data_lib.load_dataset(tiny().data)
  np.testing.assert_allclose(trained.soft_labels_for(state, dataset.train_images[:50], run_config),
                             export["soft_label"][:50], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, monkeypatch):
  config = tiny()
  uninterrupted = experiment.train_and_evaluate(config, str(tmp_path / "a"))

  tiny_config.run_killed(
      monkeypatch, lambda: experiment.train_and_evaluate(config, str(tmp_path / "b")), epoch=3)
  assert not (tmp_path / "b" / "results.json").exists()
  resumed = experiment.train_and_evaluate(config, str(tmp_path / "b"))

  strip = lambda history: [{k: v for k, v in h.items() if not k.endswith("_s")} for h in history]
  assert strip(resumed["history"]) == strip(uninterrupted["history"])
  assert resumed["best"] == uninterrupted["best"]
  restore = lambda d: ocp.CheckpointManager(os.path.abspath(d / "checkpoints")).restore(
      None, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  final_a, final_b = restore(tmp_path / "a"), restore(tmp_path / "b")
  assert len(jax.tree.leaves(final_a)) > 10
  for a, b in zip(jax.tree.leaves(final_a), jax.tree.leaves(final_b)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_bfloat16_run_learns(tmp_path):
  results = experiment.train_and_evaluate(tiny(compute_dtype="bfloat16"), str(tmp_path))
  assert results["compute_dtype"] == "bfloat16"
  assert results["last"]["test_accuracy"] > 0.5


@pytest.mark.slow
def test_clean_model_probabilities_are_cross_fitted_and_informative():
  config = tiny(**{"noise.kind": "feature_dependent", "noise.probabilities": "clean_model",
                   "noise.teacher_epochs": 3})
  dataset = data_lib.load_dataset(config.data)
  probabilities = in_memory.noise_probabilities(config, dataset)
  assert probabilities.shape == (len(dataset.train_labels), 10)
  np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-5)
  # Held-out predictions of a CNN on digits are far better than chance, but not memorised.
  held_out_accuracy = np.mean(probabilities.argmax(1) == dataset.train_labels)
  assert 0.5 < held_out_accuracy < 1.0


# --- Bad input: each stops with a message naming the problem and the fix; no results are written.

def test_unknown_config_key_is_rejected(tmp_path):
  config = tiny()
  config.unlock()
  config.data.num_metas = 10
  with pytest.raises(ValueError, match="Unknown config key 'data.num_metas'"):
    experiment.run(config, str(tmp_path))
  # On the command line, ml_collections names the unknown key and suggests the right one.
  with pytest.raises(AttributeError, match='Did you mean "rate" instead of "rat"'):
    parse_command_line("--config.noise.rat=0.2")


def test_data_dir_is_one_setting_under_two_names(tmp_path):
  config = config_lib.default_config()
  config.data_dir = "/a"
  assert config.data.data_dir == "/a"
  config.data.data_dir = "/b"
  assert config.data_dir == "/b"
  # From the command line the short name reaches the loader.
  config = parse_command_line("--config.data.name=cifar10", "--config.data_dir=/nonexistent/c10")
  assert config.data.data_dir == "/nonexistent/c10"
  with pytest.raises(FileNotFoundError,
                     match="CIFAR-10 pack folder /nonexistent/c10 does not exist"):
    experiment.run(config, str(tmp_path))
  assert not list(tmp_path.rglob("results.json"))


@pytest.mark.parametrize("overrides, error, message", [
    ({"noise.kind": "gaussian"}, ValueError, "noise.kind='gaussian'"),
    ({"noise.rate": 1.5}, ValueError, r"noise.rate=1.5"),
    ({"method": "mixup"}, ValueError, "config.method='mixup'"),
    ({"warmup_epochs": 9}, ValueError, "warmup_epochs=9"),
    ({"warmup_epochs": 4}, ValueError, "warmup_epochs=4"),
    ({"batch_size": 5000}, ValueError, "batch_size=5000 is larger than the data"),
    ({"batch_size": 30}, ValueError, "divisible by the number of devices"),
    ({"model.blocks": ()}, ValueError, "model 'conv_bn' needs its widths"),
    ({"data.name": "cifar10", "data.data_dir": ""}, FileNotFoundError, "data_dir"),
    ({"data.name": "cifar10", "data.data_dir": "/nonexistent/cifar"}, FileNotFoundError,
     "/nonexistent/cifar"),
    ({"noise.kind": "given"}, ValueError, "set --config.noise.labels_path"),
])
def test_bad_config_values_stop_with_a_clear_message(tmp_path, overrides, error, message):
  with pytest.raises(error, match=message):
    experiment.run(tiny(**overrides), str(tmp_path))
  assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("labels, message", [
    (np.zeros(10, np.int64), "10 noisy labels for a training set of 1497 samples"),
    (np.full(1497, 12), "12"),
])
def test_bad_noisy_label_file_is_rejected(tmp_path, labels, message):
  path = tmp_path / "noisy.npy"
  np.save(path, labels)
  config = tiny(**{"noise.kind": "given", "noise.labels_path": str(path)})
  with pytest.raises(ValueError, match=message):
    experiment.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow
def test_given_noisy_labels_are_used(tmp_path):
  dataset = data_lib.load_digits_dataset(300, 0)
  assert len(dataset.train_labels) == 1497
  noisy = (dataset.train_labels + 1) % 10
  noisy[::2] = dataset.train_labels[::2]
  path = tmp_path / "noisy.txt"
  np.savetxt(path, noisy, fmt="%d")
  config = tiny(**{"noise.kind": "given", "noise.labels_path": str(path), "num_epochs": 2,
                   "method": "cross_entropy"})
  results = experiment.run(config, str(tmp_path / "run"))["cross_entropy"][0]
  assert results["noise"]["realised_rate"] == pytest.approx(0.5, abs=1e-3)
  assert results["noise"]["rate"] is None  # noise.rate sets nothing for given labels


@pytest.mark.slow
def test_diverging_loss_stops_without_results(tmp_path, monkeypatch):
  real = in_memory.make_train_epoch

  def diverging(*args, **kwargs):  # a step whose loss went non-finite (validation refuses rates
    epoch = real(*args, **kwargs)  # high enough to make a tiny model diverge for sure)
    return lambda *a: (lambda s, m: (s, {**m, "loss": m["loss"] * np.nan}))(*epoch(*a))
  with monkeypatch.context() as patch:
    patch.setattr(in_memory, "make_train_epoch", diverging)
    with pytest.raises(FloatingPointError, match="Non-finite .* training diverged"):
      experiment.run(tiny(), str(tmp_path))
  assert not (tmp_path / "results.json").exists()
  # Nothing was checkpointed, so the corrected config may rerun in the same workdir.
  experiment.run(tiny(**{"num_epochs": 2, "warmup_epochs": 1}), str(tmp_path))
  assert (tmp_path / "results.json").exists()


def test_config_schema_and_schedule():
  config = config_lib.default_config()
  config_lib.validate_config(config)
  rates = [config_lib.learning_rate_at(config, e) for e in (0, 40, 41, 80, 81, 119)]
  np.testing.assert_allclose(rates, [1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4])


@pytest.mark.slow
@pytest.mark.integration
def test_cifar10_pack_trains_a_few_steps(tmp_path, cifar10_pack):
  config = config_lib.default_config()
  config.data.data_dir = str(cifar10_pack)
  config.num_epochs, config.warmup_epochs = 2, 1
  full = in_memory.prepare_data(config)
  assert full.noise["realised_rate"] == pytest.approx(0.4)
  assert full.train.images.shape == (50000, 32, 32, 3) and len(full.meta.labels) == 5000
  small = Dataset(
      name=full.name, num_classes=10, class_names=full.class_names,
      train=Split(full.train.images[:512], full.train.labels[:512]),
      meta=Split(full.meta.images[:256], full.meta.labels[:256]),
      tests={"test": Split(full.tests["test"].images[:256], full.tests["test"].labels[:256])},
      clean_train_labels=full.clean_train_labels[:512], noise=full.noise)
  results = experiment.train_and_evaluate(config, str(tmp_path), dataset=small)
  assert [h["phase"] for h in results["history"]] == ["warm-up", "metalabelnet"]
  assert all(np.isfinite(h["train/loss"]) for h in results["history"])
  assert 0.0 <= results["last"]["test_accuracy"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("num_runs", [None, 2])
@pytest.mark.parametrize("method_name", ["cross_entropy", "metalabelnet"])
def test_scanned_epoch_equals_host_loop_epoch(method_name, num_runs):
  """The accelerator path (one lax.scan) and the CPU path (a jitted call per step) agree for the
  method's last phase, for one state and for runs trained together (the loop's GPU path is scan
  with runs)."""
  results = {}
  runs = num_runs or 1
  for epoch_loop in ("scan", "host"):
    config = tiny(epoch_loop=epoch_loop, method=method_name)
    phase = methods.get(config).phases[-1]
    dataset = in_memory.prepare_data(config)
    mesh = runtime.make_mesh()
    make_state = lambda key: phase.enter(state_from_config(config, (8, 8, 1), 10, key), True)
    keys = jax.random.split(jax.random.PRNGKey(0), runs)
    state = jax.vmap(make_state)(keys) if num_runs else make_state(keys[0])
    per_run = (lambda x: np.stack([x] * runs)) if num_runs else (lambda x: x)
    # 10 steps: long enough to cover order, keys and state threading, short enough that float
    # rounding (which differs between the two programs) stays small.
    data = (dataset.train.images, per_run(dataset.train.labels))
    if phase.uses_meta:
      data += (per_run(dataset.meta.images), per_run(dataset.meta.labels))
    key = jax.random.split(jax.random.PRNGKey(3), runs) if num_runs else jax.random.PRNGKey(3)
    results[epoch_loop] = in_memory.make_train_epoch(config, mesh, phase, num_runs)(
        state, data, per_run(np.arange(320, dtype=np.int32)), key)
  (scan_state, scan_metrics), (host_state, host_metrics) = results["scan"], results["host"]
  expected_shape = (10, num_runs) if num_runs else (10,)
  assert scan_metrics["loss"].shape == host_metrics["loss"].shape == expected_shape
  np.testing.assert_allclose(scan_metrics["loss"], host_metrics["loss"], rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(scan_state), jax.tree.leaves(host_state)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_concurrent_runs_match_separate_runs(tmp_path):
  """num_runs=2 trains seeds 0 and 1 in one vmapped program; each equals its run trained alone."""
  together = experiment.run(tiny(num_runs=2, num_epochs=3),
                             str(tmp_path / "together"))["metalabelnet"]
  assert [r["seed"] for r in together] == [0, 1]
  assert (tmp_path / "together" / "run_1" / "soft_labels.npz").exists()
  for seed, joint in enumerate(together):
    alone = experiment.run(tiny(seed=seed, num_epochs=3), str(tmp_path / f"alone{seed}"))[
        "metalabelnet"][0]
    assert joint["noise"]["realised_rate"] == alone["noise"]["realised_rate"]
    for a, b in zip(joint["history"], alone["history"]):
      assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-3)
      assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=0.02)
  # The two seeds are different runs, not copies.
  assert together[0]["history"][0]["train/loss"] != together[1]["history"][0]["train/loss"]
  # A run of a group loads on its own.
  state, config = trained.load_trained_state(str(tmp_path / "together" / "run_1"))
  assert config.seed == 1 and state.step.shape == ()


def test_runs_trained_together_may_differ_only_in_seed_and_noise(tmp_path):
  with pytest.raises(ValueError, match=r"run 1 also differs in \['batch_size'\]"):
    experiment.train_and_evaluate_runs([tiny(), tiny(batch_size=64)], str(tmp_path))
