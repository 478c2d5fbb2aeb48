"""What a finished run writes about itself (mln_jax.report): figures, label_issues.csv, the gallery
of flagged images and summary.md, on both data paths; the command that redoes them; and that the
export goes straight into cleanlab."""

import csv
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import fake_layouts
import tiny_config
from mln_jax import experiment, report

REPORT_FILES = ("figures/accuracy.png", "figures/soft_labels.png", "figures/confusion.png",
                "figures/label_issues.png", "label_issues.csv", "summary.md")


@pytest.fixture(scope="module")
def mln_run(tmp_path_factory):
  """A finished tiny in-memory MetaLabelNet run (digits, 40% uniform noise) and its results."""
  workdir = tmp_path_factory.mktemp("mln")
  config = tiny_config.with_overrides(tiny_config.get_config(), report=True)
  results = experiment.train_and_evaluate(config, str(workdir))
  return workdir, results


def read_rows(path):
  with open(path, newline="") as file:
    return list(csv.DictReader(file))


def test_a_finished_in_memory_run_writes_every_file(mln_run):
  workdir, results = mln_run
  for name in REPORT_FILES:
    assert (workdir / name).stat().st_size > 0, name
  with Image.open(workdir / "figures/label_issues.png") as gallery:
    assert gallery.width > 1000  # 8 columns of 32 images
  summary = (workdir / "summary.md").read_text()
  for name in REPORT_FILES[:-1]:
    assert f"({name})" in summary  # every figure and the table linked
  assert f"{100 * results['best']['test_accuracy']:.2f}%" in summary
  assert f"{100 * results['label_issues']['top_k_precision']:.2f}%" in summary


def test_label_issue_rows_match_the_soft_label_export(mln_run):
  workdir, _ = mln_run
  rows = read_rows(workdir / "label_issues.csv")
  with np.load(workdir / "soft_labels.npz") as export:
    given, argmax = export["given_label"], export["soft_argmax"]
    scores, clean = export["label_issue_score"], export["clean_label"]
  assert len(rows) == len(given)
  index = np.array([int(r["sample_index"]) for r in rows])
  assert sorted(index) == list(range(len(given)))
  assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
  row_scores = np.array([float(r["label_issue_score"]) for r in rows])
  np.testing.assert_allclose(row_scores, scores[index], atol=1e-6)
  assert np.all(np.diff(row_scores) <= 0)  # most suspicious first
  np.testing.assert_array_equal([int(r["given_label"]) for r in rows], given[index])
  np.testing.assert_array_equal([int(r["suggested_label"]) for r in rows], argmax[index])
  np.testing.assert_array_equal([int(r["clean_label"]) for r in rows], clean[index])
  np.testing.assert_array_equal([int(r["given_label_is_wrong"]) for r in rows],
                                given[index] != clean[index])
  assert {r["given_class"] for r in rows} == {str(c) for c in range(10)}  # digits' class names
  pandas = pytest.importorskip("pandas")  # what a user reads it with
  table = pandas.read_csv(workdir / "label_issues.csv")
  assert table.shape == (len(given), 10) and table["sample_index"].tolist() == index.tolist()


def test_the_gallery_shows_the_k_highest_scores(mln_run, tmp_path):
  workdir, results = mln_run
  issues = report.load_label_issues(workdir)
  path, top = report.write_gallery(tmp_path / "gallery.png", workdir, issues,
                                   results["class_names"], 5, "top 5")
  assert path.exists() and len(top) == 5
  others = np.setdiff1d(np.arange(len(issues.scores)), top)
  assert issues.scores[top].min() >= issues.scores[others].max()
  np.testing.assert_array_equal(top, np.argsort(-issues.scores, kind="stable")[:5])
  assert report.gallery_precision(issues, top) == np.mean(issues.given[top] != issues.clean[top])
  # Its images are the training images at those indices, also when read back from the config.
  loaded = report.gallery_images(workdir, issues, top)
  from mln_jax import data
  images = data.load_digits_dataset(num_heldout=300, seed=0).train_images
  np.testing.assert_array_equal(np.stack(loaded), images[top])


def test_the_command_redoes_the_report_of_a_finished_workdir(mln_run, tmp_path):
  workdir, _ = mln_run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("figures", "*.csv", "*.md",
                                                               "checkpoints"))
  assert not (copy / "label_issues.csv").exists()
  done = subprocess.run([sys.executable, "-m", "mln_jax.report", f"--workdir={copy}",
                         "--gallery_size=8"], capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  for name in REPORT_FILES:
    assert (copy / name).exists(), name
  assert (copy / "label_issues.csv").read_text() == (workdir / "label_issues.csv").read_text()
  assert "The 8 most suspicious labels" in (copy / "summary.md").read_text()


def test_the_command_names_a_workdir_without_a_finished_run(tmp_path):
  done = subprocess.run([sys.executable, "-m", "mln_jax.report", f"--workdir={tmp_path}"],
                        capture_output=True, text=True)
  assert done.returncode == 2
  assert done.stderr.startswith("error: No results.json under") and "Traceback" not in done.stderr


def test_scores_without_soft_labels_give_rows_without_suggestions(tmp_path):
  # A method that scores samples (sample weights): labels.npz and label_issue_scores.npy.
  np.savez(tmp_path / "labels.npz", noisy=np.array([0, 1, -1, 2, 1]),
           clean=np.array([0, 2, 1, 2, 1]))
  np.save(tmp_path / "label_issue_scores.npy", np.array([0.1, 0.9, 0.5, 0.3, 0.3], np.float32))
  issues = report.load_label_issues(tmp_path)
  assert issues.suggested is None
  np.testing.assert_array_equal(issues.ranking(), [1, 3, 4, 0, 2])  # ties in order, unlabelled last
  rows = read_rows(report.write_label_issues_csv(tmp_path / "x.csv", issues, ["a", "b", "c"]))
  assert [r["sample_index"] for r in rows] == ["1", "3", "4", "0", "2"]
  assert rows[0] == {"rank": "1", "sample_index": "1", "given_label": "1", "given_class": "b",
                     "suggested_label": "", "suggested_class": "", "label_issue_score": "0.900000",
                     "clean_label": "2", "clean_class": "c", "given_label_is_wrong": "1"}
  assert rows[-1]["given_label"] == "" and rows[-1]["label_issue_score"] == ""
  np.save(tmp_path / "label_issue_scores.npy", np.zeros(4, np.float32))
  with pytest.raises(ValueError, match="4 scores for 5 training samples"):
    report.load_label_issues(tmp_path)


def test_a_method_without_a_verdict_gets_figures_and_a_summary(tmp_path):
  config = tiny_config.with_overrides(tiny_config.get_config(), method="cross_entropy",
                                      num_epochs=2, report=True,
                                      **{"label_issues.gallery_size": 0})
  experiment.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / "figures/accuracy.png").exists()
  assert not (tmp_path / "label_issues.csv").exists()
  assert "No label_issues.csv" in (tmp_path / "summary.md").read_text()


def test_report_off_writes_nothing(tmp_path):
  config = tiny_config.with_overrides(tiny_config.get_config(), method="cross_entropy",
                                      num_epochs=1, report=False)
  experiment.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / "results.json").exists()
  assert not (tmp_path / "figures").exists() and not (tmp_path / "summary.md").exists()


def test_a_finished_image_folder_run_lists_its_files(tmp_path_factory):
  pytest.importorskip("tensorflow")
  import test_streamed
  root = tmp_path_factory.mktemp("folders")
  fake_layouts.image_folder(root)
  workdir = tmp_path_factory.mktemp("run")
  experiment.train_and_evaluate(
      test_streamed.tiny_streamed("image_folder", root, report=True,
                                  **{"label_issues.gallery_size": 6}),
      str(workdir))
  rows = read_rows(workdir / "label_issues.csv")
  with np.load(workdir / "soft_labels.npz") as export:
    files, scores = export["image_file"], export["label_issue_score"]
  assert len(rows) == len(files) == 36
  for row in rows:
    assert row["image_file"] == files[int(row["sample_index"])]
    assert pathlib.Path(row["image_file"]).parent.parent == root / "train"
    assert row["given_class"] == pathlib.Path(row["image_file"]).parent.name
  assert "clean_label" not in rows[0]  # an image folder's true labels are unknown
  np.testing.assert_allclose(float(rows[0]["label_issue_score"]), np.nanmax(scores), atol=1e-6)
  for name in ("figures/accuracy.png", "figures/confusion.png", "figures/label_issues.png"):
    assert (workdir / name).exists(), name
  summary = (workdir / "summary.md").read_text()
  assert "realised noise unknown" in summary and "The 6 most suspicious labels." in summary


def test_cleanlab_reads_the_export_and_agrees(mln_run):
  """The export is what cleanlab takes as `labels` and `pred_probs`; its quality score is our
  score's complement and its flags are nearly all among ours."""
  cleanlab_filter = pytest.importorskip("cleanlab.filter")
  cleanlab_rank = pytest.importorskip("cleanlab.rank")
  workdir, _ = mln_run
  with np.load(workdir / "soft_labels.npz") as export:
    labels, pred_probs = export["given_label"], export["soft_label"]
    ours, argmax = export["label_issue_score"], export["soft_argmax"]
  quality = cleanlab_rank.get_label_quality_scores(labels, pred_probs)
  np.testing.assert_allclose(quality, 1 - ours, atol=1e-5)
  flagged = cleanlab_filter.find_label_issues(labels, pred_probs, n_jobs=1)
  our_flags = argmax != labels
  assert flagged.sum() >= 0.5 * our_flags.sum()
  assert (flagged & our_flags).sum() >= 0.9 * flagged.sum()
  # Ranked by cleanlab's self-confidence, its flags come in the order of our scores.
  ranked = cleanlab_filter.find_label_issues(labels, pred_probs, n_jobs=1,
                                             return_indices_ranked_by="self_confidence")
  np.testing.assert_array_equal(np.sort(ranked), np.flatnonzero(flagged))
  assert np.all(np.diff(ours[ranked]) <= 1e-6)
