"""MLNT (BASELINES §12): synthetic labels, the ramp, the EMA teacher, the second-order
meta-gradient, the step's gradient and start, the reference's start test and BatchNorm chaining,
the two trainings, and an end-to-end run through the loop."""

import functools
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mln_jax import experiment, losses, steps, trained
from mln_jax.methods import mlnt
from mln_jax.train_state import create_train_state

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import method_checks  # noqa: E402
import tiny_config  # noqa: E402

# Small and fast: two synthetic sets, neighbours within a toy batch, a ramp over a few steps.
FAST = {"mlnt.num_synthetic": 2, "mlnt.neighbours": 3, "mlnt.start_step": 1,
        "mlnt.ramp_end_step": 5, "optim.momentum": 0.0, "optim.weight_decay": 0.0}
LR = 0.05


def test_consistency_loss_matches_hand_computed_values():
  logits = jnp.array([[0.0, 0.0], [np.log(3.0), 0.0]])  # p = [.5, .5], [.75, .25]
  q = jnp.array([[0.25, 0.75], [1.0, 0.0]])
  by_hand = (0.25 * np.log(0.25 / 0.5) + 0.75 * np.log(0.75 / 0.5) + 1.0 * np.log(1.0 / 0.75)) / 4
  np.testing.assert_allclose(mlnt.consistency_loss(logits, q), by_hand, rtol=1e-6)
  assert float(mlnt.consistency_loss(logits, jax.nn.softmax(logits))) == pytest.approx(0, abs=1e-7)


def test_synthetic_labels_copy_a_near_neighbours_given_label():
  rng = np.random.default_rng(0)
  batch_size, k, fraction = 20, 4, 0.3
  features = rng.normal(size=(batch_size, 5)).astype(np.float32)
  # Distinct labels: every relabelled sample visibly changes (its neighbours are others).
  labels = jnp.asarray(rng.permutation(batch_size) + 100, jnp.int32)
  distances = ((features[:, None] - features[None]) ** 2).sum(-1)
  np.fill_diagonal(distances, np.inf)
  nearest = np.argsort(distances, 1)[:, :k]
  picked_rank = np.zeros(k, int)
  relabel = jax.jit(mlnt.synthetic_labels, static_argnums=(3, 4))
  for seed in range(30):
    new = np.asarray(relabel(jax.random.PRNGKey(seed), jnp.asarray(features), labels, fraction, k))
    changed = np.flatnonzero(new != np.asarray(labels))
    assert len(changed) == round(fraction * batch_size)  # 6 of 20
    for i in changed:
      source = np.flatnonzero(np.asarray(labels) == new[i])
      assert len(source) == 1 and source[0] in nearest[i], (i, source, nearest[i])
      picked_rank[list(nearest[i]).index(source[0])] += 1
  # Any of the k neighbours, not just the nearest.
  assert (picked_rank > 0).all(), picked_rank
  # M sets: set m is the function of fold_in(key, m); the sets differ.
  key = jax.random.PRNGKey(7)
  sets = mlnt.synthetic_label_sets(key, jnp.asarray(features), labels, 3, fraction, k)
  assert sets.shape == (3, batch_size)
  np.testing.assert_array_equal(sets[1], mlnt.synthetic_labels(
      jax.random.fold_in(key, 1), jnp.asarray(features), labels, fraction, k))
  assert (sets[0] != sets[1]).any()
  with pytest.raises(ValueError, match="neighbours need a batch of more than"):
    mlnt.nearest_neighbours(jnp.asarray(features[:4]), 4)


def test_ramp_of_weight_and_ema_decay():
  ramp = functools.partial(mlnt.schedule, start_step=100, ramp_end_step=300, weight=2.0,
                           ema_ramp=0.99, ema=0.999)
  for t, active, weight, gamma in [
      (0, False, 0.0, 0.99), (100, False, 0.0, 0.99),
      (101, True, 2.0 * np.exp(-5 * (1 - 1 / 200) ** 2), 0.99),
      (200, True, 2.0 * np.exp(-5 * 0.25), 0.99), (300, True, 2.0, 0.99),
      (301, True, 2.0, 0.999), (10_000, True, 2.0, 0.999)]:
    a, w, g = ramp(jnp.asarray(t))
    assert bool(a) == active, t
    np.testing.assert_allclose(w, weight, rtol=1e-6, err_msg=str(t))
    np.testing.assert_allclose(g, gamma, rtol=1e-7, err_msg=str(t))


def _independent_consistency(apply_fn, batch_stats, images, label_sets, q, alpha, params):
  """(1/M)Σ_m KL(q ‖ f(x; θ − α∇CE(f(x;θ), ŷ^m))) / (B·C), written out from the model alone."""
  def forward(p):
    (logits, _), _ = apply_fn({"params": p, "batch_stats": batch_stats}, images, train=True,
                              mutable=["batch_stats"])
    return jax.nn.log_softmax(logits)

  total = 0.0
  for synthetic in label_sets:
    ce = lambda p: -jnp.mean(jnp.take_along_axis(forward(p), synthetic[:, None], 1))
    fast = jax.tree.map(lambda p, g: p - alpha * g, params, jax.grad(ce)(params))
    total = total + jnp.mean(q * (jnp.log(q) - forward(fast)))
  return total / len(label_sets)


class SmoothClassifier(nn.Module):
  """A tiny classifier with smooth activations (optionally a BatchNorm conv layer): with ReLUs the
  fast step's gradient jumps at every kink, so the meta objective is discontinuous in θ and finite
  differences across a kink mean nothing."""
  batch_norm: bool

  @nn.compact
  def __call__(self, x, train: bool):
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train)(nn.Conv(3, (3, 3))(x))
    x = jnp.tanh(x).reshape((x.shape[0], -1))
    features = jnp.tanh(nn.Dense(6)(x))
    return nn.Dense(3)(features), features


@pytest.mark.parametrize("batch_norm", [True, False])
def test_meta_gradient_through_the_fast_steps_matches_finite_differences_float64(batch_norm):
  with jax.enable_x64(True):
    state = create_train_state(jax.random.PRNGKey(0), SmoothClassifier(batch_norm), (4, 4, 1), 3)
    to64 = lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x
    state = jax.tree.map(to64, state)
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(8, 4, 4, 1)))
    label_sets = jnp.asarray(rng.integers(0, 3, (2, 8)), jnp.int32)  # M = 2
    q = jax.nn.softmax(jnp.asarray(rng.normal(size=(8, 3))))
    alpha = 0.5
    value, grads = jax.jit(jax.value_and_grad(
        lambda p: mlnt.consistency(state, p, images, label_sets, q, alpha)[0]))(state.params)
    objective = jax.jit(functools.partial(_independent_consistency, state.apply_fn,
                                          state.batch_stats, images, label_sets, q, alpha))
    np.testing.assert_allclose(value, objective(state.params), rtol=1e-12)
    leaves, tree = jax.tree.flatten(grads)
    eps = 1e-5
    for seed in range(3):
      keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
      direction = jax.tree.unflatten(tree, [jax.random.normal(k, g.shape, jnp.float64)
                                            for k, g in zip(keys, leaves)])
      shifted = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, state.params, direction)
      numeric = (objective(shifted(1.0)) - objective(shifted(-1.0))) / (2 * eps)
      analytic = sum(jnp.vdot(g, d) for g, d in zip(leaves, jax.tree.leaves(direction)))
      assert abs(float(analytic)) > 1e-6
      np.testing.assert_allclose(analytic, numeric, rtol=1e-6)
    # Second order matters: the first-order gradient (the fast step's gradient taken as a
    # constant shift of θ) is not the same.
    first_order = jax.jit(jax.grad(functools.partial(_first_order, state), argnums=0))(
        state.params, images, label_sets, q, alpha)
    gap = max(float(jnp.abs(a - b).max()) for a, b in zip(leaves, jax.tree.leaves(first_order)))
    assert gap > 1e-3 * max(float(jnp.abs(g).max()) for g in leaves)


def _first_order(state, params, images, label_sets, q, alpha):
  """The consistency with each fast step's displacement held constant: its gradient is the
  first-order approximation ∇θ' J(θ')."""
  total = 0.0
  for synthetic in label_sets:
    fast = steps.inner_update(state.replace(params=jax.lax.stop_gradient(params)), images,
                              lambda logits: losses.cross_entropy(logits, synthetic), alpha)
    shift = jax.tree.map(lambda f, p: f - jax.lax.stop_gradient(p), fast, params)
    logits, _ = steps.forward_train(state, jax.tree.map(jnp.add, params, shift), images)
    total = total + mlnt.consistency_loss(logits, q)
  return total / len(label_sets)


@pytest.fixture(scope="module")
def trajectory():
  """Five jitted steps of the `mlnt` phase (start_step 1: steps 0, 1 plain, 2 the first meta
  step, 3 and 4 on the ramp) from a state whose feature net differs from the student; plain SGD at
  lr 0.05 so that each step's gradient is (θ − θ_next)/lr."""
  batch = method_checks.toy_batch(noisy_fraction=0.2)
  method, state, config = method_checks.toy_state("mlnt", "conv_bn", batch=batch, **FAST)
  phase = method_checks.phase_named(method, "mlnt")
  state = state.replace(step=state.step + 7)  # a feature phase's steps before the student's
  state = method_checks.begin_phase(method, phase, state, batch)
  train = {k: batch[k] for k in ("image", "label", "index")}
  step = jax.jit(phase.step)
  states, metrics = [state], []
  for _ in range(5):
    state, m = step(states[-1], train)
    states.append(state)
    metrics.append(m)
  return method, config, train, states, metrics, batch


def test_the_student_starts_fresh_and_the_feature_net_is_the_cross_entropy_network(trajectory):
  method, config, batch, _, _, full_batch = trajectory
  _, state, _ = method_checks.toy_state("mlnt", "conv_bn", batch=full_batch, **FAST)
  trained_ce = jax.jit(steps.warmup_step)(state, batch)[0]
  phase = method_checks.phase_named(method, "mlnt")
  student = phase.enter(trained_ce, True)
  table = student.method_state
  for got, want in [(table["features"]["params"], trained_ce.params),
                    (table["features"]["batch_stats"], trained_ce.batch_stats),
                    (student.params, state.method_state["fresh"]["params"]),
                    (student.batch_stats, state.method_state["fresh"]["batch_stats"]),
                    (student.opt_state, state.method_state["fresh"]["opt_state"])]:
    jax.tree.map(np.testing.assert_array_equal, got, want)
  assert int(table["start_step"]) == 1
  assert not np.allclose(jax.tree.leaves(student.params)[0],
                         jax.tree.leaves(trained_ce.params)[0])
  assert phase.enter(trained_ce, False) is trained_ce  # resumed inside the phase: restored
  # One pytree structure in every phase (checkpoints restore into one structure).
  leaves = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), (
      s.params, s.batch_stats, s.opt_state, s.method_state))
  assert leaves(state) == leaves(student) == leaves(trajectory[3][-1])
  # Two trainings: F + num_epochs epochs, the schedule restarted for the student.
  assert [(p.name, p.first_epoch, p.selects_best) for p in method.phases] == [
      ("feature net", 0, False), ("mlnt", config.num_epochs, True)]
  assert method.total_epochs(config) == 2 * config.num_epochs
  assert phase.learning_rate(config.num_epochs) == config.optim.learning_rate
  assert [name for name, _ in method.models] == ["student", "teacher"]
  assert mlnt.feature_epochs(tiny_config.with_overrides(config, **{"mlnt.feature_epochs": 3})) == 3


def test_before_the_start_a_step_is_a_cross_entropy_step(trajectory):
  _, _, batch, states, metrics, _ = trajectory
  plain, plain_metrics = jax.jit(steps.warmup_step)(states[1], batch)
  for name in ("params", "batch_stats", "opt_state", "step"):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
                 getattr(states[2], name), getattr(plain, name))
  np.testing.assert_allclose(metrics[1]["loss"], plain_metrics["loss"], rtol=1e-6)
  assert [float(m["meta_active"]) for m in metrics] == [0, 0, 1, 1, 1]
  assert float(metrics[1]["meta_weight"]) == 0 and float(metrics[1]["consistency"]) == 0
  # The teacher waits, untouched, for the first meta step.
  jax.tree.map(np.testing.assert_array_equal, states[2].method_state["teacher"],
               states[0].method_state["teacher"])


def test_teacher_is_first_a_copy_then_an_ema_of_the_student(trajectory):
  _, _, batch, states, _, _ = trajectory
  teacher = lambda i: states[i].method_state["teacher"]
  # Step 2 (t = 2 > start_step = 1): θ̃ := θ.
  jax.tree.map(np.testing.assert_array_equal, teacher(3)["params"], states[2].params)
  # Its BatchNorm statistics: its own train-mode forward from its initial statistics.
  _, own_stats = steps.forward_train(states[2], states[2].params, batch["image"],
                                     batch_stats=teacher(2)["batch_stats"])
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               teacher(3)["batch_stats"], own_stats)
  assert not np.allclose(jax.tree.leaves(teacher(3)["batch_stats"])[0],
                         jax.tree.leaves(states[3].batch_stats)[0])
  # Steps 3, 4 (on the ramp): θ̃ ← γθ̃ + (1−γ)θ with γ = ema_ramp = 0.99.
  for i in (3, 4):
    expected = jax.tree.map(lambda tp, p: 0.99 * tp + 0.01 * p, teacher(i)["params"],
                            states[i].params)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
                 teacher(i + 1)["params"], expected)


def test_the_step_descends_cross_entropy_plus_the_weighted_consistency(trajectory):
  _, _, batch, states, metrics, _ = trajectory
  state, after = states[3], states[4]  # t = 3: u = 1/2, w_t = exp(−5/4)
  w_t = np.exp(-5 * 0.25)
  np.testing.assert_allclose(metrics[3]["meta_weight"], w_t, rtol=1e-6)
  images, labels = batch["image"], batch["label"]
  teacher_logits, _ = steps.forward_train(state, after.method_state["teacher"]["params"], images,
                                          batch_stats=state.method_state["teacher"]["batch_stats"])
  q = jax.nn.softmax(teacher_logits)
  _, features = state.apply_fn(state.method_state["features"], images, train=False)
  label_sets = mlnt.synthetic_label_sets(mlnt.label_key(state), features, labels, 2, 0.5, 3)
  assert (label_sets != labels).any()

  def objective(params):
    logits, _ = steps.forward_train(state, params, images)
    consistency = mlnt.consistency(state, params, images, label_sets, q, 0.2)[0]
    return losses.cross_entropy(logits, labels) + w_t * consistency, consistency

  (loss, consistency), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(state.params)
  np.testing.assert_allclose(metrics[3]["loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics[3]["consistency"], consistency, rtol=1e-5)
  taken = jax.tree.map(lambda p, n: (p - n) / LR, state.params, after.params)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
  for got, want in zip(jax.tree.leaves(taken), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, want, atol=2e-4 * scale)


def test_reference_start_test_full_weight_and_chained_batch_statistics():
  batch = method_checks.toy_batch(noisy_fraction=0.2)
  method, state, config = method_checks.toy_state(
      "mlnt_reference", "conv_bn", batch=batch, **{**FAST, "mlnt.start_step": 2})
  assert method.models == ()  # only the student is evaluated
  phase = method_checks.phase_named(method, "mlnt")
  first = phase.first_epoch
  state = method_checks.begin_phase(method, phase, state, batch)
  train = {k: batch[k] for k in ("image", "label", "index")}
  step = jax.jit(phase.step)
  active = []
  for epoch in (0, 0, 1, 2):  # epoch 0 "resumed" once: its batch index runs on
    state = method.begin_epoch(state, first + epoch, LR)
    for _ in range(2 if epoch == 0 else 4):
      before = state
      state, metrics = step(state, train)
      active.append(float(metrics["meta_active"]))
      if active[-1]:
        np.testing.assert_allclose(metrics["meta_weight"], 1.0)  # no ramp
  # Within-epoch index > 2 or 0-based student epoch ≥ 2.
  assert active == [0, 0, 0, 1] + [0, 0, 0, 1] + [1, 1, 1, 1]
  # The conventional forward's statistics, then each fast forward's folded in, in turn.
  @jax.jit
  def chained_statistics(before, images, labels):
    _, stats = steps.forward_train(before, before.params, images)
    (_, features), _ = before.apply_fn(before.method_state["features"], images, train=True,
                                       mutable=["batch_stats"])
    label_sets = mlnt.synthetic_label_sets(mlnt.label_key(before), features, labels, 2, 0.5, 3)
    for synthetic in label_sets:
      fast = steps.inner_update(before, images, lambda z: losses.cross_entropy(z, synthetic), 0.2)
      _, stats = steps.forward_train(before, fast, images, batch_stats=stats)
    return stats

  stats = chained_statistics(before, train["image"], train["label"])
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               state.batch_stats, stats)
  _, plain_stats = steps.forward_train(before, before.params, train["image"])
  assert not np.allclose(jax.tree.leaves(state.batch_stats)[0], jax.tree.leaves(plain_stats)[0])


@pytest.mark.parametrize("name", ["mlnt", "mlnt_reference"])
def test_each_phase_lowers_its_own_loss(name):
  settings = {"mlnt.start_step": 0, "mlnt.ramp_end_step": 5, "mlnt.num_synthetic": 2,
              "mlnt.neighbours": 3}
  method_checks.assert_lowers_own_loss(name, "feature net", **settings)
  method_checks.assert_lowers_own_loss(name, "mlnt", **settings)


def _tiny_mlnt(**overrides):
  return tiny_config.with_overrides(tiny_config.get_config(), **{
      "method": "mlnt", "num_epochs": 2, "mlnt.feature_epochs": 1, "mlnt.num_synthetic": 2,
      "mlnt.neighbours": 3, "mlnt.start_step": 5, "mlnt.ramp_end_step": 20, **overrides})


@pytest.mark.slow
def test_end_to_end_two_trainings_and_resume(tmp_path, monkeypatch):
  config = _tiny_mlnt()
  (result,) = experiment.run(config, str(tmp_path / "a"))["mlnt"]
  history = result["history"]
  assert [h["phase"] for h in history] == ["feature net", "mlnt", "mlnt"]
  assert all(h["model"] in ("student", "teacher") for h in history)
  assert all(f"{m}/meta_accuracy" in h for h in history for m in ("student", "teacher"))
  assert result["best"]["epoch"] >= 2  # the feature net's epoch is not selected
  state, _ = trained.load_trained_state(str(tmp_path / "a"))
  table = state.method_state
  # The feature net is the first training's cross-entropy network: a one-epoch cross-entropy
  # run from the same seed ends where it does.
  experiment.run(tiny_config.with_overrides(config.copy_and_resolve_references(), **{
      "method": "cross_entropy", "num_epochs": 1}), str(tmp_path / "ce"))
  ce_state, _ = trained.load_trained_state(str(tmp_path / "ce"))
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               table["features"]["params"], ce_state.params)
  first = lambda tree: np.asarray(jax.tree.leaves(tree)[0])
  assert not np.allclose(first(state.params), first(table["features"]["params"]))
  assert not np.allclose(first(state.params), first(table["teacher"]["params"]))
  steps_per_epoch = history[0]["steps"]
  assert int(table["start_step"]) == steps_per_epoch and int(table["teacher_ready"]) == 1

  # Killed inside the student's training and resumed: the same run.
  tiny_config.run_killed(monkeypatch, lambda: experiment.run(config, str(tmp_path / "b")),
                         epoch=2)
  (resumed,) = experiment.run(config, str(tmp_path / "b"))["mlnt"]
  assert [h["train/loss"] for h in resumed["history"]] == [h["train/loss"] for h in history]
  state_b, _ = trained.load_trained_state(str(tmp_path / "b"))
  jax.tree.map(np.testing.assert_array_equal, state.method_state, state_b.method_state)
