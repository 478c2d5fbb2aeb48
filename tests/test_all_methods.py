"""Every registered method through the one loop, on both data paths: a tiny run of each trains,
evaluates, exports and reports (the per-method files test the methods' own mathematics)."""

import numpy as np
import pytest

import tiny_config
from mln_jax import experiment, methods

# Each method's epoch settings shrunk so that every phase of it runs in a few epochs: the
# two-training methods train 1 + 2 epochs, the others 2 (label learning or meta phase second).
SHORT = {"num_epochs": 2, "warmup_epochs": 1, "forward.estimator_epochs": 1,
         "joint_optimization.step1_epochs": 1, "joint_optimization.label_start_epoch": 1,
         "joint_optimization.window": 2, "pencil.stage2_epoch": 1, "pencil.stage3_epoch": 2,
         "coteaching.num_gradual": 2, "mlnt.feature_epochs": 1, "mlnt.start_step": 2,
         "mlnt.ramp_end_step": 4, "mlnt.num_synthetic": 2, "mlnt.neighbours": 3,
         "report": True}
# What each method writes beside results.json besides the common files: name -> shape.
PER_SAMPLE = ("num_train",)
EXPORTS = {"coteaching": {"selected_by_net1.npy": PER_SAMPLE, "selected_by_net2.npy": PER_SAMPLE},
           "mwnet": {"sample_weights.npy": PER_SAMPLE},
           "l2rw": {"sample_weights.npy": PER_SAMPLE, "meta_alignment.npy": PER_SAMPLE},
           "forward": {"noise_matrix.npy": ("num_classes", "num_classes")}}
EXPORTS["coteaching_reference"] = EXPORTS["coteaching"]
EXPORTS["forward_oracle"] = EXPORTS["forward_reference"] = EXPORTS["forward"]


def check_run(results, run_dir, config):
  """What every finished run of `config` must show, whatever its method."""
  method = methods.get(config)
  epochs = method.total_epochs(config)
  assert results["method"] == method.name and len(results["history"]) == epochs
  assert [h["phase"] for h in results["history"]] == [
      method.phase_at(e).name for e in range(epochs)]
  assert results["best"]["epoch"] in [e + 1 for e in range(epochs)
                                      if method.phase_at(e).selects_best]
  for record in results["history"]:
    assert np.isfinite(record["train/loss"]) and 0 <= record["test_accuracy"] <= 1
    if method.models:
      assert record["model"] in dict(method.models)
      assert record["test_accuracy"] == record[f"{record['model']}/test_accuracy"]
  final = method.phase_at(epochs - 1)
  if final.soft_labels is not None:
    soft = np.load(run_dir / "soft_labels.npz")["soft_label"]
    assert soft.shape[0] == results["num_train"] and np.allclose(soft.sum(1), 1, atol=1e-4)
  for name, shape in EXPORTS.get(method.name, {}).items():
    exported = np.load(run_dir / name)
    assert exported.shape == tuple(results[n] for n in shape) and np.all(np.isfinite(exported))
  has_report = final.soft_labels is not None or method.label_issue_scores is not None
  # The files mln_jax.report writes into every finished run's folder.
  written = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")
             if p.suffix in (".png", ".csv", ".md")}
  expected = {"figures/accuracy.png", "summary.md"}
  if has_report:
    expected |= {"label_issues.csv", "figures/label_issues.png"}
  if final.soft_labels is not None:
    expected |= {"figures/confusion.png"}
  assert expected <= written, f"{method.name}: missing {expected - written}"
  if not has_report:
    assert "label_issues.csv" not in written
  return has_report


@pytest.mark.slow
@pytest.mark.parametrize("name", methods.names())
def test_every_method_in_memory(tmp_path, name):
  config = tiny_config.with_overrides(tiny_config.get_config(), **SHORT, method=name, num_runs=2)
  runs = experiment.run(config, str(tmp_path))[name]
  for index, results in enumerate(runs):
    has_report = check_run(results, tmp_path / f"run_{index}", methods.with_method(config, name))
    # Synthetic noise: every label's truth is known, so a method that flags samples is scored.
    assert (results["label_issues"] is not None) == has_report
    if has_report:
      assert 0 <= results["label_issues"]["top_k_precision"] <= 1
  assert runs[0]["seed"] != runs[1]["seed"]
  for file, shape in EXPORTS.get(name, {}).items():  # each run's own samples, not copies
    if shape != PER_SAMPLE:
      continue  # e.g. the true T of uniform noise, the same for every seed by construction
    assert not np.array_equal(*(np.load(tmp_path / f"run_{i}" / file) for i in (0, 1)))


@pytest.mark.slow
@pytest.mark.parametrize("name", methods.resolve("all"))
def test_every_method_streamed(tmp_path_factory, name):
  pytest.importorskip("tensorflow")
  import fake_layouts
  import test_streamed
  root = tmp_path_factory.mktemp("clothing1m")
  fake_layouts.clothing1m(root)
  config = test_streamed.tiny_streamed("clothing1m", root, **SHORT, method=name)
  workdir = tmp_path_factory.mktemp("run")
  results = experiment.train_and_evaluate(config, str(workdir))
  check_run(results, workdir, config)
