"""What MetaLabelNet's soft labels say about the training labels: label-issue scores, flagged-error
precision/recall against known clean labels, and how stable the soft labels are between epochs.

Plain numpy on host arrays; `given` labels use −1 for an unlabelled sample.
"""

from __future__ import annotations

import numpy as np


def label_issue_scores(given: np.ndarray, soft_labels: np.ndarray) -> np.ndarray:
  """1 − ŷ[given]: how little the soft label supports the given label (NaN where unlabelled)."""
  labelled = given >= 0
  scores = np.full(len(given), np.nan, np.float32)
  scores[labelled] = 1.0 - soft_labels[np.flatnonzero(labelled), given[labelled]]
  return scores


def label_issue_report(given: np.ndarray, soft_labels: np.ndarray, clean: np.ndarray
                       ) -> dict[str, float]:
  """Precision and recall of flagged label errors among the labelled samples, two ways:

  - `top_k`: the k highest scores, k = the number of truly wrong labels (the realised noise rate),
    so precision equals recall;
  - `argmax`: every sample whose soft label's argmax differs from its given label.
  """
  labelled = np.flatnonzero(given >= 0)
  wrong = given[labelled] != clean[labelled]
  scores = label_issue_scores(given, soft_labels)[labelled]
  num_wrong = int(wrong.sum())
  report = {"labelled": len(labelled), "wrong_labels": num_wrong}
  if num_wrong:
    top = np.argsort(-scores, kind="stable")[:num_wrong]
    report["top_k_precision"] = report["top_k_recall"] = float(wrong[top].mean())
  flagged = soft_labels[labelled].argmax(1) != given[labelled]
  hits = int((flagged & wrong).sum())
  report["argmax_flagged"] = int(flagged.sum())
  report["argmax_precision"] = hits / max(int(flagged.sum()), 1)
  report["argmax_recall"] = hits / max(num_wrong, 1)
  return report


def score_report(given: np.ndarray, scores: np.ndarray, clean: np.ndarray) -> dict[str, float]:
  """Precision (= recall) of the k labelled samples with the highest label-issue `scores` (k = the
  number of truly wrong labels): the report of a method without soft labels (sample weights,
  selections turned into scores)."""
  labelled = np.flatnonzero(given >= 0)
  wrong = given[labelled] != clean[labelled]
  num_wrong = int(wrong.sum())
  report = {"labelled": len(labelled), "wrong_labels": num_wrong}
  if num_wrong:
    top = np.argsort(-np.asarray(scores)[labelled], kind="stable")[:num_wrong]
    report["top_k_precision"] = report["top_k_recall"] = float(wrong[top].mean())
  return report


def soft_label_agreement(argmax: np.ndarray, given: np.ndarray, clean: np.ndarray,
                         previous_argmax: np.ndarray | None) -> dict[str, float]:
  """Per-epoch soft-label statistics (the paper's Figure 4 idea): agreement of argmax soft labels
  with the clean and the given labels, and the share of samples whose argmax changed since the
  previous epoch (absent in the first phase-2 epoch)."""
  labelled = given >= 0
  stats = {"soft_labels/clean_agreement": float(np.mean(argmax == clean)),
           "soft_labels/given_agreement": float(np.mean(argmax[labelled] == given[labelled]))}
  if previous_argmax is not None:
    stats["soft_labels/changed_fraction"] = float(np.mean(argmax != previous_argmax))
  return stats


def write_soft_labels(path: str, given: np.ndarray, soft_labels: np.ndarray, clean: np.ndarray,
                      **extra: np.ndarray) -> None:
  """Saves, per training sample in original order: given label (−1 = none), soft label, its argmax,
  the label-issue score, the dataset's own label (the clean label for synthetic noise; −1 where
  unknown), and any `extra` arrays (e.g. the image files of a streamed dataset)."""
  np.savez(path, given_label=given.astype(np.int32), soft_label=soft_labels.astype(np.float32),
           soft_argmax=soft_labels.argmax(1).astype(np.int32),
           label_issue_score=label_issue_scores(given, soft_labels),
           clean_label=clean.astype(np.int32), **extra)
