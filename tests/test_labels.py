"""Label-issue scores, flagged-error precision/recall and soft-label stability on hand-made
cases."""

import numpy as np
import pytest

from mln_jax import labels


def test_scores_precision_and_recall_by_hand():
  clean = np.array([0, 1, 2, 0, 1])
  given = np.array([0, 2, 2, 1, -1])       # samples 1 and 3 are wrong, 4 is unlabelled
  soft = np.array([[0.9, 0.05, 0.05],       # supports its label: score 0.1
                   [0.1, 0.8, 0.1],         # wrong label 2, soft says 1: score 0.9
                   [0.3, 0.3, 0.4],         # right label, weak support: score 0.6, argmax agrees
                   [0.6, 0.3, 0.1],         # wrong label 1: score 0.7
                   [0.2, 0.7, 0.1]])        # unlabelled: no score
  scores = labels.label_issue_scores(given, soft)
  np.testing.assert_allclose(scores[:4], [0.1, 0.2 + 0.7, 0.6, 0.7], rtol=1e-6)
  assert np.isnan(scores[4])
  report = labels.label_issue_report(given, soft, clean)
  assert report["labelled"] == 4 and report["wrong_labels"] == 2
  # Top-2 scores are samples 1 (0.9) and 3 (0.7): both wrong.
  assert report["top_k_precision"] == report["top_k_recall"] == 1.0
  # argmax flags samples 1 and 3 (sample 2's argmax is its label 2).
  assert report["argmax_flagged"] == 2
  assert report["argmax_precision"] == 1.0 and report["argmax_recall"] == 1.0


def test_flagging_a_clean_sample_lowers_precision():
  clean = np.array([0, 0, 1, 1])
  given = np.array([0, 1, 1, 1])            # only sample 1 is wrong
  soft = np.array([[0.2, 0.8], [0.9, 0.1], [0.6, 0.4], [0.1, 0.9]])
  report = labels.label_issue_report(given, soft, clean)
  # Highest score: sample 1 (0.9) -> the single top-1 flag is right.
  assert report["top_k_precision"] == 1.0
  # argmax flags samples 0, 1 and 2; only 1 is wrong.
  assert report["argmax_precision"] == pytest.approx(1 / 3)
  assert report["argmax_recall"] == 1.0


def test_soft_label_agreement_and_change():
  clean, given = np.array([0, 1, 2, 2]), np.array([0, 2, 2, -1])
  argmax, previous = np.array([0, 1, 1, 2]), np.array([0, 2, 1, 2])
  stats = labels.soft_label_agreement(argmax, given, clean, previous)
  assert stats["soft_labels/clean_agreement"] == 0.75
  assert stats["soft_labels/given_agreement"] == pytest.approx(1 / 3)
  assert stats["soft_labels/changed_fraction"] == 0.25
  first_epoch = labels.soft_label_agreement(argmax, given, clean, None)
  assert "soft_labels/changed_fraction" not in first_epoch
