"""experiments/record.py: the record of finished workdirs, streamed runs and cross-fits included."""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("record", ROOT / "experiments" / "record.py")
record = importlib.util.module_from_spec(spec)
spec.loader.exec_module(record)


def _results(method, test_accuracy, noise, label_issues=None):
  best = {"epoch": 3, "meta_accuracy": 0.9, "test_accuracy": test_accuracy}
  return {"method": method, "dataset": "d", "noise": noise, "best": best, "last": best,
          "label_issues": label_issues, "epochs_time_s": 1.0, "wall_time_s": 2.0,
          "device": "cpu x1", "jax_version": "0", "commit": "abc", "history": []}


def _write(folder, results):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "results.json").write_text(json.dumps(results))


def test_a_streamed_run_without_clean_labels_is_recorded(tmp_path, monkeypatch):
  monkeypatch.setattr(record, "RESULTS", tmp_path / "results")
  # As a streamed dataset's noise reads: no synthetic rate, no realised rate.
  _write(tmp_path / "w", _results("metalabelnet", 0.7, {"kind": "real", "realised_rate": None,
                                                        "measured_on": 0}))
  text = record.record([tmp_path / "w"], "streamed", "cmd", "").read_text()
  assert "- noise: real\n" in text and "| metalabelnet | — | 70.00 |" in text


def test_cross_fits_are_compared_with_their_runs_and_their_halves_are_not_runs(tmp_path,
                                                                             monkeypatch):
  monkeypatch.setattr(record, "RESULTS", tmp_path / "results")
  noise = {"kind": "uniform", "rate": 0.4, "realised_rate": 0.4, "measured_on": 10}
  workdir = tmp_path / "w"
  for index, precision in enumerate((0.8, 0.6)):
    run = workdir / f"run_{index}"
    _write(run, _results("metalabelnet", 0.9, noise, {"labelled": 10, "wrong_labels": 4,
                                                       "top_k_precision": precision,
                                                       "argmax_precision": 0.5,
                                                       "argmax_recall": 0.5}))
    fitted = workdir / "cross_fit" / f"run_{index}"
    fitted.mkdir(parents=True)
    (fitted / "label_issues.json").write_text(json.dumps({
        "method": "metalabelnet", "label_issues": {"top_k_precision": precision / 2},
        "gallery_precision": 0.25}))
    for half, half_precision in enumerate((0.5, 0.7)):  # each half's run on its own samples
      _write(workdir / "cross_fit" / f"half_{half}" / f"run_{index}",
             _results("metalabelnet", 0.1, noise, {"top_k_precision": half_precision}))
  assert sorted(record.load_runs(workdir)) == [str(workdir / "run_0"), str(workdir / "run_1")]
  text = record.record([workdir], "fitted", "cmd", "").read_text()
  assert (f"| {workdir / 'cross_fit' / 'run_1'} | metalabelnet | 30.00 | 60.00 | 60.00 ± 14.14 "
          "| 25.00 |") in text
  assert "10.00" not in text  # the half run's accuracy is nobody's result
