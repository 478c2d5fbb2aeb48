"""Learning to Reweight: the weights, the look-ahead signal (finite differences, autodiff vs the JVP
identity), the step's updates and per-sample tables, and an end-to-end run."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_checks as mc
from mln_jax import steps
from mln_jax.methods import l2rw

PHASE = "l2rw"


def _state(model="conv_bn", batch=None, learning_rate=0.3):
  method, state, _ = mc.toy_state("l2rw", model, batch=batch)
  return method, method.begin_epoch(state, 0, learning_rate)


def test_weights_match_hand_computed_values():
  signal = jnp.array([0.2, -0.1, 0.3, 0.5, 0.0])
  labels = jnp.array([0, 1, 2, -1, 0])  # the unlabelled sample's 0.5 counts nowhere
  np.testing.assert_allclose(l2rw.normalized_weights(signal, labels), [0.4, 0, 0.6, 0, 0],
                             rtol=1e-6)
  # No positive signal: every weight 0 (not 0/0).
  np.testing.assert_array_equal(l2rw.normalized_weights(jnp.array([-1.0, 0.0, -2.0]),
                                                        jnp.array([0, 1, 2])), [0, 0, 0])
  np.testing.assert_array_equal(l2rw.normalized_weights(jnp.array([1.0, 2.0]),
                                                        jnp.array([-1, -1])), [0, 0])


def _meta_objective_by_hand(state, batch, meta_batch, learning_rate, epsilon):
  """L_meta(θ − α∇θ Σ_i ε_i ℓ_i(θ)) as an explicit function of ε: the inner step written out (no
  optax), for finite differences."""
  images, labels = batch["image"], batch["label"]

  def weighted(params):
    logits = steps.forward_train(state, params, images)[0]
    log_p = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)[:, 0]
    return -jnp.sum(epsilon * log_p)

  grads = jax.grad(weighted)(state.params)
  fast = jax.tree.map(lambda p, g: p - learning_rate * g, state.params, grads)
  return steps.meta_loss(state, fast, meta_batch)[0]


def _both_signals(state, batch, meta_batch, learning_rate):
  """(autodiff, JVP identity) look-ahead signals and meta losses, jitted."""
  return jax.jit(lambda s: (
      l2rw.reweighting_signal_autodiff(s, batch, meta_batch, learning_rate),
      l2rw.reweighting_signal_jvp(s, batch, meta_batch, learning_rate)))(state)


@pytest.mark.parametrize("model", ["conv_bn", "mlp"])
def test_signal_matches_finite_differences_float64(model):
  with jax.enable_x64(True):
    _, state = _state(model)
    state = mc.as_float64(state)
    batch, meta_batch = mc.toy_batches(jnp.float64)
    (signal, _, _), _ = _both_signals(state, batch, meta_batch, 0.3)
    objective = jax.jit(lambda e: _meta_objective_by_hand(state, batch, meta_batch, 0.3, e))
    eps = 1e-5
    for i in (0, 5, 11):
      unit = jnp.zeros(16, jnp.float64).at[i].set(1.0)
      numeric = (objective(eps * unit) - objective(-eps * unit)) / (2 * eps)
      assert abs(float(signal[i])) > 1e-8  # a vanishing derivative would make the check empty
      np.testing.assert_allclose(-signal[i], numeric, rtol=1e-6, atol=1e-12)
    # Both signs occur: some samples help the meta loss, some hurt it.
    assert (signal > 0).any() and (signal < 0).any()


@pytest.mark.parametrize("model", ["conv_bn", "mlp"])
def test_jvp_identity_equals_autodiff(model):
  with jax.enable_x64(True):
    _, state = _state(model)
    batch, meta_batch = mc.toy_batches(jnp.float64)
    (signal_a, loss_a, _), (signal_j, loss_j) = _both_signals(mc.as_float64(state), batch,
                                                              meta_batch, 0.3)
    np.testing.assert_allclose(loss_a, loss_j, rtol=1e-12)
    np.testing.assert_allclose(signal_a, signal_j, rtol=1e-9, atol=1e-14 * np.abs(signal_a).max())
  _, state = _state(model)
  batch, meta_batch = mc.toy_batches()
  (signal_a, _, _), (signal_j, _) = _both_signals(state, batch, meta_batch, 0.3)
  np.testing.assert_allclose(signal_a, signal_j, rtol=2e-3, atol=1e-4 * np.abs(signal_a).max())


def test_step_takes_the_weighted_step_and_writes_the_tables_at_batch_ids():
  everything = mc.toy_batch(num=48, noisy_fraction=0.3)
  method, state = _state("conv_bn", batch=everything, learning_rate=0.3)
  ids = np.random.default_rng(0).permutation(48)[:16]
  batch = {"image": everything["image"][ids], "label": everything["label"][ids].at[3].set(-1),
           "index": jnp.asarray(ids, jnp.int32)}
  _, meta_batch = mc.toy_batches()
  phase = mc.phase_named(method, PHASE)
  assert phase.uses_meta and phase.selects_best
  new_state, metrics = jax.jit(phase.step)(state, batch, meta_batch)
  assert set(metrics) >= {"loss", "meta_loss", "accuracy", "kept_fraction", "cross_entropy"}
  changed = lambda a, b: any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a),
                                                                  jax.tree.leaves(b)))
  assert changed(state.params, new_state.params)
  assert changed(state.batch_stats, new_state.batch_stats)
  assert int(new_state.step) == 1

  signal, _ = jax.jit(lambda s: l2rw.reweighting_signal_jvp(s, batch, meta_batch, 0.3))(state)
  signal = np.asarray(signal)
  positive = np.where(np.asarray(batch["label"]) >= 0, np.maximum(signal, 0), 0)
  expected = positive / positive.sum()
  table = new_state.method_state
  relative, alignment = np.asarray(table["weights"]), np.asarray(table["alignment"])
  untouched = np.setdiff1d(np.arange(48), ids)
  np.testing.assert_array_equal(relative[untouched], 1.0)
  np.testing.assert_array_equal(alignment[untouched], 0.0)
  np.testing.assert_allclose(relative[ids], 16 * expected, rtol=1e-3, atol=1e-4)
  assert relative[ids].sum() == pytest.approx(16.0, rel=1e-5)  # the weights sum to 1
  assert relative[ids[3]] == 0.0 and alignment[ids[3]] == 0.0
  np.testing.assert_allclose(np.delete(alignment[ids], 3), np.delete(signal, 3) / 0.3, rtol=2e-3,
                             atol=1e-4 * np.abs(signal).max())
  assert 0 < float(metrics["kept_fraction"]) < 1
  # The loss the step took: Σ_i w_i ℓ_i.
  logits, _ = steps.forward_train(state, state.params, batch["image"])
  log_p = np.asarray(jax.nn.log_softmax(logits))
  ce = -log_p[np.arange(16), np.maximum(np.asarray(batch["label"]), 0)]
  assert float(metrics["loss"]) == pytest.approx((relative[ids] / 16 * ce).sum(), rel=1e-4)
  np.testing.assert_array_equal(method.export(new_state)["sample_weights"], relative)
  np.testing.assert_array_equal(method.export(new_state)["meta_alignment"], alignment)
  np.testing.assert_array_equal(method.label_issue_scores(new_state), -alignment)


def test_step_lowers_its_loss_and_leaves_out_the_flipped_labels():
  """The weighted loss falls on both architectures; and on the toy, whose meta batch is clean, the
  first steps give the samples with a flipped label weight 0 and nearly all others some (later,
  with the meta loss near 0, the look-ahead signal is noise)."""
  mc.assert_lowers_own_loss("l2rw", PHASE)
  batch, meta_batch = mc.toy_batch(noisy_fraction=0.2), mc.toy_batch(seed=1)
  method, state = _state("mlp", batch=batch, learning_rate=0.05)
  state, _ = mc.run_phase(mc.phase_named(method, PHASE), state, batch, 5, meta_batch)
  flipped = np.asarray(batch["label"] != batch["clean_label"])
  assert flipped.any()
  weights = np.asarray(state.method_state["weights"])
  assert weights[flipped].max() == 0.0 and (weights[~flipped] > 0).mean() > 0.9
  scores = np.asarray(method.label_issue_scores(state))
  assert scores[flipped].min() > np.median(scores[~flipped])
