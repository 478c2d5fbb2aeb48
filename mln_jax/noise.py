"""Noisy training labels: synthetic noise (SPEC, "Label noise (synthetic)") and user-given labels.

Everything here is plain numpy and deterministic per seed. Every function returns a new int32 array
and leaves its inputs untouched.
"""

from collections.abc import Mapping
import math
import os
import pathlib
import zipfile

import numpy as np

NOISE_KINDS = ("none", "uniform", "feature_dependent", "class_dependent", "given", "human")
# The kinds that noise.rate sets (for 'none' and 'given' only the realised rate means anything).
RATED_KINDS = ("uniform", "feature_dependent", "class_dependent")

# Source class -> noisy class of the reference's class-dependent noise: bird->airplane, cat->dog,
# deer->horse, dog->cat, truck->automobile.
CIFAR10_PAIR_FLIPS = {2: 0, 3: 5, 4: 7, 5: 3, 9: 1}
# CIFAR-100's class-dependent noise flips each class to the next one of its group: 'superclasses'
# (the dataset's 20 coarse classes of 5) or 'index_blocks' (classes 5k..5k+4, which is what the
# literature's code builds: Patrini et al.'s `build_for_cifar100`, reused by many papers; the
# alphabetical fine labels make these blocks other groups than the superclasses).
FLIP_GROUPS = ("superclasses", "index_blocks")

_TEXT_SUFFIXES = (".txt", ".csv")
# The pack's README bounds the error of its probability recovery by 1e-7, so a recovered value below
# this cannot be told apart from an exact zero.
_RECOVERY_ZERO_TOL = 1e-7


def _floor_count(x: float) -> int:
  """floor(x), where x within float rounding of an integer counts as that integer."""
  # 100 * 0.29 is 28.999999999999996 in floats: without this, a 29% rate would flip 28 of 100.
  nearest = round(x)
  return nearest if math.isclose(x, nearest, rel_tol=1e-9, abs_tol=1e-9) else math.floor(x)


def _check_rate(rate: float) -> None:
  if not 0.0 <= rate <= 1.0:  # Also rejects NaN.
    raise ValueError(f"noise rate must lie in [0, 1], got {rate}")


def _check_range(labels: np.ndarray, num_classes: int, what: str) -> None:
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    i = bad[0]
    raise ValueError(
        f"{what}: label {labels[i]} at index {i} is outside [0, {num_classes}) "
        f"({bad.size} labels out of range in all)")


def _clean_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Validated int32 copy of a 1-D array of clean labels in [0, num_classes)."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.dtype.kind not in "iu":
    raise ValueError(
        f"labels must be a 1-D integer array, got shape {labels.shape} and dtype {labels.dtype}")
  if num_classes < 2:
    raise ValueError(f"num_classes must be at least 2, got {num_classes}")
  _check_range(labels, num_classes, "clean labels")
  return labels.astype(np.int32)


def _top(indices: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
  """The k entries of `indices` with the largest `values`; among ties the later entry wins."""
  return indices[np.argsort(values, kind="stable")[indices.size - k:]]


def uniform_noise(labels: np.ndarray, rate: float, num_classes: int, seed: int) -> np.ndarray:
  """Uniform ("symmetric") noise: floor(n_i·rate/(C−1)) random samples of class i get each j ≠ i."""
  _check_rate(rate)
  clean = _clean_labels(labels, num_classes)
  noisy = clean.copy()
  rng = np.random.default_rng(seed)
  for i in range(num_classes):
    members = np.flatnonzero(clean == i)
    per_target = _floor_count(members.size * rate / (num_classes - 1))
    if per_target == 0:
      continue
    targets = np.delete(np.arange(num_classes, dtype=np.int32), i)
    # Consecutive blocks of one permutation: disjoint draws without replacement, one per target.
    chosen = rng.permutation(members)[:per_target * targets.size]
    noisy[chosen] = np.repeat(targets, per_target)
  return noisy


def feature_dependent_noise(
    labels: np.ndarray, probs: np.ndarray, rate: float, seed: int) -> np.ndarray:
  """Feature-dependent noise from class probabilities `probs` (N, C), as SPEC defines it.

  With t1, t2 each sample's most and second-most probable classes and num = floor(N·rate): the num
  samples with t1 ≠ label and the highest P[t1] get t1. If fewer than num have t1 ≠ label, all of
  them get t1, and of the others the (num − count) with the highest P[t2] get t2, or a random class
  other than their label where P[t2] = 0. Ties go to the later index, both between classes within a
  row (as in the reference) and between samples: a stable ascending sort read from the end. `seed`
  only matters for the random classes.
  """
  _check_rate(rate)
  probs = np.asarray(probs)
  if probs.ndim != 2:
    raise ValueError(f"probs must have shape (num_samples, num_classes), got {probs.shape}")
  num_samples, num_classes = probs.shape
  clean = _clean_labels(labels, num_classes)
  if num_samples != clean.size:
    raise ValueError(f"probs must have shape {(clean.size, num_classes)}, got {probs.shape}")
  if not np.all(np.isfinite(probs)):
    raise ValueError("probs must be finite")
  noisy = clean.copy()

  # Stable like the reference's np.argsort on rows this short (numpy sorts them by insertion), so of
  # tied classes the later one ranks higher: it decides t2 for every one-hot row.
  order = np.argsort(probs, axis=1, kind="stable")
  t1, t2 = order[:, -1], order[:, -2]
  num = _floor_count(num_samples * rate)
  wrong = np.flatnonzero(t1 != clean)
  if wrong.size >= num:
    chosen = _top(wrong, probs[wrong, t1[wrong]], num)
    noisy[chosen] = t1[chosen]
    return noisy

  noisy[wrong] = t1[wrong]
  # Here t1 == label, so t2 ≠ label: every chosen sample really changes.
  right = np.flatnonzero(t1 == clean)
  chosen = _top(right, probs[right, t2[right]], num - wrong.size)
  noisy[chosen] = t2[chosen]
  # A zero P[t2] says nothing about which class the sample resembles, and t2 would then be whichever
  # zero class sorts last: give these samples a uniformly random other class instead.
  blank = chosen[probs[chosen, t2[chosen]] == 0]
  draw = np.random.default_rng(seed).integers(0, num_classes - 1, size=blank.size)
  noisy[blank] = draw + (draw >= clean[blank])
  return noisy


def class_dependent_noise(
    labels: np.ndarray,
    rate: float,
    seed: int,
    pairs: Mapping[int, int] = CIFAR10_PAIR_FLIPS,
    num_classes: int = 10,
) -> np.ndarray:
  """Pair-flip noise: for each source class s, floor(n_s·rate) random samples of s get pairs[s].

  `num_classes` (CIFAR-10's by default, like `pairs`) bounds both the labels and the pairs.
  """
  _check_rate(rate)
  clean = _clean_labels(labels, num_classes)
  for source, target in pairs.items():
    if not (0 <= source < num_classes and 0 <= target < num_classes) or source == target:
      raise ValueError(
          f"pair flip {source} -> {target} must map a class in [0, {num_classes}) to another one")
  noisy = clean.copy()
  rng = np.random.default_rng(seed)
  # Sorted, so the draws do not depend on the mapping's insertion order.
  for source in sorted(pairs):
    members = np.flatnonzero(clean == source)
    chosen = rng.choice(members, _floor_count(members.size * rate), replace=False)
    noisy[chosen] = pairs[source]
  return noisy


def next_in_group_flips(group_of: np.ndarray) -> dict[int, int]:
  """Pair flips that send each class to the next class of its group (by class index, the last one
  back to the first); `group_of[c]` is class c's group. Groups of one class flip nowhere."""
  group_of = np.asarray(group_of)
  pairs = {}
  for group in np.unique(group_of):
    members = np.flatnonzero(group_of == group)
    if members.size > 1:
      pairs.update({int(c): int(n) for c, n in zip(members, np.roll(members, -1))})
  return pairs


def index_block_groups(num_classes: int, block: int = 5) -> np.ndarray:
  """Class c's group is c // block: the literature's CIFAR-100 'superclasses'."""
  return np.arange(num_classes) // block


def transition_counts(clean: np.ndarray, given: np.ndarray, num_classes: int) -> np.ndarray:
  """(C, C) int64 counts of (clean label i, given label j) over the samples where both are known
  (>= 0): row i / its sum is P(given = j | clean = i), the realised noise transition matrix."""
  clean, given = np.asarray(clean), np.asarray(given)
  known = (clean >= 0) & (given >= 0)
  return np.bincount(clean[known].astype(np.int64) * num_classes + given[known],
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _read_label_file(path: str | os.PathLike) -> np.ndarray:
  """The raw array in a `.npy`, `.npz` (`file.npz` or `file.npz:key`) or `.txt`/`.csv` file."""
  file, key = str(path), None
  stem, sep, suffix_key = file.rpartition(":")
  if sep and stem.endswith(".npz"):
    file, key = stem, suffix_key
  file = pathlib.Path(file)
  if file.is_dir():
    raise IsADirectoryError(f"noisy-label path {file} is a folder: name the label file in it "
                            "(.npy, .npz, .txt or .csv).")
  if not file.is_file():
    raise FileNotFoundError(f"noisy-label file not found: {file}")
  try:
    return _read_label_array(file, key)
  except (EOFError, zipfile.BadZipFile, OSError) as e:  # truncated or not what it says
    raise ValueError(f"{file} is damaged or not a {file.suffix} file ({type(e).__name__}: "
                     f"{e}).") from None


def _read_label_array(file: pathlib.Path, key: str | None) -> np.ndarray:
  suffix = file.suffix.lower()
  if suffix == ".npy":
    try:
      return np.load(file, allow_pickle=False)
    except ValueError as e:  # a damaged header or payload reads as a pickle or a short array
      raise ValueError(f"{file} is damaged or not an .npy array ({e}).") from None
  if suffix == ".npz":
    with np.load(file, allow_pickle=False) as archive:
      if key is None:
        if len(archive.files) != 1:
          raise ValueError(
              f"{file} holds arrays {archive.files}: name one as {file}:<key>")
        key = archive.files[0]
      if key not in archive.files:
        raise ValueError(f"{file} has no array {key!r}; it holds {archive.files}")
      return archive[key]
  if suffix in _TEXT_SUFFIXES:
    tokens = file.read_text().replace(",", " ").split()
    try:
      return np.array(tokens, dtype=np.float64)
    except ValueError as e:
      raise ValueError(f"{file}: every entry must be a number ({e})") from None
  raise ValueError(f"{file}: unsupported file type; use .npy, .npz, or one of {_TEXT_SUFFIXES}")


def load_noisy_labels(path: str | os.PathLike, num_samples: int, num_classes: int) -> np.ndarray:
  """User-given noisy labels (e.g. real annotator labels), checked against the dataset.

  `path` is a `.npy` file, a `.npz` file with a single array (or `file.npz:key` to pick one), or a
  `.txt`/`.csv` file of integers, one a line or separated by commas or whitespace.
  """
  labels = _read_label_file(path)
  if labels.ndim != 1:
    raise ValueError(f"{path}: noisy labels must be 1-D, got shape {labels.shape}")
  if labels.dtype.kind == "f":
    bad = np.flatnonzero(~np.isfinite(labels) | (labels != np.round(labels)))
    if bad.size:
      raise ValueError(
          f"{path}: noisy labels must be integers, got {labels[bad[0]]} at index {bad[0]}")
  elif labels.dtype.kind not in "iu":
    raise ValueError(f"{path}: noisy labels must be integers, got dtype {labels.dtype}")
  if labels.size != num_samples:
    raise ValueError(
        f"{path}: {labels.size} noisy labels for a training set of {num_samples} samples; the "
        "labels must be one per training sample, in the dataset's original training order")
  _check_range(labels, num_classes, str(path))
  return labels.astype(np.int32)


def student_probabilities(path: str | os.PathLike, *, recover: bool = False) -> np.ndarray:
  """The student class probabilities (N, C) of the data pack's `student_probs.npz`.

  The reference (gorkemalgan/MetaLabelNet, `dataset.py`, `add_noise`) makes its feature-dependent
  noise with `np.load('cifar10/dataset/student_logits.npy')` passed unchanged to
  `noise_featuredependent`; `noisegen.py` shows the file holds `Softmax(net(images))` of a trained
  network. As the pack's README notes, each row is in fact a softmax of a probability vector p. The
  default (`recover=False`) returns the stored values (float32) unchanged, so our noise matches the
  reference's. Ranking by these values rather than by p flips a different set of samples (at 20%
  noise, 536 of the 50,000 labels differ), and because they are never 0, the random-class rule for
  P[t2] = 0 never applies: a chosen sample whose p is one-hot flips to its highest-index other
  class, as in the reference.

  `recover=True` returns p = log s − mean(log s) + 0.1 (float64) instead, with values below the
  recovery's error bound set to exactly 0, so the rule for P[t2] = 0 applies to them.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"student probabilities not found: {path}. They come with the shared "
                            "CIFAR-10 pack; for another copy of CIFAR-10 set "
                            "--config.noise.probabilities to an (N, C) .npy file or clean_model.")
  with np.load(path, allow_pickle=False) as archive:
    if "student_probs" not in archive.files:
      raise ValueError(f"{path} has no array 'student_probs'; it holds {archive.files}")
    stored = archive["student_probs"]
  if stored.ndim != 2:
    raise ValueError(f"{path}: student_probs must be 2-D (N, C), got shape {stored.shape}")
  if not recover:
    return stored
  log_s = np.log(stored.astype(np.float64))
  probs = log_s - log_s.mean(axis=1, keepdims=True) + 0.1
  probs[probs < _RECOVERY_ZERO_TOL] = 0.0
  return probs


def realised_noise_rate(clean: np.ndarray, noisy: np.ndarray) -> float:
  """Fraction of labelled samples whose noisy label differs from the clean one.

  Entries with noisy < 0 mark unlabelled samples and are left out; with none labelled, it is 0.
  """
  clean, noisy = np.asarray(clean), np.asarray(noisy)
  if clean.shape != noisy.shape:
    raise ValueError(f"clean and noisy labels differ in shape: {clean.shape} vs {noisy.shape}")
  labelled = noisy >= 0
  if not labelled.any():
    return 0.0
  return float(np.mean(clean[labelled] != noisy[labelled]))


def make_noisy_labels(
    clean_labels: np.ndarray,
    *,
    kind: str,
    rate: float,
    num_classes: int,
    seed: int,
    probs: np.ndarray | None = None,
    path: str | os.PathLike | None = None,
    pairs: Mapping[int, int] | None = None,
) -> np.ndarray:
  """Training labels with noise of `kind` (one of NOISE_KINDS but 'human') applied to
  `clean_labels`.

  `probs` (N, C) is needed for 'feature_dependent' and `path` for 'given' (see load_noisy_labels);
  `pairs` are 'class_dependent''s flips (default: CIFAR10_PAIR_FLIPS). `rate` must lie in [0, 1]
  for every kind, though 'none' and 'given' do not use it. Human labels are read, not made
  (`mln_jax.human_labels`).
  """
  if kind not in NOISE_KINDS:
    raise ValueError(f'unknown noise kind {kind!r}; valid kinds are {", ".join(NOISE_KINDS)}')
  _check_rate(rate)
  clean = _clean_labels(clean_labels, num_classes)

  if kind == "none":
    return clean
  if kind == "uniform":
    return uniform_noise(clean, rate, num_classes, seed)
  if kind == "feature_dependent":
    expected = (clean.size, num_classes)
    if probs is None:
      raise ValueError(f"noise kind 'feature_dependent' needs probs of shape {expected}")
    if np.shape(probs) != expected:
      raise ValueError(f"probs must have shape {expected}, got {np.shape(probs)}")
    return feature_dependent_noise(clean, probs, rate, seed)
  if kind == "class_dependent":
    return class_dependent_noise(clean, rate, seed, pairs=CIFAR10_PAIR_FLIPS if pairs is None
                                 else pairs, num_classes=num_classes)
  if kind == "human":
    raise ValueError("noise kind 'human' reads annotators' labels: mln_jax.human_labels.load, "
                     "not make_noisy_labels.")
  if path is None:
    raise ValueError("noise kind 'given' needs the path of a noisy-label file: set "
                     "--config.noise.labels_path.")
  return load_noisy_labels(path, clean.size, num_classes)
