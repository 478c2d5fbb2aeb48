"""The Table I runner: one command per cell, and a report assembled from results files."""

import importlib.util
import json
import pathlib

import pytest

from mln_jax import methods
from mln_jax.config import default_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("table1", ROOT / "experiments" / "table1.py")
table1 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table1)


def test_plan_has_one_command_per_cell():
  commands = table1.plan(seeds=3)
  # Table I's twelve rows × 8 noise cells, each with the paper's number to stand beside.
  assert len(commands) == 96 and len(set(commands)) == 96
  assert all(len(table1.paper_row(m)[kind]) == 4 for m in methods.resolve("table1")
             for kind in table1.KINDS)
  assert table1.paper_row("sce_reference") == table1.paper_row("sce")
  assert table1.paper_row("sce")["feature_dependent"][2:] == ["fail", "fail"]
  assert len(table1.plan(seeds=1, method_spec="references")) == 8 * len(methods.VARIANTS)
  assert ("bash experiments/gpu/run.sh metalabelnet_feature_dependent_40 configs/cifar10.py "
          "--config.method=metalabelnet --config.noise.kind=feature_dependent "
          "--config.noise.rate=0.4 --config.num_runs=3" in commands)
  # Every registered method, each on the paper's protocol with its name as config.method.
  assert all("--config.method=cross_entropy " in c for c in commands if "cross_entropy_" in c)
  local = table1.plan(seeds=2, local="/tmp/t1", data_dir="/data/c10")
  assert local[0] == ("python -m mln_jax.main --config=configs/cifar10.py "
                      "--workdir=/tmp/t1/cross_entropy_uniform_20 --config.data_dir=/data/c10 "
                      "--config.method=cross_entropy --config.noise.kind=uniform "
                      "--config.noise.rate=0.2 --config.num_runs=2")


def fake_history(method, last, num_epochs=6, warmup_epochs=2):
  """Per-epoch records as a run writes them: test accuracy rising to `last`, soft-label statistics
  in MetaLabelNet's phase 2."""
  history = []
  for epoch in range(1, num_epochs + 1):
    phase2 = method == "metalabelnet" and epoch > warmup_epochs
    record = {"epoch": epoch, "test_accuracy": last * epoch / num_epochs,
              "phase": "metalabelnet" if phase2 else
                       ("warm-up" if method == "metalabelnet" else "cross-entropy")}
    if phase2:
      record.update({"soft_labels/clean_agreement": 0.9, "soft_labels/given_agreement": 0.7})
      if epoch > warmup_epochs + 1:
        record["soft_labels/changed_fraction"] = 0.1 / epoch
    history.append(record)
  return history


def _fake_result(folder, method, kind, rate, seed, best, last, **config_changes):
  """A finished run's results.json and config.json (the paper's protocol unless changed)."""
  folder.mkdir(parents=True)
  config = default_config()
  config.update(method=method, seed=seed, data_dir="/data/c10", **config_changes)
  config.noise.update(kind=kind, rate=rate)
  (folder / "config.json").write_text(config.to_json_best_effort())
  (folder / "results.json").write_text(json.dumps({
      "method": method, "seed": seed, "noise": {"kind": kind, "rate": rate, "realised_rate": rate},
      "best": {"test_accuracy": best}, "last": {"test_accuracy": last}, "wall_time_s": 60.0,
      "history": fake_history(method, last),
      "device": "TEST GPU x1", "jax_version": "0", "commit": "abc1234"}))


def test_assemble_averages_seeds_and_marks_missing_cells(tmp_path):
  runs = tmp_path / "runs"
  _fake_result(runs / "a" / "run_0", "metalabelnet", "feature_dependent", 0.4, 0, 0.80, 0.79)
  _fake_result(runs / "a" / "run_1", "metalabelnet", "feature_dependent", 0.4, 1, 0.82, 0.81)
  path = table1.assemble([runs], "test", out=tmp_path / "out")
  text = path.read_text()
  assert "81.00±1.41 / 80.00±1.41 (80.42±0.51); n=2, realised 0.400" in text
  assert "not run (82.55±0.80)" in text  # cross-entropy uniform 20% was not run
  saved = json.loads((tmp_path / "out" / "table1.json").read_text())
  assert saved["metalabelnet_feature_dependent_40"]["seeds"] == [0, 1]
  # Figures only for the noise settings that were run.
  assert sorted(p.name for p in (tmp_path / "out" / "table1_figures").iterdir()) == [
      "feature_dependent_40_accuracy.png", "feature_dependent_40_soft_labels.png"]


def test_assemble_leaves_out_runs_of_another_protocol(tmp_path, capsys):
  runs = tmp_path / "runs"
  _fake_result(runs / "paper", "metalabelnet", "uniform", 0.2, 0, 0.83, 0.83)
  _fake_result(runs / "short", "metalabelnet", "uniform", 0.2, 1, 0.99, 0.99, num_epochs=16)
  text = table1.assemble([runs], "test", out=tmp_path / "out").read_text()
  assert "83.00 / 83.00 (83.35±0.17); n=1" in text
  assert "differs in num_epochs" in capsys.readouterr().err
  (runs / "paper" / "results.json").unlink()
  with pytest.raises(FileNotFoundError, match="No Table I run"):
    table1.assemble([runs], "test", out=tmp_path / "out2")


def test_record_writes_a_report_with_figures(tmp_path, monkeypatch):
  spec = importlib.util.spec_from_file_location("record", ROOT / "experiments" / "record.py")
  record = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(record)
  monkeypatch.setattr(record, "RESULTS", tmp_path / "results")
  for method, accuracy in (("cross_entropy", 0.64), ("metalabelnet", 0.66)):
    folder = tmp_path / "run" / method
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "method": method, "dataset": "cifar10", "seed": 0,
        "noise": {"kind": "feature_dependent", "rate": 0.4, "realised_rate": 0.4},
        "best": {"test_accuracy": accuracy, "epoch": 6}, "last": {"test_accuracy": accuracy},
        "history": fake_history(method, accuracy), "epochs_time_s": 10.0, "wall_time_s": 12.0,
        "label_issues": None, "device": "cpu x1", "jax_version": "0", "commit": "abc1234"}))
  path = record.record([tmp_path / "run"], "c10", "python -m mln_jax.main ...", "", figures=True)
  text = path.read_text()
  assert "| metalabelnet | 0.4000 | 66.00 | 6 | 66.00 |" in text
  assert "- noise: feature_dependent 0.4" in text
  assert sorted(p.name for p in (tmp_path / "results" / "c10_figures").iterdir()) == [
      "c10_accuracy.png", "c10_soft_labels.png"]
