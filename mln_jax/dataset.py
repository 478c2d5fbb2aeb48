"""The one description of a run's data that every loader gives the loop (in memory or on disk)."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np

from mln_jax import noise as noise_lib


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: `==` on array fields is ambiguous.
class Split:
  """Images held in memory, uint8 (N, H, W, C), and their int32 labels (−1: unlabelled)."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A noisy training split, a clean meta split and any number of named clean test splits.

  Splits are `Split`s (in device memory) or `file_lists.ImageList`s (streamed from disk): both have
  `labels` and a length.

  Attributes:
    name: e.g. 'cifar10', 'clothing1m'.
    num_classes: labels lie in [0, num_classes).
    class_names: label i's name (empty where the layout gives none).
    train: the training split with its given (noisy) labels, −1 where a label was dropped.
    meta: the clean meta split (model selection and MetaLabelNet's meta objective).
    tests: named test splits, 'test' first.
    clean_train_labels: the training samples' true labels, −1 where unknown.
    noise: `kind`, `rate` (None unless synthetic noise of that rate), `realised_rate` (over the
      labelled samples whose true label is known; None where none is) and `measured_on` (how many).
  """
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  train: Any
  meta: Any
  tests: dict[str, Any]
  clean_train_labels: np.ndarray
  noise: dict[str, Any]

  def __post_init__(self):
    if len(self.clean_train_labels) != len(self.train):
      raise ValueError(f"{self.name}: {len(self.clean_train_labels)} clean labels for "
                       f"{len(self.train)} training samples.")

  @property
  def labelled_indices(self) -> np.ndarray:
    return np.flatnonzero(self.train.labels >= 0).astype(np.int32)


def digest_of(*arrays: np.ndarray) -> str:
  """A short digest of arrays' dtypes and contents."""
  digest = hashlib.sha256()
  for array in arrays:
    digest.update(str(array.dtype).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()[:16]


def _contents(split: Any) -> np.ndarray:
  # The images in memory (uint8) or the files a streamed split reads (their paths' bytes).
  files = getattr(split, "files", None)
  if files is None:
    return split.images
  return np.frombuffer("\n".join(map(str, files)).encode(), np.uint8)


def fingerprint(dataset: Dataset) -> dict[str, str]:
  """Digests of what a run trains and is judged on, kept with its checkpoints: a resume on other
  data (a labels file replaced under the same path) is refused, naming what differs."""
  prints = {"training images": digest_of(_contents(dataset.train)),
            "given training labels": digest_of(dataset.train.labels),
            "clean training labels": digest_of(dataset.clean_train_labels),
            "meta split": digest_of(_contents(dataset.meta), dataset.meta.labels)}
  prints.update({f"{name} split": digest_of(_contents(split), split.labels)
                 for name, split in dataset.tests.items()})
  return prints


# The keys of `Dataset.noise` that `noise_summary` measures (the others describe the noise).
MEASURED_NOISE_KEYS = ("realised_rate", "measured_on", "transition_counts", "transition_matrix")


def noise_summary(kind: str, rate: float | None, given: np.ndarray, clean: np.ndarray,
                  num_classes: int, about: dict[str, Any] | None = None) -> dict[str, Any]:
  """`Dataset.noise`: `kind`, `rate`, what `about` says of the noise (e.g. which human labels),
  and, over the labelled samples whose truth is known, the share of wrong labels and the realised
  transition matrix: `transition_counts[i][j]` samples of clean class i carry label j, and
  `transition_matrix` is each row divided by its sum, P(given = j | clean = i)."""
  known = (clean >= 0) & (given >= 0)
  summary = {"kind": kind, "rate": rate, **(about or {}),
             "realised_rate": (noise_lib.realised_noise_rate(clean[known], given[known])
                               if known.any() else None),
             "measured_on": int(known.sum())}
  if known.any():
    counts = noise_lib.transition_counts(clean, given, num_classes)
    rows = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    summary.update(transition_counts=counts.tolist(),
                   transition_matrix=np.round(rows, 6).tolist())
  return summary


def remeasured_noise(noise: dict[str, Any], given: np.ndarray, clean: np.ndarray,
                     num_classes: int) -> dict[str, Any]:
  """`noise` (a `Dataset.noise`) measured again on other labels (a subset, some dropped), with what
  it says of the noise kept."""
  about = {k: v for k, v in noise.items() if k not in MEASURED_NOISE_KEYS + ("kind", "rate")}
  return noise_summary(noise["kind"], noise["rate"], given, clean, num_classes, about)


def describe_noise(noise: dict[str, Any]) -> str:
  """`Dataset.noise` in one line, without its matrices."""
  return ", ".join(f"{key} {value}" for key, value in noise.items()
                   if key not in ("transition_counts", "transition_matrix"))


def choose_unlabelled(num_train: int, num_unlabelled: int, seed: int) -> np.ndarray:
  """The sorted indices of the `num_unlabelled` training samples whose labels are dropped (at least
  one stays labelled)."""
  if not 0 <= num_unlabelled < num_train:
    raise ValueError(f"config.data.num_unlabelled={num_unlabelled} must lie in [0, "
                     f"{num_train - 1}] for {num_train} training samples (one must keep its "
                     "label).")
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_train, num_unlabelled, replace=False)).astype(np.int64)


def drop_labels(labels: np.ndarray, num_unlabelled: int, seed: int) -> np.ndarray:
  """`labels` with those of `num_unlabelled` samples chosen by `seed` set to −1 (the paper's Table
  V): warm-ups skip them, phases that train on all samples use them."""
  if not num_unlabelled:
    return labels
  labels = labels.copy()
  labels[choose_unlabelled(len(labels), num_unlabelled, seed)] = -1
  return labels
