"""Joint Optimization (mln_jax/methods/joint_optimization.py): its losses by hand (both variants),
the prediction history and the epoch-end label update (filled slots only, t_begin, once per epoch,
stacked runs), step 2's fresh network, each phase lowering its loss, and an end-to-end run whose
tables survive a kill."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mln_jax import config as config_lib
from mln_jax import experiment, methods, steps, trained
from mln_jax.methods import joint_optimization as jo

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import method_checks  # noqa: E402
import tiny_config  # noqa: E402

# Step 1 of two epochs, labels updated after each (window 2); step 2 from epoch 2.
SHORT = {"joint_optimization.step1_epochs": 2, "joint_optimization.label_start_epoch": 1,
         "joint_optimization.window": 2}

LOGITS = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 1.5]])
TARGETS = np.array([[0.7, 0.2, 0.1], [0.0, 0.0, 1.0]])


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_step1_losses_by_hand():
  p = _softmax(LOGITS)
  classification = -(0.7 * np.log(p[0, 0]) + 0.2 * np.log(p[0, 1]) + 0.1 * np.log(p[0, 2])
                     + np.log(p[1, 2])) / 2
  np.testing.assert_allclose(jo.soft_cross_entropy(LOGITS, TARGETS), classification, rtol=1e-5)
  mean_p = (p[0] + p[1]) / 2
  prior = sum((1 / 3) * np.log((1 / 3) / mean_p[c]) for c in range(3))
  np.testing.assert_allclose(jo.prior_loss(LOGITS), prior, rtol=1e-5)
  entropy = -(np.sum(p[0] * np.log(p[0])) + np.sum(p[1] * np.log(p[1]))) / 2
  np.testing.assert_allclose(jo.prediction_entropy(LOGITS), entropy, rtol=1e-5)
  total, parts = jo.step1_loss(LOGITS, TARGETS, 1.2, 0.8)
  np.testing.assert_allclose(total, classification + 1.2 * prior + 0.8 * entropy, rtol=1e-5)
  np.testing.assert_allclose(parts, (classification, prior, entropy), rtol=1e-5)
  # The prior term vanishes when the batch's mean prediction is uniform.
  np.testing.assert_allclose(jo.prior_loss(np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])),
                             0.0, atol=1e-6)
  # Finite where a class's mean prediction underflows float32: log p̄_c = −200 − log 1.
  np.testing.assert_allclose(jo.prior_loss(np.array([[200.0, 0, 0], [200.0, 0, 0]])),
                             (-np.log(3) * 3 + 400) / 3, rtol=1e-5)


def test_reference_loss_by_hand():
  p = _softmax(LOGITS)
  labels = np.array([0, 2])
  ce = -(np.log(p[0, 0]) + np.log(p[1, 2])) / 2
  mean_p = p.mean(0)
  prior = -np.mean(np.log(mean_p))
  # log_softmax of the probabilities: lse(p_i) − Σ_c p_ic².
  entropy = np.mean([np.log(np.exp(p[i]).sum()) - np.sum(p[i] ** 2) for i in range(2)])
  np.testing.assert_allclose(jo.reference_loss(LOGITS, labels, 1.2, 0.8),
                             ce + 1.2 * prior + 0.8 * entropy, rtol=1e-5)
  # 2.30 (= log 10) at a uniform prediction, 1.46 at a one-hot one, for C = 10 (BASELINES.md).
  for logits, value in ((np.zeros((1, 10)), np.log(10)), (np.array([[20.0] + [0.0] * 9]), 1.4612)):
    entropy_only = jo.reference_loss(logits, np.array([0]), 0.0, 1.0) - jo.reference_loss(
        logits, np.array([0]), 0.0, 0.0)
    np.testing.assert_allclose(entropy_only, value, rtol=1e-3)


def test_initial_labels_one_hot_or_uniform():
  np.testing.assert_array_equal(jo.initial_labels(jnp.array([2, -1, 0]), 3),
                                np.array([[0, 0, 1], [1 / 3, 1 / 3, 1 / 3], [1, 0, 0]], np.float32))


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _state(batch=None, **overrides):
  batch = method_checks.toy_batch(noisy_fraction=0.2) if batch is None else batch
  return method_checks.toy_state("joint_optimization", batch=batch, **{**SHORT, **overrides})


def test_initial_state_and_phases():
  batch = method_checks.toy_batch(noisy_fraction=0.2)
  method, state, config = _state(batch, num_epochs=3)
  table = state.method_state
  np.testing.assert_array_equal(table["labels"], np.eye(3)[np.asarray(batch["label"])])
  assert table["labels"].dtype == jnp.float32 and table["history"].dtype == jnp.float32
  assert table["history"].shape == (2, 32, 3) and not np.any(table["filled"])
  assert method.num_epochs == 5 and method.total_epochs(config) == 5
  step1, step2 = method.phases
  assert [(p.name, p.first_epoch, p.selects_best) for p in method.phases] == [
      ("step 1", 0, False), ("step 2", 2, True)]
  assert [step1.learning_rate(e) for e in (0, 1)] == [0.01, 0.01]
  assert [step2.learning_rate(e) for e in (2, 3, 4)] == [
      config_lib.learning_rate_at(config, e) for e in (0, 1, 2)]
  assert step1.soft_labels is step2.soft_labels is jo.soft_labels
  # The fresh network differs from the step-1 classifier (its own key).
  assert not np.allclose(_flat(table["other_network"]["params"]), _flat(state.params))
  reference = methods.get(method_checks.toy_config("joint_optimization_reference"))
  assert [(p.name, p.soft_labels) for p in reference.phases] == [("joint optimization", None)]
  assert reference.num_epochs is None
  for bad in ({"joint_optimization.label_start_epoch": 0},
              {"joint_optimization.label_start_epoch": 3},
              {"joint_optimization.window": 0}):
    with pytest.raises(ValueError, match="joint_optimization"):
      methods.get(method_checks.toy_config("joint_optimization", **{**SHORT, **bad}))


def test_step1_writes_the_epoch_slot_at_the_batch_ids():
  full = method_checks.toy_batch(noisy_fraction=0.2)
  method, state, _ = _state(full)
  phase = method.phases[0]
  state = method.begin_epoch(state, 1, 0.05)  # epoch 1 writes slot 1 of 2
  assert int(state.method_state["slot"]) == 1
  index = jnp.asarray(np.random.default_rng(0).permutation(32)[:16], jnp.int32)
  batch = {k: full[k][index] for k in ("image", "label")} | {"index": index}
  logits, _ = steps.forward_train(state, state.params, batch["image"])
  new_state, metrics = jax.jit(phase.step)(state, batch)
  history = np.asarray(new_state.method_state["history"])
  filled = np.asarray(new_state.method_state["filled"])
  ids = np.asarray(index)
  np.testing.assert_allclose(history[1, ids], jax.nn.softmax(logits), rtol=1e-5, atol=1e-7)
  others = np.setdiff1d(np.arange(32), ids)
  assert np.all(history[1, others] == 0) and np.all(history[0] == 0)
  assert filled[1, ids].all() and not filled[1, others].any() and not filled[0].any()
  # The step does not touch the labels; its loss is step1_loss against them.
  np.testing.assert_array_equal(new_state.method_state["labels"], state.method_state["labels"])
  expected, _ = jo.step1_loss(logits, state.method_state["labels"][index], 1.2, 0.8)
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)


def _random_tables(seed=0, window=3, num=12, num_classes=4):
  rng = np.random.default_rng(seed)
  history = _softmax(rng.normal(size=(window, num, num_classes))).astype(np.float32)
  filled = rng.random((window, num)) < 0.5
  filled[:, :3] = False  # three samples no epoch of the window has seen
  filled[0, 3] = True
  labels = _softmax(rng.normal(size=(num, num_classes))).astype(np.float32)
  return labels, history, filled


def _numpy_update(labels, history, filled):
  expected = labels.copy()
  for n in range(labels.shape[0]):
    slots = [w for w in range(history.shape[0]) if filled[w, n]]
    if slots:
      expected[n] = np.mean([history[w, n] for w in slots], axis=0)
  return expected


def _with_tables(state, labels, history, filled, began=-1):
  return state.replace(method_state={
      **state.method_state, "labels": jnp.asarray(labels), "history": jnp.asarray(history),
      "filled": jnp.asarray(filled), "began": jnp.asarray(began, jnp.int32)})


def test_label_update_averages_filled_slots_from_t_begin_to_step_2():
  labels, history, filled = _random_tables()
  begin = lambda state, epoch: jo.begin_epoch(state, epoch, 0.05, window=3, label_start_epoch=4,
                                              step1_epochs=6)
  _, base, _ = _state()
  expected = _numpy_update(labels, history, filled)
  assert not np.allclose(expected[3:], labels[3:])
  for epoch in range(9):
    state = begin(_with_tables(base, labels, history, filled), epoch)
    table = {k: np.asarray(v) for k, v in state.method_state.items() if k != "other_network"}
    if 4 <= epoch <= 6:  # after 1-based epochs 4..6 (t_begin = 4, step 1 = 6 epochs)
      np.testing.assert_allclose(table["labels"], expected, rtol=1e-6)
      np.testing.assert_array_equal(table["labels"][:3], labels[:3])  # no prediction: unchanged
    else:
      np.testing.assert_array_equal(table["labels"], labels)
    if epoch < 6:  # a step-1 epoch: its slot emptied and written next
      assert int(table["slot"]) == epoch % 3
      assert not table["filled"][epoch % 3].any()
      kept = [w for w in range(3) if w != epoch % 3]
      np.testing.assert_array_equal(table["filled"][kept], filled[kept])
    else:  # step 2: the history stays as step 1 left it
      np.testing.assert_array_equal(table["filled"], filled)
    np.testing.assert_array_equal(table["history"], history)
    assert int(table["began"]) == epoch
    np.testing.assert_allclose(state.opt_state.hyperparams["learning_rate"], 0.05)
    # Begun again (a run resumed inside the epoch): nothing changes.
    again = begin(state, epoch)
    jax.tree.map(np.testing.assert_array_equal, again.method_state, state.method_state)


def test_label_update_on_a_state_stacked_over_runs():
  method, base, _ = _state()
  runs = [_random_tables(seed, window=2) for seed in (1, 2)]
  singles = [method.begin_epoch(_with_tables(base, *tables), 2, 0.05) for tables in runs]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *[_with_tables(base, *t) for t in runs])
  stacked = method.begin_epoch(stacked, 2, 0.05)
  for index, single in enumerate(singles):
    jax.tree.map(lambda s, x: np.testing.assert_array_equal(x[index], s), single.method_state,
                 stacked.method_state)
  assert not np.array_equal(singles[0].method_state["labels"], runs[0][0])


def test_step2_enter_installs_the_fresh_network():
  method, state, _ = _state()
  step2 = method.phases[1]
  fresh = state.method_state["other_network"]
  entered = step2.enter(state, True)
  for name in ("params", "batch_stats", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, getattr(entered, name), fresh[name])
    jax.tree.map(np.testing.assert_array_equal, entered.method_state["other_network"][name],
                 getattr(state, name))
  assert jax.tree.structure(entered) == jax.tree.structure(state)
  # No buffer held twice (the loop donates the state).
  leaves = jax.tree.leaves(entered)
  assert len({id(x) for x in leaves}) == len(leaves)
  assert step2.enter(state, False) is state  # resumed inside step 2: already swapped
  # Step 2 trains the installed network on Y of the batch.
  batch = method_checks.toy_batch(noisy_fraction=0.2)
  logits, _ = steps.forward_train(entered, entered.params, batch["image"])
  _, metrics = jax.jit(step2.step)(entered, {k: batch[k] for k in ("image", "label", "index")})
  np.testing.assert_allclose(metrics["loss"], jo.soft_cross_entropy(
      logits, entered.method_state["labels"][batch["index"]]), rtol=1e-5)


@pytest.mark.parametrize("method_name,phase_name", [
    ("joint_optimization", "step 1"), ("joint_optimization", "step 2"),
    ("joint_optimization_reference", "joint optimization")])
def test_each_phase_lowers_its_own_loss(method_name, phase_name):
  method_checks.assert_lowers_own_loss(method_name, phase_name, **SHORT)


@pytest.mark.slow
def test_end_to_end_tables_survive_a_kill_and_follow_each_runs_labels(tmp_path, monkeypatch):
  config = tiny_config.with_overrides(tiny_config.get_config(), method="joint_optimization",
                                      num_runs=2, num_epochs=2, **SHORT)
  uninterrupted = experiment.run(config, str(tmp_path / "a"))["joint_optimization"]
  # Killed inside step 2's second epoch: the restored state holds the swapped networks.
  tiny_config.run_killed(monkeypatch, lambda: experiment.run(config, str(tmp_path / "b")), epoch=3)
  resumed = experiment.run(config, str(tmp_path / "b"))["joint_optimization"]
  history = uninterrupted[0]["history"]
  assert [h["phase"] for h in history] == ["step 1"] * 2 + ["step 2"] * 2
  assert [h["learning_rate"] for h in history] == [0.01, 0.01] + [
      config_lib.learning_rate_at(config, e) for e in (0, 1)]
  labels_of_runs = []
  for index, (run_a, run_b) in enumerate(zip(uninterrupted, resumed)):
    run_dir = tmp_path / "a" / f"run_{index}"
    state, _ = trained.load_trained_state(str(run_dir))
    state_b, _ = trained.load_trained_state(str(tmp_path / "b" / f"run_{index}"))
    jax.tree.map(np.testing.assert_array_equal, state.method_state, state_b.method_state)
    jax.tree.map(np.testing.assert_array_equal, state.params, state_b.params)
    assert run_b["history"][-1]["train/loss"] == run_a["history"][-1]["train/loss"]
    assert run_a["best"]["epoch"] >= 3  # selected in step 2
    table = {k: np.asarray(v) for k, v in state.method_state.items() if k != "other_network"}
    noisy = np.load(run_dir / "labels.npz")["noisy"]
    # Both step-1 epochs visited all but the last partial batch's samples.
    steps_per_epoch = history[0]["steps"]
    assert list(table["filled"].sum(1)) == [steps_per_epoch * config.batch_size] * 2
    # The final Y: each sample's mean over the slots that hold it, else its own given label.
    seen = table["filled"].any(0)
    assert 0 < (~seen).sum() < config.batch_size
    expected = _numpy_update(np.eye(10, dtype=np.float32)[noisy], table["history"],
                             table["filled"])
    np.testing.assert_allclose(table["labels"], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(table["labels"][~seen], np.eye(10)[noisy[~seen]])
    np.testing.assert_allclose(table["labels"].sum(1), 1.0, rtol=1e-5)
    # The classifier is step 2's network, not step 1's (kept in method_state).
    assert not np.allclose(_flat(state.params),
                           _flat(state.method_state["other_network"]["params"]))
    labels_of_runs.append(table["labels"])
    issues = json.loads((run_dir / "results.json").read_text())["label_issues"]
    assert issues is not None and 0 <= issues["argmax_recall"] <= 1
    assert "top_k_precision" in issues
  assert not np.array_equal(*labels_of_runs)
