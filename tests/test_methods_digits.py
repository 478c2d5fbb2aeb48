"""The every-method digits record: its summary of a method's runs and its bar chart."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("methods_digits",
                                              ROOT / "experiments" / "methods_digits.py")
methods_digits = importlib.util.module_from_spec(spec)
spec.loader.exec_module(methods_digits)


def fake_runs(best, last, epoch_times=(9.0, 1.0, 2.0, 3.0)):
  return [{"best": {"test_accuracy": b, "epoch": 2}, "last": {"test_accuracy": l},
           "noise": {"realised_rate": 0.4}, "label_issues": {"top_k_precision": 0.8},
           "history": [{"epoch_time_s": t} for t in epoch_times]} for b, l in zip(best, last)]


def test_summary_of_a_methods_runs():
  summary = methods_digits.summarise(fake_runs([0.8, 0.9], [0.7, 0.75]))
  assert summary["best_test_accuracy"] == [0.8, 0.9]
  assert summary["last_test_accuracy"] == [0.7, 0.75]
  # The median leaves the compiling first epoch out.
  assert summary["epochs"] == 4 and summary["seconds_per_epoch"] == pytest.approx(2.5)
  assert summary["label_issues_top_k_precision"] == [0.8, 0.8]


def test_settings_are_the_issues_two_noise_cells():
  config = methods_digits.setting_config("uniform", 0.6, "all", 3)
  assert (config.noise.kind, config.noise.rate, config.num_runs) == ("uniform", 0.6, 3)
  assert config.data.name == "digits" and config.method == "all"
  assert methods_digits.SETTINGS == {"feature_dependent_40": ("feature_dependent", 0.4),
                                     "uniform_60": ("uniform", 0.6)}


def test_bar_chart_is_written(tmp_path):
  table = {setting: {"cross_entropy": methods_digits.summarise(fake_runs([0.8, 0.82], [0.7, 0.7])),
                     "sce": methods_digits.summarise(fake_runs([0.85, 0.86], [0.8, 0.8]))}
           for setting in methods_digits.SETTINGS}
  methods_digits.bar_chart(table, ["cross_entropy", "sce"], tmp_path / "chart.png")
  assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
