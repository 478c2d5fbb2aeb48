"""SCE (published and reference), GCE and soft bootstrapping: each loss against values computed by
hand in numpy, unlabelled samples left out, the config wired in, and every step lowering its own
loss on both toy architectures."""

import sys
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import method_checks  # noqa: E402
from mln_jax import methods  # noqa: E402
from mln_jax.methods import bootstrap, gce, sce  # noqa: E402

# Three samples of C = 3: moderate logits, a confident one, and one whose label's probability
# underflows far below the 1e-7 clip.
LOGITS = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.1], [30.0, 0.0, -2.0]])
LABELS = np.array([0, 2, 1])


def softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def log_softmax(v):
  return np.log(softmax(v))


def numpy_sce(z, y, a, b, clip):
  p = softmax(z)
  total = 0.0
  for i, label in enumerate(y):
    ce = -np.log(np.clip(p[i, label], 1e-7, 1.0))
    target = np.full(z.shape[1], clip)
    target[label] = 1.0
    rce = -np.sum(p[i] * np.log(target))
    total += a * ce + b * rce
  return total / len(y)


def numpy_sce_reference(z, y, a, b, clip):
  p = softmax(z)
  total = 0.0
  for i, label in enumerate(y):
    p_hat = np.clip(p[i], 1e-7, 1.0)
    ce = np.log(np.exp(p_hat).sum()) - p_hat[label]
    q = np.full(z.shape[1], clip)
    q[label] = 1.0
    rce = np.log(np.exp(q).sum()) - np.sum(p[i] * q)
    total += a * ce + b * rce
  return total / len(y)


def test_sce_matches_hand_computed_values():
  value = sce.sce_loss(jnp.asarray(LOGITS), jnp.asarray(LABELS), 0.1, 1.0, 1e-4)
  np.testing.assert_allclose(value, numpy_sce(LOGITS, LABELS, 0.1, 1.0, 1e-4), rtol=1e-5)
  # The clip is active for the third sample: its CE part is exactly −log(1e-7).
  third = sce.sce_loss(jnp.asarray(LOGITS[2:]), jnp.asarray(LABELS[2:]), 1.0, 0.0)
  np.testing.assert_allclose(third, -np.log(1e-7), rtol=1e-6)
  # The reverse term equals −ln(A)·mean(1 − p_ỹ), and the clip A is a setting.
  p_label = softmax(LOGITS)[np.arange(3), LABELS]
  reverse = sce.sce_loss(jnp.asarray(LOGITS), jnp.asarray(LABELS), 0.0, 1.0, 1e-2)
  np.testing.assert_allclose(reverse, -np.log(1e-2) * np.mean(1 - p_label), rtol=1e-5)


def test_sce_reference_matches_the_reference_formula():
  value = sce.sce_reference_loss(jnp.asarray(LOGITS), jnp.asarray(LABELS), 0.1, 1.0, 1e-4)
  np.testing.assert_allclose(value, numpy_sce_reference(LOGITS, LABELS, 0.1, 1.0, 1e-4),
                             rtol=1e-5)
  # Its reverse part is const − (1 − 1e-4)·p_ỹ: about 9.2× flatter in p_ỹ than the published one.
  grad_ref = jax.grad(lambda z: sce.sce_reference_loss(z, jnp.asarray(LABELS), 0.0, 1.0))(
      jnp.asarray(LOGITS))
  grad_pub = jax.grad(lambda z: sce.sce_loss(z, jnp.asarray(LABELS), 0.0, 1.0))(
      jnp.asarray(LOGITS))
  np.testing.assert_allclose(grad_pub, -np.log(1e-4) / (1 - 1e-4) * grad_ref, rtol=1e-4,
                             atol=1e-7)


def test_gce_matches_hand_computed_values_and_keeps_a_finite_gradient():
  p_label = softmax(LOGITS)[np.arange(3), LABELS]
  for q in (0.7, 1.0, 0.3):
    np.testing.assert_allclose(gce.gce_loss(jnp.asarray(LOGITS), jnp.asarray(LABELS), q),
                               np.mean((1 - p_label**q) / q), rtol=1e-5)
  # p_ỹ = e^-200 underflows in float32: the gradient must still be finite (and ~0).
  far = jnp.array([[200.0, 0.0, 0.0]])
  grad = jax.grad(lambda z: gce.gce_loss(z, jnp.array([1]), 0.7))(far)
  assert np.all(np.isfinite(grad))


def numpy_bootstrap(z, y, beta):
  p = softmax(z)
  one_hot = np.eye(z.shape[1])[y]
  target = beta * one_hot + (1 - beta) * p
  return np.mean(-(target * np.log(p)).sum(-1))


def test_soft_bootstrap_matches_hand_computed_values_and_differentiates_its_target():
  logits = LOGITS[:2]  # finite log p in float64 for the finite differences
  labels = LABELS[:2]
  np.testing.assert_allclose(
      bootstrap.soft_bootstrap_loss(jnp.asarray(logits), jnp.asarray(labels), 0.95),
      numpy_bootstrap(logits, labels, 0.95), rtol=1e-5)
  # The gradient flows through p in the target too: central differences of the numpy loss.
  grad = jax.grad(lambda z: bootstrap.soft_bootstrap_loss(z, jnp.asarray(labels), 0.6))(
      jnp.asarray(logits, jnp.float32))
  numeric = np.zeros_like(logits)
  eps = 1e-5
  for index in np.ndindex(logits.shape):
    step = np.zeros_like(logits)
    step[index] = eps
    numeric[index] = (numpy_bootstrap(logits + step, labels, 0.6)
                      - numpy_bootstrap(logits - step, labels, 0.6)) / (2 * eps)
  np.testing.assert_allclose(grad, numeric, atol=1e-5)
  # ... and differs from a stop-gradient target (which would be plain CE + a constant).
  ce_grad = jax.grad(lambda z: 0.6 * (-jax.nn.log_softmax(z)[jnp.arange(2), labels]).mean()
                     - 0.4 * (jax.lax.stop_gradient(jax.nn.softmax(z))
                              * jax.nn.log_softmax(z)).sum(-1).mean())(jnp.asarray(logits))
  assert np.abs(np.asarray(grad) - np.asarray(ce_grad)).max() > 1e-3


LOSSES = {
    "sce": lambda z, y: sce.sce_loss(z, y),
    "sce_reference": lambda z, y: sce.sce_reference_loss(z, y),
    "gce": lambda z, y: gce.gce_loss(z, y),
    "bootstrap": lambda z, y: bootstrap.soft_bootstrap_loss(z, y),
}


@pytest.mark.parametrize("name", LOSSES)
def test_unlabelled_samples_add_nothing(name):
  loss = LOSSES[name]
  logits = jnp.asarray(LOGITS[:2])
  labelled = loss(logits, jnp.asarray(LABELS[:2]))
  with_unlabelled = loss(jnp.concatenate([logits, jnp.array([[9.0, -3.0, 1.0]])]),
                         jnp.asarray(np.append(LABELS[:2], -1)))
  np.testing.assert_allclose(with_unlabelled, labelled, rtol=1e-6)
  # No labels at all: loss 0 and a zero, finite gradient.
  unlabelled = jnp.full((2,), -1, jnp.int32)
  assert float(loss(logits, unlabelled)) == 0.0
  grad = jax.grad(lambda z: loss(z, unlabelled))(logits)
  np.testing.assert_array_equal(grad, np.zeros_like(grad))


@pytest.mark.parametrize("name,overrides,expected", [
    ("sce", {"sce.alpha": 0.5, "sce.beta": 2.0, "sce.label_clip": 1e-3},
     lambda z, y: numpy_sce(z, y, 0.5, 2.0, 1e-3)),
    ("sce_reference", {"sce.alpha": 0.5, "sce.beta": 2.0, "sce.label_clip": 1e-3},
     lambda z, y: numpy_sce_reference(z, y, 0.5, 2.0, 1e-3)),
    ("gce", {"gce.q": 0.4},
     lambda z, y: np.mean((1 - softmax(z)[np.arange(len(y)), y]**0.4) / 0.4)),
    ("bootstrap", {"bootstrap.beta": 0.8}, lambda z, y: numpy_bootstrap(z, y, 0.8)),
])
def test_the_step_trains_on_the_configured_loss(name, overrides, expected):
  """The phase's step reports the configured loss of the classifier's train-mode logits (MLP: no
  BatchNorm, so those equal the inference-mode logits)."""
  batch = method_checks.toy_batch(num=12, noisy_fraction=0.3)
  method, state, _ = method_checks.toy_state(name, "mlp", batch=batch, **overrides)
  assert [phase.name for phase in method.phases] == [name]
  assert method.total_epochs(method_checks.toy_config(name)) == 4
  logits = np.asarray(jax.jit(method.predict)(state, batch["image"]), np.float64)
  _, metrics = jax.jit(method.phases[0].step)(
      state, {k: batch[k] for k in ("image", "label", "index")})
  np.testing.assert_allclose(metrics["loss"], expected(logits, np.asarray(batch["label"])),
                             rtol=1e-4)


def test_invalid_settings_are_refused():
  with pytest.raises(ValueError, match="gce.q"):
    methods.get(method_checks.toy_config("gce", **{"gce.q": 0.0}))
  with pytest.raises(ValueError, match="sce.label_clip"):
    methods.get(method_checks.toy_config("sce", **{"sce.label_clip": 0.0}))
  with pytest.raises(ValueError, match="bootstrap.beta"):
    methods.get(method_checks.toy_config("bootstrap", **{"bootstrap.beta": 1.5}))


@pytest.mark.parametrize("name", ["sce", "sce_reference", "gce", "bootstrap"])
def test_step_lowers_its_own_loss(name):
  method_checks.assert_lowers_own_loss(name, name)
