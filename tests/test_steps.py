"""Losses, the warm-up step and `meta_step`: values, exact meta-gradients, architectures,
devices."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mln_jax import losses, models, steps
from mln_jax.train_state import create_train_state, freeze_extractor

NUM_CLASSES = 3
IMAGE_SHAPE = (4, 4, 1)


def tiny_models():
  return {
      "conv_bn": models.ConvBNClassifier(num_classes=NUM_CLASSES, blocks=((4,),), feature_dim=6),
      "mlp": models.MLPClassifier(num_classes=NUM_CLASSES, hidden=(8, 5)),
  }


def make_state(model, dtype=jnp.float32, meta_gradient="autodiff", inner_lr=1.0, seed=0):
  state = create_train_state(jax.random.PRNGKey(seed), model, IMAGE_SHAPE, NUM_CLASSES,
                             mln_learning_rate=1e-2, inner_lr=inner_lr, meta_gradient=meta_gradient)
  cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  # Random, non-trivial BatchNorm statistics and extractor: the extractor is frozen from a perturbed
  # classifier so that features differ from the classifier's own.
  state = freeze_extractor(state)
  state = state.replace(params=jax.tree.map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(7), p.shape, p.dtype), state.params))
  return jax.tree.map(cast, state)


def make_batch(seed, batch_size=8, dtype=jnp.float32, labelled=True):
  key_x, key_y = jax.random.split(jax.random.PRNGKey(seed))
  images = jax.random.normal(key_x, (batch_size, *IMAGE_SHAPE), dtype)
  labels = jax.random.randint(key_y, (batch_size,), 0, NUM_CLASSES)
  if not labelled:
    labels = jnp.full_like(labels, -1)
  return {"image": images, "label": labels}


def test_losses_match_hand_computed_values():
  logits = jnp.array([[0.0, 0.0], [np.log(3.0), 0.0]])  # p = [.5, .5], [.75, .25]
  soft = jnp.array([[0.25, 0.75], [0.5, 0.5]])
  p = np.array([[0.5, 0.5], [0.75, 0.25]])
  expected_kl = np.sum(p * (np.log(p) - np.log(np.asarray(soft)))) / 4
  expected_entropy = -np.sum(p * np.log(p)) / 4
  expected_ce = -(np.log(0.5) + np.log(0.25)) / 2
  np.testing.assert_allclose(losses.soft_label_kl(logits, jnp.log(soft)), expected_kl, rtol=1e-6)
  np.testing.assert_allclose(losses.entropy(logits), expected_entropy, rtol=1e-6)
  np.testing.assert_allclose(losses.cross_entropy(logits, jnp.array([0, 1])), expected_ce,
                             rtol=1e-6)
  # Unlabelled samples (−1) are left out of the mean, not read as the last class.
  np.testing.assert_allclose(losses.cross_entropy(logits, jnp.array([-1, 1])), -np.log(0.25),
                             rtol=1e-6)
  assert losses.cross_entropy(logits, jnp.array([-1, -1])) == 0.0
  assert losses.soft_label_kl(logits, jax.nn.log_softmax(logits)) == pytest.approx(0.0, abs=1e-7)


def _meta_objective(state, batch, meta_batch, mln_params):
  """L_meta as an explicit function of φ, for finite differences."""
  feature_fn = lambda phi: steps.soft_label_logits(state, phi, batch["image"])
  log_soft_labels = jax.nn.log_softmax(feature_fn(mln_params))
  fast = steps.inner_update(state, batch["image"],
                            lambda logits: losses.soft_label_kl(logits, log_soft_labels))
  return steps.meta_loss(state, fast, meta_batch)[0]


def meta_gradient(kind, state, images, meta_batch, feature_fn):
  """MetaLabelNet's meta-gradient by `kind`: 'autodiff' (the generic `jax.grad` through the inner
  optax update) or 'jvp' (the closed form): the meta loss, the gradient and the meta logits."""
  return steps.mln_meta_gradient(state.replace(meta_gradient=kind), images, meta_batch,
                                 feature_fn)[:3]


@pytest.mark.parametrize("arch", ["conv_bn", "mlp"])
@pytest.mark.parametrize("method", ["autodiff", "jvp"])
def test_meta_gradient_matches_finite_differences_float64(arch, method):
  with jax.enable_x64(True):
    state = make_state(tiny_models()[arch], jnp.float64, meta_gradient=method, inner_lr=0.7)
    batch, meta_batch = make_batch(1, dtype=jnp.float64), make_batch(2, dtype=jnp.float64)
    feature_fn = lambda phi: steps.soft_label_logits(state, phi, batch["image"])
    _, grads, _ = meta_gradient(method, state, batch["image"], meta_batch, feature_fn)
    objective = functools.partial(_meta_objective, state, batch, meta_batch)
    eps = 1e-5
    for seed in range(3):
      keys = jax.random.split(jax.random.PRNGKey(100 + seed), len(jax.tree.leaves(grads)))
      direction = jax.tree.unflatten(
          jax.tree.structure(grads),
          [jax.random.normal(k, g.shape, jnp.float64)
           for k, g in zip(keys, jax.tree.leaves(grads))])
      shifted = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, state.mln_params, direction)
      numeric = (objective(shifted(1.0)) - objective(shifted(-1.0))) / (2 * eps)
      analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads),
                                                   jax.tree.leaves(direction)))
      assert abs(float(analytic)) > 1e-8  # The gradient must not vanish for the test to mean much.
      np.testing.assert_allclose(analytic, numeric, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("arch", ["conv_bn", "mlp"])
def test_jvp_and_autodiff_meta_gradients_agree(arch):
  with jax.enable_x64(True):
    state = make_state(tiny_models()[arch], jnp.float64)
    batch, meta_batch = make_batch(3, dtype=jnp.float64), make_batch(4, dtype=jnp.float64)
    feature_fn = lambda phi: steps.soft_label_logits(state, phi, batch["image"])
    loss_a, grads_a, _ = meta_gradient("autodiff", state, batch["image"], meta_batch, feature_fn)
    loss_j, grads_j, _ = meta_gradient("jvp", state, batch["image"], meta_batch, feature_fn)
    np.testing.assert_allclose(loss_a, loss_j, rtol=1e-12)
    for a, j in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_j)):
      np.testing.assert_allclose(a, j, rtol=1e-10, atol=1e-14)
  # float32: the same to rounding.
  state = make_state(tiny_models()[arch])
  batch, meta_batch = make_batch(3), make_batch(4)
  feature_fn = lambda phi: steps.soft_label_logits(state, phi, batch["image"])
  _, grads_a, _ = meta_gradient("autodiff", state, batch["image"], meta_batch, feature_fn)
  _, grads_j, _ = meta_gradient("jvp", state, batch["image"], meta_batch, feature_fn)
  for a, j in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_j)):
    np.testing.assert_allclose(a, j, rtol=1e-3, atol=1e-6 * float(jnp.abs(a).max()))


def test_jvp_meta_gradient_stays_finite_when_soft_labels_underflow():
  """Very peaked soft labels (ŷ_c = 0 in float32) must not turn the closed form into 0/0."""
  state = make_state(tiny_models()["conv_bn"])
  state = state.replace(mln_params=jax.tree.map(lambda p: 1000.0 * p, state.mln_params))
  batch, meta_batch = make_batch(3), make_batch(4)
  feature_fn = lambda phi: steps.soft_label_logits(state, phi, batch["image"])
  assert float(jnp.min(jax.nn.softmax(feature_fn(state.mln_params)))) == 0.0
  _, grads_a, _ = meta_gradient("autodiff", state, batch["image"], meta_batch, feature_fn)
  _, grads_j, _ = meta_gradient("jvp", state, batch["image"], meta_batch, feature_fn)
  for a, j in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_j)):
    assert np.all(np.isfinite(j))
    np.testing.assert_allclose(a, j, rtol=1e-3, atol=1e-6 * float(jnp.abs(a).max()))


class DropoutClassifier(nn.Module):
  """A user's module with dropout in training mode (not one of mln_jax's models)."""

  @nn.compact
  def __call__(self, x, train):
    features = nn.relu(nn.Dense(16)(x.reshape((x.shape[0], -1))))
    features = nn.Dropout(0.5, deterministic=not train)(features)
    return nn.Dense(NUM_CLASSES)(features), features


def test_a_dropout_classifier_trains_with_one_mask_per_step():
  state = make_state(DropoutClassifier())
  batch, meta_batch = make_batch(3), make_batch(4)
  new_state, metrics = jax.jit(steps.warmup_step)(state, batch)
  assert np.isfinite(metrics["loss"])
  # The JVP form is exact only if every forward pass of the step drops the same units.
  feature_fn = lambda phi: steps.soft_label_logits(state, phi, batch["image"])
  _, grads_a, _ = meta_gradient("autodiff", state, batch["image"], meta_batch, feature_fn)
  _, grads_j, _ = meta_gradient("jvp", state, batch["image"], meta_batch, feature_fn)
  for a, j in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_j)):
    np.testing.assert_allclose(a, j, rtol=1e-3, atol=1e-6 * float(jnp.abs(a).max()))
  # Masks change from step to step.
  loss = lambda s: steps.meta_loss(s, s.params, meta_batch)[0]
  assert loss(state) != loss(state.replace(step=state.step + 1))


@pytest.mark.parametrize("arch", ["conv_bn", "mlp"])
def test_meta_step_updates_classifier_and_metalabelnet(arch):
  state = make_state(tiny_models()[arch])
  step = jax.jit(steps.meta_step)
  new_state, metrics = step(state, make_batch(5, labelled=False), make_batch(6))
  assert int(new_state.step) == int(state.step) + 1
  for name, value in metrics.items():
    assert np.isfinite(value), name
  changed = lambda a, b: any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a),
                                                                   jax.tree.leaves(b)))
  assert changed(new_state.params, state.params)
  assert changed(new_state.mln_params, state.mln_params)
  # The frozen extractor never moves.
  assert not changed(new_state.extractor_params, state.extractor_params)
  # Training labels are not read: relabelling the batch gives the same new state.
  other, _ = step(state, make_batch(5, labelled=True), make_batch(6))
  assert not changed(other.params, new_state.params)


def test_meta_step_refuses_a_state_without_frozen_extractor():
  state = create_train_state(jax.random.PRNGKey(0), tiny_models()["conv_bn"], IMAGE_SHAPE,
                             NUM_CLASSES)
  with pytest.raises(ValueError, match=r"Call freeze_extractor\(state\) after the warm-up"):
    jax.jit(steps.meta_step)(state, make_batch(5), make_batch(6))
  assert freeze_extractor(state).extractor_frozen


def test_meta_step_lowers_meta_loss_of_inner_update():
  """The MLN step moves φ so that the inner update's meta loss drops (the point of step 5)."""
  state = make_state(tiny_models()["conv_bn"], meta_gradient="jvp")
  batch, meta_batch = make_batch(8), make_batch(9)
  before = _meta_objective(state, batch, meta_batch, state.mln_params)
  new_state, _ = steps.meta_step(state, batch, meta_batch)
  after = _meta_objective(state, batch, meta_batch, new_state.mln_params)
  assert after < before


def test_warmup_step_reduces_loss_on_a_repeated_batch():
  state = make_state(tiny_models()["conv_bn"])
  batch = make_batch(10, batch_size=16)
  step = jax.jit(steps.warmup_step)
  state, first = step(state, batch)
  for _ in range(20):
    state, metrics = step(state, batch)
  assert metrics["loss"] < first["loss"]
  assert 0.0 <= float(metrics["accuracy"]) <= 1.0


@pytest.mark.parametrize("step_name", ["meta_step", "warmup_step"])
def test_multi_device_step_equals_single_device(step_name):
  devices = jax.devices()
  assert len(devices) == 4, "conftest forces 4 CPU devices"
  state = make_state(tiny_models()["conv_bn"])
  batch, meta_batch = make_batch(11, batch_size=16), make_batch(12, batch_size=16)
  fn = getattr(steps, step_name)
  args = (batch, meta_batch) if step_name == "meta_step" else (batch,)
  single_state, single_metrics = jax.jit(fn)(state, *args)

  mesh = Mesh(np.array(devices), ("data",))
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  state_4 = jax.device_put(state, replicated)
  args_4 = [jax.device_put(a, sharded) for a in args]
  assert len(args_4[0]["image"].sharding.device_set) == 4
  multi_state, multi_metrics = jax.jit(fn)(state_4, *args_4)
  for a, b in zip(jax.tree.leaves(single_state), jax.tree.leaves(multi_state)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  for name in single_metrics:
    np.testing.assert_allclose(single_metrics[name], multi_metrics[name], rtol=2e-5, atol=2e-6)


def test_bfloat16_compute_keeps_float32_state_and_close_meta_gradient():
  f32 = make_state(tiny_models()["conv_bn"])
  bf16_model = models.ConvBNClassifier(num_classes=NUM_CLASSES, blocks=((4,),), feature_dim=6,
                                       dtype=jnp.bfloat16)
  bf16 = f32.replace(apply_fn=bf16_model.apply)
  batch, meta_batch = make_batch(13, batch_size=16), make_batch(14, batch_size=16)
  new_state, metrics = jax.jit(steps.meta_step)(bf16, batch, meta_batch)
  assert all(np.isfinite(v) for v in metrics.values())
  assert {x.dtype for x in jax.tree.leaves((new_state.params, new_state.batch_stats,
                                            new_state.mln_params))} == {jnp.dtype(jnp.float32)}
  gradient = lambda state: jnp.concatenate([g.ravel() for g in jax.tree.leaves(
      meta_gradient("autodiff", state, batch["image"], meta_batch, lambda phi: (
          steps.soft_label_logits(state, phi, batch["image"])))[1])])
  g32, g16 = gradient(f32), gradient(bf16)
  cosine = jnp.vdot(g32, g16) / (jnp.linalg.norm(g32) * jnp.linalg.norm(g16))
  assert cosine > 0.95, cosine
