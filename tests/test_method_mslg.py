"""MSLG (mln_jax.methods.mslg): its loss, table, exact meta-gradients, the step's table update and
BN statistics, both variants' phases, and an end-to-end run with kill/resume over two runs."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_checks as mc
import tiny_config
from mln_jax import experiment, steps, trained
from mln_jax.methods import mslg

ALPHA = 0.5


@functools.lru_cache(maxsize=None)  # states are immutable: tests may share them
def _toy(name="mslg", model="conv_bn", num=48):
  """(method, state, config, full batch) of `num` toy samples (labels 20% noisy)."""
  batch = mc.toy_batch(num=num, noisy_fraction=0.2)
  method, state, config = mc.toy_state(name, model, batch=batch, warmup_epochs=1)
  return method, state, config, batch


def _autodiff_rows_gradient(state, images, meta_batch, rows, inner_lr):
  """∂L_meta/∂rows by steps.meta_gradient_autodiff, jitted (op by op it is slow on CPU)."""
  return jax.jit(lambda r: steps.meta_gradient_autodiff(
      state, images, meta_batch, r, mslg.inner_loss_of, learning_rate=inner_lr)[:3])(rows)


def _sub_batch(batch, index):
  """The samples `index` of `batch` as a training batch (image, label, index = their ids)."""
  index = np.asarray(index)
  return {"image": batch["image"][index], "label": batch["label"][index],
          "index": jnp.asarray(index, jnp.int32)}


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_classification_loss_matches_hand_computed_values():
  logits = jnp.array([[0.0, 0.0, 0.0], [np.log(3.0), 0.0, np.log(2.0)]])  # p: 1/3s; .5 1/6 1/3
  soft = jnp.array([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0]])  # zeros: log(0 + 1e-10)
  p = np.array([[1 / 3, 1 / 3, 1 / 3], [0.5, 1 / 6, 1 / 3]])
  y = np.array([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0]])
  expected = sum(p[i, c] * (np.log(p[i, c]) - np.log(y[i, c] + 1e-10))
                 for i in range(2) for c in range(3)) / 6
  np.testing.assert_allclose(mslg.classification_loss(logits, soft), expected, rtol=1e-6)
  # Zero at ŷ = p (up to the 1e-10), large where ŷ has no mass where p has.
  assert abs(float(mslg.classification_loss(logits, jax.nn.softmax(logits)))) < 1e-6
  assert float(mslg.classification_loss(logits, soft)) > 3.0


def test_initial_table_is_k_times_one_hot_and_zero_for_unlabelled():
  table = mslg.initial_table(jnp.array([2, 0, -1, 1]), 3, 10.0)
  np.testing.assert_array_equal(table, [[0, 0, 10], [10, 0, 0], [0, 0, 0], [0, 10, 0]])
  assert table.dtype == jnp.float32


def test_init_state_tables_of_both_variants():
  _, state, config, batch = _toy("mslg")
  labels = np.asarray(batch["label"])
  expected = np.zeros((48, 3), np.float32)
  expected[np.arange(48), labels] = config.mslg.k
  np.testing.assert_array_equal(state.method_state[mslg.TABLE], expected)
  _, ref_state, _, _ = _toy("mslg_reference")
  np.testing.assert_array_equal(ref_state.method_state[mslg.TABLE], np.zeros((48, 3)))


def test_phases_follow_the_warmup_length():
  method, _, config, batch = _toy("mslg")
  warmup, label_phase = method.phases
  assert (warmup.name, warmup.first_epoch, warmup.selects_best, warmup.uses_meta) == (
      "warm-up", 0, False, False)
  assert warmup.step is steps.warmup_step
  assert (label_phase.name, label_phase.first_epoch, label_phase.uses_meta,
          label_phase.trains_on, label_phase.selects_best) == ("mslg", 1, True, "labelled", True)
  # Soft labels are the table's softmax at the batch's ids, in the batch's order.
  _, state, _, _ = _toy("mslg")
  table = jax.random.normal(jax.random.PRNGKey(0), (48, 3))
  state = state.replace(method_state={mslg.TABLE: table})
  index = jnp.array([7, 0, 31])
  np.testing.assert_allclose(label_phase.soft_labels(state, {"image": batch["image"][index],
                                                             "index": index}),
                             _softmax(np.asarray(table)[[7, 0, 31]]), rtol=1e-6)
  no_warmup = mslg.method(tiny_config.with_overrides(config, warmup_epochs=0))
  assert [p.name for p in no_warmup.phases] == ["mslg"]
  with pytest.raises(ValueError, match="warmup_epochs"):
    mslg.method(tiny_config.with_overrides(config, warmup_epochs=config.num_epochs))


def _meta_objective(state, images, meta_batch, rows, inner_lr):
  """L_meta(θ − α ∇θ L_c(θ, softmax(rows))) as an explicit function of the rows, L_c written out."""
  def inner_loss(logits):
    log_p = jax.nn.log_softmax(logits)
    return jnp.mean(jnp.exp(log_p) * (log_p - jnp.log(jax.nn.softmax(rows) + 1e-10)))
  fast = steps.inner_update(state, images, inner_loss, inner_lr)
  return steps.meta_loss(state, fast, meta_batch)[0]


def _float64_problem(model, batch_size=8, scale=2.0):
  """A float64 toy state, training images, meta batch and label-logit rows."""
  # Not the cache: a state made with x64 enabled must not reach the float32 tests.
  _, state, _, batch = _toy.__wrapped__("mslg", model, num=batch_size)
  state = mc.as_float64(state)
  meta = mc.toy_batch(num=batch_size, seed=1)
  meta_batch = {"image": meta["image"].astype(jnp.float64), "label": meta["label"]}
  rows = scale * jax.random.normal(jax.random.PRNGKey(3), (batch_size, 3), jnp.float64)
  return state, batch["image"].astype(jnp.float64), meta_batch, rows


@pytest.mark.parametrize("model", ["conv_bn", "mlp"])
def test_meta_gradient_matches_finite_differences_float64(model):
  with jax.enable_x64(True):
    state, images, meta_batch, rows = _float64_problem(model)
    assert state.inner_lr != ALPHA  # the step size must come from the argument, not the state
    _, grads, _ = _autodiff_rows_gradient(state, images, meta_batch, rows, ALPHA)
    objective = jax.jit(lambda r: _meta_objective(state, images, meta_batch, r, ALPHA))
    assert grads.shape == rows.shape and grads.dtype == jnp.float64
    eps = 1e-5
    for seed in range(3):
      direction = jax.random.normal(jax.random.PRNGKey(10 + seed), rows.shape, jnp.float64)
      numeric = (objective(rows + eps * direction) - objective(rows - eps * direction)) / (2 * eps)
      analytic = jnp.vdot(grads, direction)
      assert abs(float(analytic)) > 1e-8  # a vanishing gradient would make the check empty
      np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("model", ["conv_bn", "mlp"])
def test_closed_form_meta_gradient_equals_autodiff(model):
  with jax.enable_x64(True):
    state, images, meta_batch, rows = _float64_problem(model)
    loss_a, grads_a, logits_a = _autodiff_rows_gradient(state, images, meta_batch, rows, ALPHA)
    loss_c, grads_c, logits_c = jax.jit(lambda r: mslg.meta_gradient_closed_form(
        state, images, meta_batch, r, ALPHA))(rows)
    np.testing.assert_allclose(loss_c, loss_a, rtol=1e-12)
    np.testing.assert_allclose(logits_c, logits_a, rtol=1e-12)
    np.testing.assert_allclose(grads_c, grads_a, rtol=1e-9, atol=1e-15)
    assert np.abs(grads_a).max() > 1e-6
  # float32, with very peaked rows (ŷ underflows to 0): the same to rounding, and finite.
  _, state, _, batch = _toy("mslg", model, num=8)
  meta_batch = mc.toy_batch(num=8, seed=1)
  closed_form = jax.jit(lambda r: mslg.meta_gradient_closed_form(
      state, batch["image"], meta_batch, r, ALPHA))
  for scale in (2.0, 200.0):
    rows = scale * jax.random.normal(jax.random.PRNGKey(3), (8, 3))
    _, grads_a, _ = _autodiff_rows_gradient(state, batch["image"], meta_batch, rows, ALPHA)
    _, grads_c, _ = closed_form(rows)
    assert np.all(np.isfinite(grads_c))
    np.testing.assert_allclose(grads_c, grads_a, rtol=1e-3,
                               atol=1e-5 * float(np.abs(grads_a).max()) + 1e-12)


def _one_step(name, model="conv_bn", table=None):
  """A label-phase step on 16 of 48 samples, in shuffled order: (config, state before, state
  after, metrics, sub-batch, meta batch)."""
  method, state, config, batch = _toy(name, model)
  if table is not None:
    state = state.replace(method_state={mslg.TABLE: table})
  phase = mc.phase_named(method, "mslg")
  state = mc.begin_phase(method, phase, state, batch)
  index = np.random.default_rng(0).permutation(48)[:16]
  sub = _sub_batch(batch, index)
  meta = mc.toy_batch(num=16, seed=1)
  meta_batch = {"image": meta["image"], "label": meta["label"]}
  new_state, metrics = jax.jit(phase.step)(state, sub, meta_batch)
  return config, state, new_state, metrics, sub, meta_batch


@pytest.mark.parametrize("model", ["conv_bn", "mlp"])
def test_step_moves_only_the_batch_rows_by_the_meta_gradient(model):
  config, state, new_state, metrics, sub, meta_batch = _one_step("mslg", model)
  old, new = (np.asarray(s.method_state[mslg.TABLE]) for s in (state, new_state))
  index = np.asarray(sub["index"])
  others = np.setdiff1d(np.arange(48), index)
  np.testing.assert_array_equal(new[others], old[others])  # bit-identical
  _, grads, _ = _autodiff_rows_gradient(state, sub["image"], meta_batch, jnp.asarray(old[index]),
                                        config.mslg.inner_lr)
  grads = np.asarray(grads)
  assert np.abs(grads).max() > 0
  beta = config.mslg.label_lr
  np.testing.assert_allclose((new[index] - old[index]) / -beta, grads, rtol=1e-4,
                             atol=1e-5 * np.abs(grads).max())
  # The reported loss is L_c on the updated soft labels + γ·entropy, on θ's train-mode logits.
  logits, _ = steps.forward_train(state, state.params, sub["image"])
  p = _softmax(np.asarray(logits, np.float64))
  y = _softmax(new[index].astype(np.float64))
  expected = (np.mean(p * (np.log(p) - np.log(y + 1e-10)))
              + config.mslg.entropy_weight * np.mean(-p * np.log(p)))
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-4)
  assert int(new_state.step) == int(state.step) + 1
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         state.params, new_state.params)
  assert all(jax.tree.leaves(changed))


def test_step_updates_running_statistics_from_the_training_forward():
  _, state, new_state, _, sub, _ = _one_step("mslg")
  _, expected = steps.forward_train(state, state.params, sub["image"])
  assert jax.tree.leaves(expected)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new_state.batch_stats, expected)


def test_reference_step_starts_from_zero_rows_and_folds_in_the_meta_statistics():
  table = 5.0 * jax.random.normal(jax.random.PRNGKey(1), (48, 3))  # ignored by the reference step
  config, state, new_state, _, sub, meta_batch = _one_step("mslg_reference", table=table)
  index = np.asarray(sub["index"])
  zeros = jnp.zeros((16, 3))
  _, grads, _ = _autodiff_rows_gradient(state, sub["image"], meta_batch, zeros,
                                        config.mslg.inner_lr)
  new = np.asarray(new_state.method_state[mslg.TABLE])
  np.testing.assert_allclose(new[index], -config.mslg.label_lr * np.asarray(grads), rtol=1e-4,
                             atol=1e-5 * config.mslg.label_lr * float(np.abs(grads).max()))
  others = np.setdiff1d(np.arange(48), index)
  np.testing.assert_array_equal(new[others], np.asarray(table)[others])
  # Running statistics: the training forward's update, then the fast forward's on the meta batch.
  _, after_train = steps.forward_train(state, state.params, sub["image"])
  fast = steps.inner_update(state, sub["image"], mslg.inner_loss_of(zeros), config.mslg.inner_lr)
  _, expected = steps.forward_train(state, fast, meta_batch["image"], stream="meta",
                                    batch_stats=after_train)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new_state.batch_stats, expected)
  differs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         new_state.batch_stats, after_train)
  assert max(jax.tree.leaves(differs)) > 1e-4


@pytest.mark.parametrize("name", ["mslg", "mslg_reference"])
@pytest.mark.parametrize("phase", ["warm-up", "mslg"])
def test_each_phase_lowers_its_own_loss(name, phase):
  mc.assert_lowers_own_loss(name, phase, warmup_epochs=1)


@pytest.mark.slow
def test_end_to_end_tables_survive_kill_resume_and_stay_per_run(tmp_path, monkeypatch):
  # Batches of 100 of the 1,497 training images: 97 are left out of each epoch, so some rows are
  # never visited in the two label epochs.
  config = tiny_config.with_overrides(tiny_config.get_config(), method="mslg", num_epochs=3,
                                      warmup_epochs=1, num_runs=2, batch_size=100)
  uninterrupted = experiment.run(config, str(tmp_path / "a"))["mslg"]
  tiny_config.run_killed(monkeypatch, lambda: experiment.run(config, str(tmp_path / "b")), epoch=2)
  resumed = experiment.run(config, str(tmp_path / "b"))["mslg"]
  assert [r["history"][-1]["train/loss"] for r in resumed] == [
      r["history"][-1]["train/loss"] for r in uninterrupted]

  per_epoch = uninterrupted[0]["history"][-1]["steps"] * config.batch_size
  tables, labels = [], []
  for index in range(2):
    run_a, run_b = (tmp_path / side / f"run_{index}" for side in ("a", "b"))
    state, _ = trained.load_trained_state(str(run_a))
    state_b, _ = trained.load_trained_state(str(run_b))
    table = np.asarray(state.method_state[mslg.TABLE])
    np.testing.assert_array_equal(table, np.asarray(state_b.method_state[mslg.TABLE]))
    tables.append(table)
    labels.append(np.load(run_a / "labels.npz")["noisy"])
    # The exports of a method with soft labels: the table's softmax and the label-issue report.
    assert np.load(run_b / "soft_labels.npz").files
    results = json.loads((run_b / "results.json").read_text())
    assert results["method"] == "mslg" and results["label_issues"] is not None
  num_classes = tables[0].shape[1]
  initial = lambda y: config.mslg.k * np.eye(num_classes, dtype=np.float32)[y]
  differ = labels[0] != labels[1]
  assert differ.any()
  for table, own, other in ((tables[0], labels[0], labels[1]), (tables[1], labels[1], labels[0])):
    untouched = np.all(table == initial(own), axis=1)
    # Two label epochs moved at least one epoch's distinct rows, at most two epochs' worth; every
    # row they did not reach is still exactly K·e of this run's own label ...
    assert per_epoch <= (~untouched).sum() <= min(2 * per_epoch, len(own) - 1)
    # ... and not the other run's: where the runs' labels differ, no row holds the other's.
    assert (untouched & differ).any()
    assert not np.any(np.all(table == initial(other), axis=1) & differ)
