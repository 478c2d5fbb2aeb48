"""Tests of mln_jax.noise: exact noise counts, hand-worked feature-dependent cases, label files."""

import numpy as np
import pytest

from mln_jax import noise


def _confusion(clean: np.ndarray, noisy: np.ndarray, num_classes: int) -> np.ndarray:
  counts = np.zeros((num_classes, num_classes), dtype=np.int64)
  np.add.at(counts, (clean, noisy), 1)
  return counts


def _softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


# --- uniform ---


@pytest.mark.parametrize(
    "class_sizes, rate, per_pair",
    [
        # 100 · 0.57 / 3 is exactly 19, though 18.999999999999996 in floats.
        ((100, 100, 100, 100), 0.57, (19, 19, 19, 19)),
        ((50, 120, 33), 0.4, (10, 24, 6)),  # floor(50·0.2), floor(120·0.2), floor(33·0.2)
    ],
)
def test_uniform_exact_counts_per_class_pair(class_sizes, rate, per_pair):
  num_classes = len(class_sizes)
  clean = np.random.default_rng(1).permutation(np.repeat(np.arange(num_classes), class_sizes))
  noisy = noise.uniform_noise(clean, rate, num_classes, seed=0)
  counts = _confusion(clean, noisy, num_classes)
  for i in range(num_classes):
    for j in range(num_classes):
      expected = class_sizes[i] - (num_classes - 1) * per_pair[i] if i == j else per_pair[i]
      assert counts[i, j] == expected, (i, j)
  expected_rate = (num_classes - 1) * sum(per_pair) / clean.size
  assert noise.realised_noise_rate(clean, noisy) == pytest.approx(expected_rate, abs=1e-12)
  assert noisy.dtype == np.int32


def test_uniform_deterministic_per_seed_and_leaves_input_alone():
  clean = np.repeat(np.arange(10), 200)
  before = clean.copy()
  a = noise.uniform_noise(clean, 0.4, 10, seed=3)
  np.testing.assert_array_equal(a, noise.uniform_noise(clean, 0.4, 10, seed=3))
  assert not np.array_equal(a, noise.uniform_noise(clean, 0.4, 10, seed=4))
  np.testing.assert_array_equal(clean, before)


# --- feature-dependent ---


def test_feature_dependent_enough_wrong_first_predictions():
  labels = np.array([0, 0, 1, 1, 2, 2])
  probs = np.array([
      [0.1, 0.7, 0.2],  # t1 = 1 != label, P[t1] = 0.7
      [0.8, 0.1, 0.1],  # t1 == label
      [0.5, 0.3, 0.2],  # t1 = 0 != label, P[t1] = 0.5
      [0.1, 0.2, 0.7],  # t1 = 2 != label, P[t1] = 0.7
      [0.7, 0.2, 0.1],  # t1 = 0 != label, P[t1] = 0.7
      [0.2, 0.2, 0.6],  # t1 == label
  ])
  # num = floor(6 · 0.4) = 2 of the 4 wrong ones: rows 0, 3, 4 tie at 0.7, the later two win.
  noisy = noise.feature_dependent_noise(labels, probs, 0.4, seed=0)
  np.testing.assert_array_equal(noisy, [0, 0, 1, 2, 0, 2])
  # num = 3: all three 0.7 rows; row 2 (0.5) stays.
  noisy = noise.feature_dependent_noise(labels, probs, 0.5, seed=0)
  np.testing.assert_array_equal(noisy, [1, 0, 1, 2, 0, 2])


_FALLBACK_LABELS = np.array([0, 1, 2, 3, 0, 1, 2, 3])
_FALLBACK_PROBS = np.array([
    [0.1, 0.6, 0.2, 0.1],  # t1 = 1 != label -> 1
    [0.2, 0.5, 0.3, 0.0],  # t1 == label, t2 = 2, P[t2] = 0.3
    [0.0, 0.45, 0.45, 0.1],  # t1 = 2 (tie goes to the later class) == label, t2 = 1, P = 0.45
    [0.0, 0.0, 0.0, 1.0],  # t1 == label, P[t2] = 0
    [0.9, 0.05, 0.05, 0.0],  # t1 == label, t2 = 2 (later of the tie), P[t2] = 0.05
    [0.25, 0.35, 0.2, 0.2],  # t1 == label, t2 = 0, P[t2] = 0.25
    [1.0, 0.0, 0.0, 0.0],  # t1 = 0 != label -> 0
    [0.0, 0.0, 0.0, 1.0],  # t1 == label, P[t2] = 0 (ties row 3, later index wins)
])


def test_feature_dependent_second_class_fallback():
  # num = 4: the 2 wrong rows, then the 2 highest P[t2]: row 2 (0.45) -> 1 and row 1 (0.3) -> 2.
  noisy = noise.feature_dependent_noise(_FALLBACK_LABELS, _FALLBACK_PROBS, 0.5, seed=0)
  np.testing.assert_array_equal(noisy, [1, 2, 1, 3, 0, 1, 0, 3])


def test_feature_dependent_zero_second_probability_gets_random_other_class():
  # num = 7: rows 0, 6, then 2, 1, 5, 4 and one of the P[t2] = 0 rows 3, 7: the later, row 7.
  draws = set()
  for seed in range(30):
    noisy = noise.feature_dependent_noise(_FALLBACK_LABELS, _FALLBACK_PROBS, 0.875, seed=seed)
    np.testing.assert_array_equal(noisy[:7], [1, 2, 1, 3, 2, 0, 0])
    assert noisy[7] != 3
    draws.add(int(noisy[7]))
    assert noise.realised_noise_rate(_FALLBACK_LABELS, noisy) == 7 / 8
  # Random, not always t2 (= 2): every other class shows up.
  assert draws == {0, 1, 2}
  a = noise.feature_dependent_noise(_FALLBACK_LABELS, _FALLBACK_PROBS, 0.875, seed=5)
  np.testing.assert_array_equal(
      a, noise.feature_dependent_noise(_FALLBACK_LABELS, _FALLBACK_PROBS, 0.875, seed=5))


# --- class-dependent ---


def test_class_dependent_exact_counts_and_only_sources_change():
  sizes = np.array([20, 20, 7, 20, 20, 13, 20, 20, 20, 40])
  clean = np.random.default_rng(2).permutation(np.repeat(np.arange(10), sizes))
  noisy = noise.class_dependent_noise(clean, 0.3, seed=0)
  counts = _confusion(clean, noisy, 10)
  for source in range(10):
    target = noise.CIFAR10_PAIR_FLIPS.get(source)
    flipped = int(sizes[source] * 0.3) if target is not None else 0  # 6, 2, 6, 6, 3, 12
    assert counts[source, source] == sizes[source] - flipped
    if target is not None:
      assert counts[source, target] == flipped
  changed = np.unique(clean[clean != noisy])
  np.testing.assert_array_equal(changed, sorted(noise.CIFAR10_PAIR_FLIPS))
  np.testing.assert_array_equal(noisy, noise.class_dependent_noise(clean, 0.3, seed=0))
  assert not np.array_equal(noisy, noise.class_dependent_noise(clean, 0.3, seed=1))


@pytest.mark.parametrize("pairs", [{2: 10}, {-1: 0}, {3: 3}])
def test_class_dependent_rejects_bad_pairs(pairs):
  with pytest.raises(ValueError, match="pair flip"):
    noise.class_dependent_noise(np.arange(10), 0.2, seed=0, pairs=pairs)


# --- student probabilities ---

# Under p, row 0 has the larger P[t2] (0.15 > 0.145); after the pack's softmax, row 1 does
# (0.1010 < 0.1041), because row 0's concentrated mass makes its softmax denominator larger.
_STUDENT_P = np.array([
    [0.85, 0.15, 0, 0, 0, 0, 0, 0, 0, 0],
    [0.3, 0.145, 0.14, 0.14, 0.14, 0.135, 0, 0, 0, 0],
    [1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
])


@pytest.fixture
def student_file(tmp_path):
  path = tmp_path / "student_probs.npz"
  np.savez(path, student_probs=_softmax(_STUDENT_P).astype(np.float32))
  return path


def test_student_probabilities_default_is_the_stored_array_as_the_reference_uses(student_file):
  stored = np.load(student_file)["student_probs"]
  raw = noise.student_probabilities(student_file)
  np.testing.assert_array_equal(raw, stored)
  assert raw.dtype == np.float32
  # One slot among rows 0 and 1 (both t1 == label 0): the stored values pick row 1, p picks row 0.
  labels = np.zeros(2, dtype=np.int64)
  np.testing.assert_array_equal(noise.feature_dependent_noise(labels, raw[:2], 0.5, seed=0), [0, 1])
  recovered = noise.student_probabilities(student_file, recover=True)
  np.testing.assert_allclose(recovered, _STUDENT_P, atol=1e-6)
  np.testing.assert_array_equal(
      noise.feature_dependent_noise(labels, recovered[:2], 0.5, seed=0), [1, 0])


def test_student_probabilities_one_hot_row(student_file):
  labels = np.zeros(1, dtype=np.int64)
  # Stored values: the nine zeros tie, and the last of them (class 9) is t2, as in the reference.
  raw = noise.student_probabilities(student_file)[2:]
  np.testing.assert_array_equal(noise.feature_dependent_noise(labels, raw, 1.0, seed=0), [9])
  # Recovered: exact zeros, so P[t2] = 0 and the class is drawn at random.
  recovered = noise.student_probabilities(student_file, recover=True)[2:]
  assert np.count_nonzero(recovered) == 1
  draws = {int(noise.feature_dependent_noise(labels, recovered, 1.0, seed=s)[0]) for s in range(60)}
  assert 0 not in draws and len(draws) > 1


def test_student_probabilities_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    noise.student_probabilities(tmp_path / "nope.npz")


# --- user-given labels ---

_GIVEN = np.array([3, 0, 2, 2, 1, 0])


@pytest.mark.parametrize("name, write", [
    ("labels.npy", lambda p: np.save(p, _GIVEN)),
    ("float.npy", lambda p: np.save(p, _GIVEN.astype(np.float64))),
    ("labels.txt", lambda p: p.write_text("\n".join(map(str, _GIVEN)) + "\n")),
    ("labels.csv", lambda p: p.write_text(",".join(map(str, _GIVEN)))),
    ("spaced.txt", lambda p: p.write_text("3 0  2\n2\t1 0")),
    ("single.npz", lambda p: np.savez(p, anything=_GIVEN)),
])
def test_load_noisy_labels_formats(tmp_path, name, write):
  write(tmp_path / name)
  labels = noise.load_noisy_labels(tmp_path / name, num_samples=6, num_classes=4)
  np.testing.assert_array_equal(labels, _GIVEN)
  assert labels.dtype == np.int32


def test_load_noisy_labels_npz_key(tmp_path):
  path = tmp_path / "many.npz"
  np.savez(path, clean=np.zeros(6, dtype=np.int64), worse=_GIVEN)
  np.testing.assert_array_equal(noise.load_noisy_labels(f"{path}:worse", 6, 4), _GIVEN)
  with pytest.raises(ValueError, match="worse"):  # Two arrays: the error lists them.
    noise.load_noisy_labels(path, 6, 4)
  with pytest.raises(ValueError, match="missing"):
    noise.load_noisy_labels(f"{path}:missing", 6, 4)


def test_load_noisy_labels_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="absent.npy"):
    noise.load_noisy_labels(tmp_path / "absent.npy", 6, 4)

  np.save(tmp_path / "short.npy", _GIVEN[:5])
  with pytest.raises(ValueError, match=r"5 noisy labels .* 6 samples.*original training order"):
    noise.load_noisy_labels(tmp_path / "short.npy", 6, 4)

  np.save(tmp_path / "range.npy", np.array([3, 0, 2, 4, 1, 7]))
  with pytest.raises(ValueError, match=r"label 4 at index 3"):
    noise.load_noisy_labels(tmp_path / "range.npy", 6, 4)

  np.save(tmp_path / "negative.npy", np.array([3, -1, 2, 2, 1, 0]))
  with pytest.raises(ValueError, match=r"label -1 at index 1"):
    noise.load_noisy_labels(tmp_path / "negative.npy", 6, 4)

  np.save(tmp_path / "fraction.npy", np.array([3.0, 0.0, 2.5, 2.0, 1.0, 0.0]))
  with pytest.raises(ValueError, match=r"integers, got 2.5 at index 2"):
    noise.load_noisy_labels(tmp_path / "fraction.npy", 6, 4)

  (tmp_path / "fraction.txt").write_text("3\n0\n2\n1.5\n1\n0\n")
  with pytest.raises(ValueError, match=r"integers, got 1.5 at index 3"):
    noise.load_noisy_labels(tmp_path / "fraction.txt", 6, 4)

  (tmp_path / "words.csv").write_text("3,0,cat,2,1,0")
  with pytest.raises(ValueError, match="number"):
    noise.load_noisy_labels(tmp_path / "words.csv", 6, 4)

  np.save(tmp_path / "matrix.npy", np.zeros((6, 1), dtype=np.int64))
  with pytest.raises(ValueError, match="1-D"):
    noise.load_noisy_labels(tmp_path / "matrix.npy", 6, 4)


# --- dispatcher and rate ---


def test_realised_noise_rate_ignores_unlabelled():
  assert noise.realised_noise_rate(np.array([0, 1, 2, 3]), np.array([0, 2, -1, 3])) == 1 / 3
  assert noise.realised_noise_rate(np.array([0, 1]), np.array([-1, -1])) == 0.0


def test_make_noisy_labels_dispatches_and_copies(tmp_path):
  clean = np.repeat(np.arange(10), 30)
  before = clean.copy()
  kwargs = dict(rate=0.4, num_classes=10, seed=7)
  none = noise.make_noisy_labels(clean, kind="none", **kwargs)
  np.testing.assert_array_equal(none, clean)
  assert none.dtype == np.int32 and none is not clean
  np.testing.assert_array_equal(
      noise.make_noisy_labels(clean, kind="uniform", **kwargs),
      noise.uniform_noise(clean, 0.4, 10, 7))
  np.testing.assert_array_equal(
      noise.make_noisy_labels(clean, kind="class_dependent", **kwargs),
      noise.class_dependent_noise(clean, 0.4, 7))
  probs = np.random.default_rng(0).dirichlet(np.ones(10), size=clean.size)
  feature = noise.make_noisy_labels(clean, kind="feature_dependent", probs=probs, **kwargs)
  assert noise.realised_noise_rate(clean, feature) == 0.4
  np.save(tmp_path / "given.npy", clean[::-1])
  given = noise.make_noisy_labels(clean, kind="given", path=str(tmp_path / "given.npy"), **kwargs)
  np.testing.assert_array_equal(given, clean[::-1])
  np.testing.assert_array_equal(clean, before)


def test_make_noisy_labels_errors():
  clean = np.arange(4)
  kwargs = dict(num_classes=4, seed=0)
  with pytest.raises(ValueError, match="none, uniform, feature_dependent, class_dependent, given"):
    noise.make_noisy_labels(clean, kind="symmetric", rate=0.2, **kwargs)
  for rate in (-0.1, 1.5, float("nan")):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
      noise.make_noisy_labels(clean, kind="uniform", rate=rate, **kwargs)
  with pytest.raises(ValueError, match=r"needs probs of shape \(4, 4\)"):
    noise.make_noisy_labels(clean, kind="feature_dependent", rate=0.2, **kwargs)
  with pytest.raises(ValueError, match=r"\(4, 4\), got \(4, 3\)"):
    noise.make_noisy_labels(
        clean, kind="feature_dependent", rate=0.2, probs=np.full((4, 3), 1 / 3), **kwargs)
  with pytest.raises(ValueError, match="path"):
    noise.make_noisy_labels(clean, kind="given", rate=0.0, **kwargs)
  with pytest.raises(ValueError, match=r"label 4 at index 3"):
    noise.make_noisy_labels(np.array([0, 1, 2, 4]), kind="none", rate=0.0, **kwargs)


# --- real data ---


@pytest.mark.integration
def test_feature_dependent_40_percent_on_cifar10_student(cifar10_pack):
  with np.load(cifar10_pack / "cifar10_jpeg.npz") as pack:
    clean = pack["train_label"]
  probs = noise.student_probabilities(cifar10_pack / "student_probs.npz")
  noisy = noise.make_noisy_labels(
      clean, kind="feature_dependent", rate=0.4, num_classes=10, seed=0, probs=probs)
  assert noise.realised_noise_rate(clean, noisy) == 0.40
  order = np.argsort(probs, axis=1, kind="stable")
  flipped = np.flatnonzero(noisy != clean)
  first, second = order[flipped, -1], order[flipped, -2]
  assert np.all((noisy[flipped] == first) | (noisy[flipped] == second))
  # 40% is more than the student's 5317 errors, so every one of them flips to the student's argmax.
  wrong = np.flatnonzero(order[:, -1] != clean)
  assert wrong.size == 5317
  np.testing.assert_array_equal(noisy[wrong], order[wrong, -1])


def test_missing_student_probabilities_name_the_setting(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match=r"student_probs.npz\. .*set --config.noise.probabilities"):
    noise.student_probabilities(tmp_path / "student_probs.npz")
