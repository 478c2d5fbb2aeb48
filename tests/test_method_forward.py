"""Forward loss correction: the corrected losses by hand, Patrini's T̂ estimator (anchors, numpy's
'higher' percentile), the oracle's and the reference's noise matrices against plain numpy, the
second training's fresh network, every phase lowering its own loss, and (slow) the two trainings
through the loop."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import method_checks  # noqa: E402
import tiny_config  # noqa: E402
from mln_jax import config as config_lib  # noqa: E402
from mln_jax import experiment, methods, runtime, trained  # noqa: E402
from mln_jax.methods import forward  # noqa: E402


def softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


LOGITS = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.1], [0.0, -0.3, 0.4]])
LABELS = np.array([0, 2, 1])
T = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.05, 0.15, 0.8]])  # not symmetric


def test_forward_loss_matches_hand_computed_values():
  p = np.clip(softmax(LOGITS), 1e-7, 1 - 1e-7)
  expected = np.mean([-np.log(sum(p[b, i] * T[i, LABELS[b]] for i in range(3)))
                      for b in range(3)])
  value = forward.forward_loss(jnp.asarray(LOGITS), jnp.asarray(LABELS), jnp.asarray(T))
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  # With T = I it is cross-entropy; unlabelled samples add nothing, even where T's column is 0.
  np.testing.assert_allclose(
      forward.forward_loss(jnp.asarray(LOGITS), jnp.asarray(LABELS), jnp.eye(3)),
      np.mean(-np.log(p[np.arange(3), LABELS])), rtol=1e-6)
  zero_column = jnp.asarray(T).at[:, 0].set(0.0)
  labels = jnp.array([-1, 2, 1])
  grad = jax.grad(lambda z: forward.forward_loss(z, labels, zero_column))(jnp.asarray(LOGITS))
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[0] == 0)
  assert float(forward.forward_loss(jnp.asarray(LOGITS), jnp.full((3,), -1), jnp.eye(3))) == 0


def test_forward_reference_loss_matches_the_reference_formula():
  expected = 0.0
  for b in range(3):
    u = softmax(LOGITS[b] @ T)  # T on the logits, then softmax ...
    expected += np.log(np.exp(u).sum()) - u[LABELS[b]]  # ... and cross-entropy's softmax again
  value = forward.forward_reference_loss(jnp.asarray(LOGITS), jnp.asarray(LABELS),
                                         jnp.asarray(T))
  np.testing.assert_allclose(value, expected / 3, rtol=1e-6)


def test_estimator_picks_the_anchors_below_the_higher_percentile():
  # N = 5: 'higher' at 97% is the column maximum; the anchor is the largest value below it.
  probs = np.array([[0.7, 0.2, 0.1],
                    [0.6, 0.3, 0.1],
                    [0.1, 0.8, 0.1],
                    [0.2, 0.2, 0.6],
                    [0.5, 0.7, 0.8]])  # the last row sums to 2: rows are normalised after
  expected = np.array([[0.6, 0.3, 0.1], [0.25, 0.35, 0.4], [0.2, 0.2, 0.6]])
  np.testing.assert_allclose(forward.estimate_noise_matrix(jnp.asarray(probs)), expected,
                             rtol=1e-6)
  # A tie at the threshold: both tied samples are excluded, the anchor lies strictly below.
  tied = np.array([[0.5, 0.5], [0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.4, 0.6]])
  # Column 1: threshold 0.7, anchor 0.6 (sample 4).
  np.testing.assert_allclose(forward.estimate_noise_matrix(jnp.asarray(tied)),
                             [[0.5, 0.5], [0.4, 0.6]], rtol=1e-6)


def numpy_estimator(probs, percentile):
  """Patrini's estimator as written with numpy: zero the values at or above the threshold."""
  rows = []
  for i in range(probs.shape[1]):
    column = probs[:, i].copy()
    threshold = np.percentile(column, percentile, method="higher")
    column[column >= threshold] = 0.0
    rows.append(probs[np.argmax(column)])
  rows = np.array(rows)
  return rows / rows.sum(1, keepdims=True)


@pytest.mark.parametrize("num,percentile", [(40, 97.0), (100, 97.0), (333, 90.0), (7, 50.0)])
def test_estimator_matches_numpy_percentile_higher(num, percentile):
  probs = softmax(np.random.default_rng(num).normal(0, 2, (num, 4))).astype(np.float32)
  index = forward.percentile_index(num, percentile)
  for column in probs.T:
    assert np.sort(column)[index] == np.percentile(column, percentile, method="higher")
  estimate = jax.jit(lambda p: forward.estimate_noise_matrix(p, percentile))(probs)
  np.testing.assert_allclose(estimate, numpy_estimator(probs, percentile), rtol=1e-6)
  if (num, percentile) == (40, 97.0):
    # ceil(0.97·39) = 38: 'higher' is the second largest (linear would be between 37 and 38,
    # 'lower' the third largest), so the anchor is the third largest of each column.
    assert index == 38
    third = np.argsort(probs, axis=0)[-3]
    np.testing.assert_allclose(estimate, probs[third] / probs[third].sum(1, keepdims=True),
                               rtol=1e-6)


def test_oracle_matrix_counts_the_known_label_pairs():
  clean = jnp.array([0, 0, 0, 0, 1, 1, 1, 2, -1, 2])
  noisy = jnp.array([0, 0, 0, 1, 1, 2, 2, 0, 1, -1])
  # Class 0: 3×(0,0) 1×(0,1); class 1: (1,1), 2×(1,2); class 2: one (2,0) (the pairs with a −1
  # are not counted).
  expected = np.array([[0.75, 0.25, 0.0], [0.0, 1 / 3, 2 / 3], [1.0, 0.0, 0.0]])
  np.testing.assert_allclose(forward.oracle_noise_matrix(clean, noisy, 3), expected, rtol=1e-6)
  # Unknown clean labels (or an absent class): identity rows, i.e. no correction.
  np.testing.assert_array_equal(forward.oracle_noise_matrix(jnp.full((10,), -1), noisy, 3),
                                np.eye(3))
  partial = forward.oracle_noise_matrix(jnp.array([0, 0, 1]), jnp.array([1, 0, 1]), 3)
  np.testing.assert_allclose(partial, [[0.5, 0.5, 0], [0, 1, 0], [0, 0, 1]])


def numpy_reference_counts(clean, noisy, num_classes, batch=32):
  """The reference's counting as written in numpy: per loader batch, a buffered fancy-index
  increment (a pair repeated within the batch counts once); then T / T.sum(axis=1)."""
  counts = np.zeros((num_classes, num_classes))
  for start in range(0, len(clean), batch):
    c, n = clean[start:start + batch], noisy[start:start + batch]
    known = (c >= 0) & (n >= 0)
    counts[c[known], n[known]] += 1
  return counts, counts / counts.sum(axis=1)


def test_reference_matrix_counts_a_pair_once_per_batch_of_32():
  rng = np.random.default_rng(0)
  num = 32 * 5 + 11  # a last partial batch
  clean = rng.integers(0, 4, num)
  noisy = np.where(rng.random(num) < 0.4, rng.integers(0, 4, num), clean)
  noisy[5] = -1  # an unlabelled sample
  counts, expected = numpy_reference_counts(clean, noisy, 4)
  # Counting is buffered: every class pair that occurs once or more in a batch adds exactly 1.
  explicit = np.zeros((4, 4))
  for start in range(0, num, 32):
    for c, n in {(c, n) for c, n in zip(clean[start:start + 32], noisy[start:start + 32])
                 if c >= 0 and n >= 0}:
      explicit[c, n] += 1
  np.testing.assert_array_equal(counts, explicit)
  assert counts.sum() < (noisy >= 0).sum()  # pairs repeat within batches here
  got = jax.jit(lambda c, n: forward.reference_noise_matrix(c, n, 4))(jnp.asarray(clean),
                                                                     jnp.asarray(noisy))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # The same pair twice in one batch of 32 counts once; in two batches, twice.
  clean = np.zeros(64, int)
  noisy = np.zeros(64, int)
  clean[[0, 1]] = noisy[[0, 1]] = 1              # (1, 1) twice in batch 0
  clean[[2, 40]], noisy[[2, 40]] = 1, 2          # (1, 2) once in each batch
  got = forward.reference_noise_matrix(jnp.asarray(clean), jnp.asarray(noisy), 3)
  counts = np.array([[2.0, 0, 0], [0, 1, 2], [0, 0, 0]])
  counts[2, 2] = 1  # class 2 has no clean samples: identity row
  # numpy's T / T.sum(axis=1): column j divided by the sum of row j (2, 3, 1).
  np.testing.assert_allclose(got, counts / np.array([2.0, 3.0, 1.0])[None, :], rtol=1e-6)
  assert not np.allclose(np.asarray(got).sum(1), 1)  # not row-stochastic, as the reference


def test_method_epochs_phases_and_schedules():
  config = method_checks.toy_config("forward", **{"forward.estimator_epochs": 3,
                                                  "num_epochs": 5,
                                                  "optim.lr_boundaries": (2,)})
  method = methods.get(config)
  assert [(p.name, p.first_epoch, p.selects_best) for p in method.phases] == [
      ("estimator", 0, False), ("forward", 3, True)]
  assert method.total_epochs(config) == 8
  estimator, corrected = method.phases
  assert estimator.learning_rate is None  # the configured schedule
  # The second training's schedule restarts: epoch 3 is its epoch 0, the decay at its epoch 2.
  assert [corrected.learning_rate(e) for e in range(3, 8)] == [
      config_lib.learning_rate_at(config, e) for e in range(5)]
  assert corrected.learning_rate(4) != corrected.learning_rate(5)
  whole = methods.get(method_checks.toy_config("forward", **{"num_epochs": 5}))
  assert whole.phases[1].first_epoch == 5 and whole.total_epochs(config) == 10
  with pytest.raises(ValueError, match="estimator_epochs"):
    methods.get(method_checks.toy_config("forward", **{"forward.estimator_epochs": -1}))
  for name in ("forward_oracle", "forward_reference"):
    variant = methods.get(method_checks.toy_config(name))
    assert [p.name for p in variant.phases] == ["forward"] and variant.num_epochs is None


def kernels(params):
  # The weight matrices and filters (biases may all start at 0 in both networks).
  return [leaf for leaf in jax.tree.leaves(params) if leaf.ndim >= 2]


def test_start_estimates_the_matrix_and_installs_the_fresh_network():
  batch = method_checks.toy_batch(noisy_fraction=0.2)
  method, state, _ = method_checks.toy_state("forward", batch=batch)
  np.testing.assert_array_equal(state.method_state["noise_matrix"], np.eye(3))
  estimator, corrected = method.phases
  # The fresh network is its own initialisation, not the estimator's.
  for new, old in zip(kernels(state.method_state["fresh"]["params"]), kernels(state.params)):
    assert not np.allclose(new, old)
  trained_state, _ = method_checks.run_phase(estimator, state, batch, 5)
  structure = jax.tree.structure(trained_state)
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), trained_state)
  probs = jax.jit(corrected.start_pass)(trained_state, {"image": batch["image"],
                                                         "index": batch["index"]})
  np.testing.assert_allclose(probs, jax.nn.softmax(method.predict(trained_state, batch["image"])),
                             rtol=1e-6)
  started = jax.jit(corrected.start)(trained_state, probs)
  assert jax.tree.structure(started) == structure
  assert jax.tree.map(lambda x: (x.shape, x.dtype), started) == shapes
  fresh = trained_state.method_state["fresh"]
  for field in ("params", "batch_stats", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, getattr(started, field), fresh[field])
  for new, old in zip(kernels(started.params), kernels(trained_state.params)):
    assert not np.allclose(new, old)
  # The fresh optimiser starts with zero momentum; the estimator's had some.
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(started.opt_state.inner_state))
  noise_matrix = np.asarray(started.method_state["noise_matrix"])
  assert noise_matrix.dtype == np.float32 and noise_matrix.shape == (3, 3)
  np.testing.assert_allclose(noise_matrix, numpy_estimator(np.asarray(probs), 97.0), rtol=1e-5)


def test_variants_build_their_matrix_from_the_labels():
  batch = method_checks.toy_batch(noisy_fraction=0.4)
  clean, noisy = np.asarray(batch["clean_label"]), np.asarray(batch["label"])
  _, oracle, _ = method_checks.toy_state("forward_oracle", batch=batch)
  counts = np.zeros((3, 3))
  np.add.at(counts, (clean, noisy), 1)
  np.testing.assert_allclose(oracle.method_state["noise_matrix"],
                             counts / counts.sum(1, keepdims=True), rtol=1e-6)
  _, reference, _ = method_checks.toy_state("forward_reference", batch=batch)
  np.testing.assert_allclose(reference.method_state["noise_matrix"],
                             numpy_reference_counts(clean, noisy, 3)[1], rtol=1e-6)
  # The oracle's loss is the step's.
  step = jax.jit(method_checks.phase_named(methods.get(method_checks.toy_config(
      "forward_oracle", "mlp")), "forward").step)
  method, mlp_state, _ = method_checks.toy_state("forward_oracle", "mlp", batch=batch)
  _, metrics = step(mlp_state, {k: batch[k] for k in ("image", "label", "index")})
  expected = forward.forward_loss(method.predict(mlp_state, batch["image"]), batch["label"],
                                  mlp_state.method_state["noise_matrix"])
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)


@pytest.mark.parametrize("name,phase", [("forward", "estimator"), ("forward_oracle", "forward"),
                                        ("forward_reference", "forward")])
def test_step_lowers_its_own_loss(name, phase):
  method_checks.assert_lowers_own_loss(name, phase)


def test_corrected_phase_lowers_its_own_loss_after_an_estimator():
  """As `method_checks.assert_lowers_own_loss`, but T̂ comes from a trained estimator (an
  untrained one's rows are all alike: a near rank-one T̂ leaves nothing to fit)."""
  batch = method_checks.toy_batch(noisy_fraction=0.2)
  for model in method_checks.MODELS:
    method, state, _ = method_checks.toy_state("forward", model, batch=batch)
    estimator, corrected = method.phases
    state, _ = method_checks.run_phase(estimator, state, batch, 25)
    state = method_checks.begin_phase(method, corrected, state, batch)
    noise_matrix = np.asarray(state.method_state["noise_matrix"])
    np.testing.assert_allclose(noise_matrix.sum(1), 1, rtol=1e-5)
    assert np.all(np.diag(noise_matrix) > 0.5)  # a clean toy: T̂ near the identity
    _, metrics = method_checks.run_phase(corrected, state, batch, 25)
    losses = metrics["loss"]
    assert np.all(np.isfinite(losses)) and losses[-3:].mean() < 0.9 * losses[0], (model, losses)


@pytest.mark.slow
def test_two_trainings_through_the_loop(tmp_path):
  config = tiny_config.with_overrides(tiny_config.get_config(), method="forward",
                                      num_epochs=2, **{"forward.estimator_epochs": 1})
  results = experiment.train_and_evaluate(config, str(tmp_path))
  stored = runtime.read_json(str(tmp_path / runtime.RESULTS_FILE))
  history = stored["history"]
  assert [record["epoch"] for record in history] == [1, 2, 3]
  assert [record["phase"] for record in history] == ["estimator", "forward", "forward"]
  assert results["last"]["epoch"] == 3 and results["best"]["epoch"] in (2, 3)
  state, _ = trained.load_trained_state(str(tmp_path))
  noise_matrix = np.asarray(state.method_state["noise_matrix"])
  assert noise_matrix.shape == (10, 10) and np.all(noise_matrix >= 0)
  np.testing.assert_allclose(noise_matrix.sum(1), 1, rtol=1e-5)
  assert not np.allclose(noise_matrix, np.eye(10))
