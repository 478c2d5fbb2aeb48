"""PENCIL (mln_jax/methods/pencil.py): its losses by hand, the closed-form label gradient against
autodiff, the stage-2 table update (exactly the batch's rows, by −λ·∇), each phase lowering its
loss, and an end-to-end run whose tables survive a kill and follow each run's own labels."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mln_jax import experiment, methods, steps, trained
from mln_jax.methods import pencil

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import method_checks  # noqa: E402
import tiny_config  # noqa: E402

# Stages at small epochs, so the toy harness begins each phase where it starts.
STAGES = {"pencil.stage2_epoch": 1, "pencil.stage3_epoch": 2}

LOGITS = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 1.5]])
LABEL_LOGITS = np.array([[1.0, 0.0, 0.0], [0.0, 3.0, -2.0]])
LABELS = np.array([0, 2])


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_losses_by_hand():
  p, yd = _softmax(LOGITS), _softmax(LABEL_LOGITS)
  # L_c: all B·C = 6 entries of p (log p − log y^d), averaged.
  l_c = sum(p[i, c] * (np.log(p[i, c]) - np.log(yd[i, c])) for i in range(2) for c in range(3)) / 6
  np.testing.assert_allclose(pencil.classification_loss(LOGITS, LABEL_LOGITS), l_c, rtol=1e-5)
  # L_o: −log y^d of the given label, averaged over B = 2.
  l_o = -(np.log(yd[0, 0]) + np.log(yd[1, 2])) / 2
  np.testing.assert_allclose(pencil.compatibility_loss(LABEL_LOGITS, LABELS), l_o, rtol=1e-5)
  # An unlabelled sample adds nothing but still counts in B.
  np.testing.assert_allclose(pencil.compatibility_loss(LABEL_LOGITS, np.array([0, -1])),
                             -np.log(yd[0, 0]) / 2, rtol=1e-5)
  l_e = -np.sum(p * np.log(p)) / 6
  np.testing.assert_allclose(pencil.entropy_loss(LOGITS), l_e, rtol=1e-5)
  total, parts = pencil.label_learning_loss(LOGITS, LABEL_LOGITS, LABELS, 0.1, 0.8)
  np.testing.assert_allclose(total, l_c + 0.1 * l_o + 0.8 * l_e, rtol=1e-5)
  np.testing.assert_allclose(parts, (l_c, l_o, l_e), rtol=1e-5)


def test_reference_compatibility_loss_applies_log_softmax_to_probabilities():
  yd = _softmax(LABEL_LOGITS)
  per_sample = [np.log(np.exp(yd[i]).sum()) - yd[i, LABELS[i]] for i in range(2)]
  np.testing.assert_allclose(pencil.reference_compatibility_loss(LABEL_LOGITS, LABELS),
                             np.mean(per_sample), rtol=1e-5)
  # Bounded by lse of a one-hot, log(C − 1 + e) ≈ 1.55: below the paper's −log y^d of a wrong label.
  wrong = np.array([2, 0])
  assert pencil.reference_compatibility_loss(LABEL_LOGITS, wrong) < 1.6
  assert pencil.compatibility_loss(LABEL_LOGITS, wrong) > 2.0


def test_closed_form_label_gradient_equals_autodiff():
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    logits = jax.random.normal(keys[0], (6, 4), jnp.float64) * 2
    label_logits = jax.random.normal(keys[1], (6, 4), jnp.float64) * 3
    labels = jnp.array([0, 3, 1, -1, 2, 2])
    autodiff = jax.grad(lambda y: pencil.label_learning_loss(logits, y, labels, 0.4, 0.1)[0])(
        label_logits)
    closed = pencil.label_logits_gradient(logits, label_logits, labels, 0.4)
    assert float(jnp.abs(closed).max()) > 1e-3
    np.testing.assert_allclose(closed, autodiff, rtol=1e-12, atol=1e-15)
    # L_e does not depend on the labels: β changes nothing.
    autodiff_b = jax.grad(lambda y: pencil.label_learning_loss(logits, y, labels, 0.4, 5.0)[0])(
        label_logits)
    np.testing.assert_allclose(autodiff_b, autodiff, rtol=1e-12)


def test_initial_table_is_k_one_hot_of_the_given_labels():
  batch = method_checks.toy_batch(noisy_fraction=0.3)
  batch["label"] = batch["label"].at[5].set(-1)
  _, state, _ = method_checks.toy_state("pencil", batch=batch, **{"pencil.k": 7.0}, **STAGES)
  table = np.asarray(state.method_state["label_logits"])
  assert table.dtype == np.float32 and table.shape == (32, 3)
  expected = 7.0 * np.eye(3)[np.asarray(batch["label"])]
  expected[5] = 0.0  # unlabelled: uniform y^d
  np.testing.assert_array_equal(table, expected)


def _stage2_step_checks(method_name, loss_of_rows):
  """A stage-2 step on half the samples, shuffled: those rows move by exactly −λ·∇ (∇ from
  autodiff of `loss_of_rows(logits, rows, labels)` at the step's own forward), all others stay
  bit-identical, and θ takes a step."""
  full = method_checks.toy_batch(noisy_fraction=0.2)
  method, state, config = method_checks.toy_state(method_name, batch=full, **STAGES)
  phase = method_checks.phase_named(method, "label learning")
  state = method_checks.begin_phase(method, phase, state, full)
  # Move the table off K·e_ỹ first, so the check is not at a special point.
  state = state.replace(method_state={"label_logits": state.method_state["label_logits"]
                                      + 4.0 * jax.random.normal(jax.random.PRNGKey(3), (32, 3))})
  index = jnp.asarray(np.random.default_rng(0).permutation(32)[:16], jnp.int32)
  batch = {k: full[k][index] for k in ("image", "label")} | {"index": index}
  table = np.asarray(state.method_state["label_logits"])
  rows = jnp.asarray(table[np.asarray(index)])
  logits, _ = steps.forward_train(state, state.params, batch["image"])  # the step's own forward
  grad = jax.grad(lambda y: loss_of_rows(logits, y, batch["label"]))(rows)

  new_state, metrics = jax.jit(phase.step)(state, batch)
  new_table = np.asarray(new_state.method_state["label_logits"])
  others = np.setdiff1d(np.arange(32), np.asarray(index))
  np.testing.assert_array_equal(new_table[others], table[others])
  assert np.all(np.abs(new_table[np.asarray(index)] - table[np.asarray(index)]).max(1) > 1e-3)
  np.testing.assert_allclose(new_table[np.asarray(index)] - table[np.asarray(index)],
                             -config.pencil.label_lr * np.asarray(grad), rtol=2e-4, atol=1e-5)
  assert int(new_state.step) == int(state.step) + 1
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  assert not np.allclose(flat(new_state.params), flat(state.params))
  for name in ("loss", "classification_loss", "compatibility_loss", "entropy_loss"):
    assert np.isfinite(metrics[name])
  return config, logits, rows, batch, grad


def test_stage2_step_updates_exactly_the_batch_rows_by_the_closed_form():
  config, logits, rows, batch, grad = _stage2_step_checks(
      "pencil", lambda z, y, labels: pencil.label_learning_loss(z, y, labels, 0.1, 0.8)[0])
  closed = pencil.label_logits_gradient(logits, rows, batch["label"], config.pencil.alpha)
  np.testing.assert_allclose(closed, grad, rtol=1e-4, atol=1e-7)


def test_reference_stage2_step_descends_the_reference_loss():
  _, logits, rows, batch, grad = _stage2_step_checks(
      "pencil_reference", lambda z, y, labels: pencil.label_learning_loss(
          z, y, labels, 0.1, 0.8, pencil.reference_compatibility_loss)[0])
  published = pencil.label_logits_gradient(logits, rows, batch["label"], 0.1)
  assert not np.allclose(published, grad, rtol=1e-2)  # a different L_o, a different gradient


@pytest.mark.parametrize("phase_name", ["cross-entropy", "frozen labels"])
def test_stages_1_and_3_leave_the_table_alone(phase_name):
  batch = method_checks.toy_batch(noisy_fraction=0.2)
  method, state, _ = method_checks.toy_state("pencil", batch=batch, **STAGES)
  phase = method_checks.phase_named(method, phase_name)
  state = method_checks.begin_phase(method, phase, state, batch)
  new_state, _ = method_checks.run_phase(phase, state, batch, 2)
  np.testing.assert_array_equal(new_state.method_state["label_logits"],
                                state.method_state["label_logits"])


def test_frozen_stage_loss_is_l_c_against_the_table():
  batch = method_checks.toy_batch(noisy_fraction=0.2)
  method, state, _ = method_checks.toy_state("pencil", batch=batch, **STAGES)
  phase = method_checks.phase_named(method, "frozen labels")
  state = method_checks.begin_phase(method, phase, state, batch)
  logits, _ = steps.forward_train(state, state.params, batch["image"])
  _, metrics = jax.jit(phase.step)(state, {k: batch[k] for k in ("image", "label", "index")})
  p = _softmax(np.asarray(logits, np.float64))
  yd = _softmax(np.asarray(state.method_state["label_logits"], np.float64))
  np.testing.assert_allclose(metrics["loss"], np.mean(p * (np.log(p) - np.log(yd))), rtol=1e-4)


def test_phases_and_settings():
  config = method_checks.toy_config("pencil", num_epochs=5, **STAGES)
  method = methods.get(config)
  assert [(p.name, p.first_epoch, p.selects_best) for p in method.phases] == [
      ("cross-entropy", 0, True), ("label learning", 1, True), ("frozen labels", 2, True)]
  assert method.phases[0].soft_labels is None
  assert method.phases[1].soft_labels is method.phases[2].soft_labels is pencil.soft_labels
  assert methods.get(method_checks.toy_config("pencil_reference", **STAGES)).name == (
      "pencil_reference")
  # Stage 3 may start after the last epoch (never reached); stage 2 may not.
  assert methods.get(method_checks.toy_config("pencil", num_epochs=2, **STAGES)).phase_at(1).name \
      == "label learning"
  for bad in ({"pencil.stage2_epoch": 0}, {"pencil.stage3_epoch": 1},
              {"pencil.stage2_epoch": 5, "pencil.stage3_epoch": 6}):
    with pytest.raises(ValueError, match="stage2_epoch"):
      methods.get(method_checks.toy_config("pencil", num_epochs=5, **{**STAGES, **bad}))


def test_soft_labels_are_the_softmax_of_the_rows():
  batch = method_checks.toy_batch()
  _, state, _ = method_checks.toy_state("pencil", batch=batch, **STAGES)
  index = jnp.array([4, 0, 31], jnp.int32)
  np.testing.assert_allclose(pencil.soft_labels(state, {"image": batch["image"][index],
                                                        "index": index}),
                             _softmax(10.0 * np.eye(3)[np.asarray(batch["label"])[[4, 0, 31]]]),
                             rtol=1e-6)


@pytest.mark.parametrize("method_name", ["pencil", "pencil_reference"])
@pytest.mark.parametrize("phase_name", ["cross-entropy", "label learning", "frozen labels"])
def test_each_phase_lowers_its_own_loss(method_name, phase_name):
  method_checks.assert_lowers_own_loss(method_name, phase_name, **STAGES)


@pytest.mark.slow
def test_end_to_end_tables_survive_a_kill_and_follow_each_runs_labels(tmp_path, monkeypatch):
  config = tiny_config.with_overrides(tiny_config.get_config(), method="pencil", num_runs=2,
                                      num_epochs=3, **STAGES)
  uninterrupted = experiment.run(config, str(tmp_path / "a"))["pencil"]
  tiny_config.run_killed(monkeypatch, lambda: experiment.run(config, str(tmp_path / "b")), epoch=2)
  resumed = experiment.run(config, str(tmp_path / "b"))["pencil"]
  assert [h["phase"] for h in uninterrupted[0]["history"]] == [
      "cross-entropy", "label learning", "frozen labels"]
  steps_per_epoch = uninterrupted[0]["history"][1]["steps"]
  tables = []
  for index, (run_a, run_b) in enumerate(zip(uninterrupted, resumed)):
    run_dir = tmp_path / "a" / f"run_{index}"
    state, _ = trained.load_trained_state(str(run_dir))
    state_b, _ = trained.load_trained_state(str(tmp_path / "b" / f"run_{index}"))
    jax.tree.map(np.testing.assert_array_equal, state.method_state, state_b.method_state)
    assert run_b["history"][-1]["train/loss"] == run_a["history"][-1]["train/loss"]
    table = np.asarray(state.method_state["label_logits"])
    labels = np.load(run_dir / "labels.npz")["noisy"]
    initial = config.pencil.k * np.eye(table.shape[1])[labels]
    unchanged = np.all(table == initial, axis=1)
    # One stage-2 epoch visited steps·B distinct samples and moved each of their rows; the last
    # partial batch's samples kept K·e_ỹ of this run's own labels.
    assert (~unchanged).sum() == steps_per_epoch * config.batch_size
    assert 0 < unchanged.sum() < config.batch_size
    tables.append(table)
    results = json.loads((run_dir / "results.json").read_text())
    issues = results["label_issues"]
    assert issues is not None and 0 <= issues["argmax_precision"] <= 1
    assert 0 <= issues["argmax_recall"] <= 1 and "top_k_precision" in issues
    soft = np.load(run_dir / "soft_labels.npz")
    assert len(soft.files) > 0
  labels_0, labels_1 = (np.load(tmp_path / "a" / f"run_{i}" / "labels.npz")["noisy"]
                        for i in (0, 1))
  assert (labels_0 != labels_1).any() and not np.array_equal(tables[0], tables[1])
