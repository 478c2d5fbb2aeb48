"""Meta-Weight-Net: the VNet, the weighted losses, the exact meta-gradient (finite differences and
the JVP identity), the step's updates and per-sample table, and an end-to-end run."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_checks as mc
from mln_jax import steps
from mln_jax.methods import mwnet

PHASE = "meta-weight-net"


def _state(model="conv_bn", batch=None, learning_rate=0.3, **overrides):
  """A fresh state, after begin_epoch at `learning_rate`, with a VNet whose weights vary."""
  method, state, config = mc.toy_state("mwnet", model, batch=batch, **overrides)
  state = method.begin_epoch(state, 0, learning_rate)
  return method, state, mwnet.VNet(hidden=config.mwnet.hidden)


def test_vnet_initialises_as_pytorch_linear_layers():
  vnet = mwnet.VNet(hidden=100)
  params = vnet.init(jax.random.PRNGKey(3), jnp.zeros((1,)))["params"]
  shapes = jax.tree.map(jnp.shape, params)
  assert shapes == {"hidden": {"kernel": (1, 100), "bias": (100,)},
                    "out": {"kernel": (100, 1), "bias": (1,)}}
  # U(±1) in the first layer (fan-in 1), U(±0.1) in the second (fan-in 100): within the bounds
  # and spread over them (a narrower or a normal init would fail one or the other).
  for layer, bound in (("hidden", 1.0), ("out", 0.1)):
    kernel = np.asarray(params[layer]["kernel"])
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.85 * bound, layer
    assert abs(kernel.mean()) < 0.2 * bound
    assert abs(kernel.std() - bound / math.sqrt(3)) < 0.2 * bound
  hidden_bias = np.asarray(params["hidden"]["bias"])
  assert np.abs(hidden_bias).max() <= 1.0 and np.abs(hidden_bias).max() > 0.85
  assert np.abs(np.asarray(params["out"]["bias"])).max() <= 0.1
  # Another key, other parameters: the VNet is initialised from the method's own key.
  other = vnet.init(jax.random.PRNGKey(4), jnp.zeros((1,)))["params"]
  assert not np.allclose(other["hidden"]["kernel"], params["hidden"]["kernel"])
  # Weights lie in (0, 1), for small and large losses alike.
  weights = vnet.apply({"params": params}, jnp.array([0.0, 0.1, 1.0, 5.0, 30.0]))
  assert weights.shape == (5,) and np.all((weights > 0) & (weights < 1))


def test_losses_match_hand_computed_values():
  logits = jnp.array([[0.0, 0.0], [np.log(3.0), 0.0], [1.0, -1.0]])  # p = .5/.5, .75/.25, ...
  labels = jnp.array([1, 1, -1])
  ce = np.array([np.log(2.0), np.log(4.0), 0.0])
  np.testing.assert_allclose(mwnet.per_sample_cross_entropy(logits, labels), ce, rtol=1e-6)
  weights = jnp.array([0.2, 0.6, 0.9])  # the unlabelled sample's 0.9 counts nowhere
  np.testing.assert_allclose(mwnet.weighted_loss(weights, jnp.asarray(ce), labels),
                             (0.2 * np.log(2) + 0.6 * np.log(4)) / 2, rtol=1e-6)
  np.testing.assert_allclose(mwnet.weighted_loss(weights, jnp.asarray(ce), labels, True),
                             (0.2 * np.log(2) + 0.6 * np.log(4)) / 0.8, rtol=1e-6)
  normalised = mwnet.loss_coefficients(jnp.array([0.1, 0.3, 0.4, 0.7]),
                                       jnp.array([0, 2, -1, 1]), True)
  np.testing.assert_allclose(normalised, [0.1 / 1.1, 0.3 / 1.1, 0.0, 0.7 / 1.1], rtol=1e-6)
  assert float(normalised.sum()) == pytest.approx(1.0)
  np.testing.assert_array_equal(mwnet.loss_coefficients(jnp.ones(2), jnp.array([-1, -1]), True),
                                [0.0, 0.0])


def _meta_objective_by_hand(state, vnet, batch, meta_batch, learning_rate, normalize, phi):
  """L_meta(θ − η∇θ Σ_i c_i ℓ_i) as an explicit function of φ: the inner step written out (no
  optax, no library weighting), for finite differences."""
  images, labels = batch["image"], batch["label"]

  def per_sample(params):
    logits = steps.forward_train(state, params, images)[0]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)[:, 0]

  weights = vnet.apply({"params": phi}, jax.lax.stop_gradient(per_sample(state.params)))
  coefficients = weights / weights.sum() if normalize else weights / labels.shape[0]
  grads = jax.grad(lambda p: jnp.sum(coefficients * per_sample(p)))(state.params)
  fast = jax.tree.map(lambda p, g: p - learning_rate * g, state.params, grads)
  return steps.meta_loss(state, fast, meta_batch)[0]


def _random_direction(tree, seed):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(jax.tree.leaves(tree)))
  return jax.tree.unflatten(jax.tree.structure(tree), [
      jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, jax.tree.leaves(tree))])


@pytest.mark.parametrize("model, normalize", [("conv_bn", False), ("mlp", False), ("mlp", True)])
def test_meta_gradient_matches_finite_differences_float64(model, normalize):
  with jax.enable_x64(True):
    _, state, vnet = _state(model, **{"mwnet.normalize_weights": normalize})
    state = mc.as_float64(state)
    batch, meta_batch = mc.toy_batches(jnp.float64)
    phi = state.method_state["vnet_params"]
    learning_rate = state.opt_state.hyperparams["learning_rate"]
    assert float(learning_rate) == pytest.approx(0.3)
    (_, grads), _ = _both_meta_gradients(state, vnet, batch, meta_batch, normalize)
    objective = jax.jit(lambda p: _meta_objective_by_hand(state, vnet, batch, meta_batch,
                                                          learning_rate, normalize, p))
    eps = 1e-5
    for seed in range(3):
      direction = _random_direction(phi, 100 + seed)
      shifted = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, phi, direction)
      numeric = (objective(shifted(1.0)) - objective(shifted(-1.0))) / (2 * eps)
      analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads),
                                                   jax.tree.leaves(direction)))
      assert abs(float(analytic)) > 1e-8  # a vanishing gradient would make the check empty
      np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-12)


def _both_meta_gradients(state, vnet, batch, meta_batch, normalize):
  """(autodiff, JVP identity) meta-gradients wrt φ at the state's VNet, jitted."""
  learning_rate = state.opt_state.hyperparams["learning_rate"]

  def both(state):
    phi = state.method_state["vnet_params"]
    inner = mwnet.inner_loss_of(vnet, mwnet.sample_losses(state, batch["image"], batch["label"]),
                                batch["label"], normalize)
    loss_a, grads_a, _, _ = steps.meta_gradient_autodiff(state, batch["image"], meta_batch, phi,
                                                         inner, learning_rate=learning_rate)
    loss_j, grads_j = mwnet.meta_gradient_jvp(state, batch, meta_batch, vnet, phi, learning_rate,
                                              normalize)
    return (loss_a, grads_a), (loss_j, grads_j)
  return jax.jit(both)(state)


@pytest.mark.parametrize("model", ["conv_bn", "mlp"])
def test_jvp_identity_equals_autodiff(model):
  for normalize in (False, True):
    with jax.enable_x64(True):
      _, state, vnet = _state(model)
      batch, meta_batch = mc.toy_batches(jnp.float64)
      (loss_a, grads_a), (loss_j, grads_j) = _both_meta_gradients(
          mc.as_float64(state), vnet, batch, meta_batch, normalize)
      np.testing.assert_allclose(loss_a, loss_j, rtol=1e-12)
      for a, j in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_j)):
        assert np.abs(a).max() > 1e-10
        np.testing.assert_allclose(a, j, rtol=1e-9, atol=1e-14)
    if normalize:
      continue
    # float32: the same to rounding.
    _, state, vnet = _state(model)
    batch, meta_batch = mc.toy_batches()
    (_, grads_a), (_, grads_j) = _both_meta_gradients(state, vnet, batch, meta_batch, normalize)
    for a, j in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_j)):
      np.testing.assert_allclose(a, j, rtol=2e-3, atol=1e-5 * float(np.abs(a).max()))


@pytest.mark.parametrize("normalize", [False, True])
def test_step_updates_vnet_classifier_statistics_and_the_weights_at_batch_ids(normalize):
  everything = mc.toy_batch(num=48, noisy_fraction=0.3)
  method, state, vnet = _state("conv_bn", batch=everything,
                               **{"mwnet.normalize_weights": normalize})
  ids = np.random.default_rng(0).permutation(48)[:16]
  batch = {"image": everything["image"][ids], "label": everything["label"][ids].at[3].set(-1),
           "index": jnp.asarray(ids, jnp.int32)}
  _, meta_batch = mc.toy_batches()
  phase = mc.phase_named(method, PHASE)
  assert phase.uses_meta and phase.selects_best
  new_state, metrics = jax.jit(phase.step)(state, batch, meta_batch)
  assert set(metrics) >= {"loss", "meta_loss", "weight_mean", "accuracy"}
  assert int(new_state.step) == 1
  changed = lambda a, b: any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a),
                                                                  jax.tree.leaves(b)))
  old, new = state.method_state, new_state.method_state
  assert changed(old["vnet_params"], new["vnet_params"])
  assert changed(state.params, new_state.params)
  assert changed(state.batch_stats, new_state.batch_stats)
  # The Adam state counted the step.
  counts = [x for x in jax.tree.leaves(new["vnet_opt_state"]) if x.dtype == jnp.int32]
  assert counts and all(int(c) == 1 for c in counts)

  # The table holds V(ℓ; φ_new) at the batch's ids (0 for the unlabelled one), elsewhere its
  # initial 0.5.
  weights = np.asarray(new["weights"])
  untouched = np.setdiff1d(np.arange(48), ids)
  np.testing.assert_array_equal(weights[untouched], mwnet.UNSEEN_WEIGHT)
  logits, _ = steps.forward_train(state, state.params, batch["image"])
  ce = mwnet.per_sample_cross_entropy(logits, batch["label"])
  expected = np.array(vnet.apply({"params": new["vnet_params"]}, ce))
  expected[3] = 0.0
  np.testing.assert_allclose(weights[ids], expected, rtol=1e-5, atol=1e-7)
  assert weights[ids[3]] == 0.0
  labelled = np.delete(weights[ids], 3)
  assert np.all((labelled > 0) & (labelled < 1))
  assert float(metrics["weight_mean"]) == pytest.approx(labelled.mean(), rel=1e-5)
  # The loss the step took: (1/B) Σ w ℓ over the 15 labelled samples, or Σ w ℓ / Σ w.
  ce = np.asarray(ce)
  hand = (expected * ce).sum() / (expected.sum() if normalize else 15)
  assert float(metrics["loss"]) == pytest.approx(hand, rel=1e-5)
  # Exports and scores.
  np.testing.assert_array_equal(method.export(new_state)["sample_weights"], weights)
  np.testing.assert_allclose(method.label_issue_scores(new_state), 1 - weights)


def test_inner_step_runs_at_the_scheduled_learning_rate():
  """The virtual step uses η_t from the classifier's optimiser state, not a fixed step size: the
  meta loss the step reports is L_meta after a step of η_t."""
  batch, meta_batch = mc.toy_batches()
  method, state, vnet = _state("mlp", batch=batch, learning_rate=0.7)
  _, metrics = jax.jit(mc.phase_named(method, PHASE).step)(state, batch, meta_batch)
  losses = mwnet.sample_losses(state, batch["image"], batch["label"])
  inner = mwnet.inner_loss_of(vnet, losses, batch["label"], False)(
      state.method_state["vnet_params"])
  at = lambda lr: float(steps.meta_loss(
      state, steps.inner_update(state, batch["image"], inner, lr), meta_batch)[0])
  assert float(metrics["meta_loss"]) == pytest.approx(at(0.7), rel=1e-5)
  assert abs(at(0.7) - at(0.05)) > 1e-3  # the check can tell the rates apart


def test_step_lowers_its_loss_on_both_architectures():
  mc.assert_lowers_own_loss("mwnet", PHASE)


def test_normalized_variant_lowers_its_loss():
  mc.assert_lowers_own_loss("mwnet", PHASE, **{"mwnet.normalize_weights": True})


def test_weighting_network_learns_to_drop_high_loss_noisy_samples():
  # A classifier that fits the clean labels gives the 40% flipped ones high losses: the meta
  # gradient must then bend V down at high losses and starve those samples (a sign error in the
  # second-order gradient would raise their weights instead).
  batch = mc.toy_batch(num=48, noisy_fraction=0.4)
  method, state, config = mc.toy_state("mwnet", "mlp", batch=batch,
                                       **{"mwnet.learning_rate": 0.05})
  warm = jax.jit(steps.warmup_step)
  for _ in range(30):
    state, _ = warm(state, {"image": batch["image"], "label": batch["clean_label"],
                            "index": batch["index"]})
  phase = method.phases[0]
  state = mc.begin_phase(method, phase, state, batch, epoch=0)
  state, _ = mc.run_phase(phase, state, batch, 20, mc.toy_batch(num=24, seed=1))
  vnet = mwnet.VNet(hidden=config.mwnet.hidden)
  low, high = np.asarray(vnet.apply({"params": state.method_state["vnet_params"]},
                                    jnp.array([0.05, 4.0]))).ravel()
  assert high < 0.1 < low
  weights = np.asarray(state.method_state["weights"])
  noisy = np.asarray(batch["label"] != batch["clean_label"])
  assert weights[noisy].mean() < 0.1 < weights[~noisy].mean()
