"""Co-teaching and its reference variant: the forget-rate schedules, the selection count, the
exchange of small-loss selections between the two networks, their separate optimisers, the
exports, and a run through the loop that evaluates both networks."""

import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import method_checks  # noqa: E402
import tiny_config  # noqa: E402
from mln_jax import experiment, methods  # noqa: E402
from mln_jax.methods import coteaching  # noqa: E402

NAMES = ("coteaching", "coteaching_reference")


def _leaves_equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _train_ce(state, params, batch_stats, images, labels):
  """Per-sample cross-entropy (numpy, float64) of a network's train-mode forward."""
  (logits, _), _ = state.apply_fn({"params": params, "batch_stats": batch_stats}, images,
                                  train=True, mutable=["batch_stats"])
  z = np.asarray(logits, np.float64)
  log_p = z - z.max(1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
  return -log_p[np.arange(len(labels)), np.asarray(labels)]


def _smallest(values, n):
  mask = np.zeros(len(values), bool)
  mask[np.argsort(values, kind="stable")[:n]] = True
  return mask


# --- schedules ---------------------------------------------------------------------------------


def test_forget_rate_schedules_of_both_variants():
  published = [coteaching.forget_rate(e, 0.4, 10, 1.0) for e in range(13)]
  np.testing.assert_allclose(published, [0.4 * e / 9 for e in range(10)] + [0.4] * 3, atol=1e-12)
  reference = [coteaching.forget_rate(e, 0.2, 10, 0.2) for e in range(13)]
  top = 0.2 ** 0.2
  np.testing.assert_allclose(reference, [top * e / 9 for e in range(10)] + [0.2] * 3, atol=1e-12)
  assert abs(reference[9] - 0.72478) < 1e-5 and reference[10] == 0.2  # the reference's drop
  assert coteaching.forget_rate(0, 0.3, 1) == 0.0  # linspace of one point
  assert coteaching.forget_rate(0, 0.3, 0) == 0.3  # no ramp

  # The methods' begin_epoch stores exactly these (float32), and sets both networks' rates.
  batch = method_checks.toy_batch()
  for name, expected in zip(NAMES, (published, reference)):
    method, state, _ = method_checks.toy_state(name, batch=batch,
                                               **{"noise.rate": 0.4, "noise.kind": "uniform"})
    for epoch in range(13):
      begun = method.begin_epoch(state, epoch, 0.0123)
      assert begun.method_state["forget_rate"].dtype == jnp.float32
      assert float(begun.method_state["forget_rate"]) == np.float32(expected[epoch])
      for opt_state in (begun.opt_state, begun.method_state["peer"]["opt_state"]):
        assert float(opt_state.hyperparams["learning_rate"]) == np.float32(0.0123)


def test_forget_rate_comes_from_the_config():
  method, state, _ = method_checks.toy_state("coteaching", **{"noise.rate": 0.3})
  assert np.isclose(float(method.begin_epoch(state, 20, 0.1).method_state["forget_rate"]), 0.3)
  method, state, _ = method_checks.toy_state("coteaching", **{"noise.rate": 0.3,
                                                             "coteaching.forget_rate": 0.1,
                                                             "coteaching.num_gradual": 3,
                                                             "coteaching.exponent": 2.0})
  rates = [float(method.begin_epoch(state, e, 0.1).method_state["forget_rate"]) for e in range(4)]
  np.testing.assert_allclose(rates, [0.0, 0.005, 0.01, 0.1], rtol=1e-6)
  # The reference ignores the configured rate: tau = 0.2 and c = 0.2 always.
  method, state, _ = method_checks.toy_state("coteaching_reference",
                                             **{"coteaching.forget_rate": 0.5})
  assert np.isclose(float(method.begin_epoch(state, 12, 0.1).method_state["forget_rate"]), 0.2)
  # Real noise (no synthetic rate): the configured rate still, with a warning.
  method, state, _ = method_checks.toy_state("coteaching", **{"noise.rate": 0.3,
                                                             "noise.kind": "none"})
  assert np.isclose(float(method.begin_epoch(state, 20, 0.1).method_state["forget_rate"]), 0.3)
  with pytest.raises(ValueError, match=r"must lie in \[0, 1\)"):
    methods.get(method_checks.toy_config("coteaching", **{"coteaching.forget_rate": 1.0}))


def test_num_kept_by_hand():
  assert int(coteaching.num_kept(32, 0.0)) == 32
  assert int(coteaching.num_kept(32, 0.2)) == 25                 # 25.6
  assert int(coteaching.num_kept(32, 0.25)) == 24                # exact
  assert int(coteaching.num_kept(10, np.float32(0.4))) == 6      # 5.99999994 in float32
  assert int(coteaching.num_kept(10, 0.9)) == 1
  assert int(coteaching.num_kept(128, 0.2 ** 0.2)) == 35         # 35.228
  assert int(coteaching.num_kept(80, 1.0)) == 0
  assert int(jax.jit(coteaching.num_kept)(jnp.int32(19), jnp.float32(0.5))) == 9


# --- losses and selection by hand ---------------------------------------------------------------


def test_losses_and_selection_by_hand():
  logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [-3.0, 1.0, 4.0]], np.float32)
  labels = np.array([0, 2, -1], np.int32)
  e = np.exp(logits.astype(np.float64))
  p = e / e.sum(1, keepdims=True)
  ce = np.array([-np.log(p[0, 0]), -np.log(p[1, 2]), 0.0])
  np.testing.assert_allclose(coteaching.per_sample_cross_entropy(jnp.asarray(logits), labels),
                             ce, rtol=1e-6)
  # The reference's "loss": log-softmax of the probabilities, lse(p) − p_y.
  lse_p = np.log(np.exp(p).sum(1))
  ranking = np.array([lse_p[0] - p[0, 0], lse_p[1] - p[1, 2], 0.0])
  np.testing.assert_allclose(coteaching.reference_ranking_loss(jnp.asarray(logits), labels),
                             ranking, rtol=1e-6)
  assert abs(ranking[1] - (np.log(3 * np.exp(1 / 3)) - 1 / 3)) < 1e-9

  # Exactly n selected, ties to the earlier position; unlabelled samples never.
  losses = jnp.array([0.5, 0.1, 0.5, 0.5, 0.2, 0.0])
  labelled = jnp.array([True, True, True, True, True, False])
  for n, expected in ((0, []), (2, [1, 4]), (3, [0, 1, 4]), (4, [0, 1, 2, 4]),
                      (6, [0, 1, 2, 3, 4])):
    mask = np.asarray(coteaching.small_loss_mask(losses, labelled, jnp.int32(n)))
    assert np.flatnonzero(mask).tolist() == expected, n
  selected = jnp.array([True, False, True, False, False, False])
  assert np.isclose(float(coteaching.selected_mean(losses, selected, jnp.int32(2))), 0.5)
  assert float(coteaching.selected_mean(losses, selected & False, jnp.int32(0))) == 0.0


# --- the step ----------------------------------------------------------------------------------


def _shuffled_batch(num=32, seed=0):
  """The toy batch with its samples' ids permuted (so table writes must follow `index`)."""
  batch = method_checks.toy_batch(num, seed=seed, noisy_fraction=0.3)
  order = np.random.default_rng(seed + 7).permutation(num)
  return {k: jnp.asarray(np.asarray(v)[order]) for k, v in batch.items()}


def test_selection_count_follows_the_schedule():
  batch = method_checks.toy_batch(noisy_fraction=0.2)
  train = {k: batch[k] for k in ("image", "label", "index")}
  cases = {"coteaching": ({"noise.rate": 0.4}, lambda e: 0.4 * min(e, 9) / 9 if e < 10 else 0.4,
                          32),
           # Nominal batch 40 (config.batch_size) on a batch of 32: n from 40, capped at 32.
           "coteaching_reference": ({"batch_size": 40},
                                    lambda e: 0.2 ** 0.2 * e / 9 if e < 10 else 0.2, 40)}
  built = {}
  for name, (overrides, rate, nominal) in cases.items():
    method, state, _ = method_checks.toy_state(name, batch=batch, **overrides)
    step = jax.jit(method.phases[0].step)
    built[name] = method, state, step
    counts = []
    for epoch in (0, 3, 5, 9, 10, 12):
      begun = method.begin_epoch(state, epoch, 0.05)
      new_state, metrics = step(begun, train)
      expected = min(math.floor((1 - rate(epoch)) * nominal), 32)
      counts.append(expected)
      assert int(metrics["num_kept"]) == expected, (name, epoch)
      for table in ("selected_by_net1", "selected_by_net2"):
        assert int(new_state.method_state[table].sum()) == expected, (name, epoch, table)
    assert len(set(counts)) >= 3, counts  # the schedule is visible in the counts
  assert counts == [32, 30, 23, 11, 32, 32]  # the reference: from 40, incl. the drop at 10

  # Unlabelled samples are never selected, and n counts among the labelled ones.
  method, state, step = built["coteaching"]
  partial = dict(train, label=train["label"].at[:8].set(-1))
  new_state, metrics = step(method.begin_epoch(state, 12, 0.05), partial)
  assert int(metrics["num_kept"]) == math.floor(0.6 * 24)
  for table in ("selected_by_net1", "selected_by_net2"):
    selected = np.asarray(new_state.method_state[table])
    assert selected.sum() == 14 and not selected[np.asarray(train["index"][:8])].any()


@pytest.mark.parametrize("name", NAMES)
def test_each_network_learns_from_the_peers_small_loss_samples(name):
  batch = _shuffled_batch()
  images, labels, index = batch["image"], batch["label"], np.asarray(batch["index"])
  method, state, _ = method_checks.toy_state(name, batch=method_checks.toy_batch(),
                                             **{"noise.rate": 0.4, "optim.weight_decay": 1e-3})
  state = method.begin_epoch(state, 12, 0.05)       # f = 0.4 (published) / 0.2 (reference)
  n = 19 if name == "coteaching" else 25            # floor(0.6·32), floor(0.8·32)
  peer = state.method_state["peer"]
  nets = ((state.params, state.batch_stats), (peer["params"], peer["batch_stats"]))
  train_losses = [_train_ce(state, p, s, images, labels) for p, s in nets]
  if name == "coteaching":
    ranking = train_losses
  else:  # inference mode, softmax twice
    ranking = []
    for params, stats in nets:
      logits, _ = state.apply_fn({"params": params, "batch_stats": stats}, images, train=False)
      prob = np.asarray(jax.nn.softmax(logits), np.float64)
      picked = prob[np.arange(32), np.asarray(labels)]
      ranking.append(np.log(np.exp(prob).sum(1)) - picked)
  selected = [_smallest(r, n) for r in ranking]
  assert (selected[0] != selected[1]).any()  # the networks disagree, so the exchange matters

  new_state, metrics = jax.jit(method.phases[0].step)(state, batch)
  for k, table in enumerate(("selected_by_net1", "selected_by_net2")):
    written = np.zeros(32, bool)
    written[index] = selected[k]
    np.testing.assert_array_equal(np.asarray(new_state.method_state[table]), written)
  np.testing.assert_allclose(float(metrics["loss_net1"]), train_losses[0][selected[1]].mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss_net2"]), train_losses[1][selected[0]].mean(),
                             rtol=1e-5)

  # First step of SGD with momentum: θ' = θ − lr (∇ mean_{peer's S} ℓ + wd θ), each on its own.
  masks = [jnp.asarray(s, jnp.float32) for s in selected]
  for k, (params, stats) in enumerate(nets):
    def loss(p, stats=stats, mask=masks[1 - k]):
      (logits, _), _ = state.apply_fn({"params": p, "batch_stats": stats}, images, train=True,
                                      mutable=["batch_stats"])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return (ce * mask).sum() / n
    grads = jax.jit(jax.grad(loss))(params)
    expected = jax.tree.map(lambda p, g: p - 0.05 * (g + 1e-3 * p), params, grads)
    got = new_state.params if k == 0 else new_state.method_state["peer"]["params"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 got, expected)


def test_two_independent_networks_with_their_own_optimisers():
  batch = _shuffled_batch()
  method, state, _ = method_checks.toy_state("coteaching", batch=method_checks.toy_batch(),
                                             **{"noise.rate": 0.4})
  state = method.begin_epoch(state, 5, 0.05)
  peer = state.method_state["peer"]
  assert not _leaves_equal(state.params, peer["params"])  # independent initialisations
  assert _leaves_equal(state.opt_state, peer["opt_state"])  # both fresh
  step = jax.jit(method.phases[0].step)
  after, _ = step(state, batch)
  assert not _leaves_equal(after.params, state.params)
  assert not _leaves_equal(after.method_state["peer"]["params"], peer["params"])
  assert not _leaves_equal(after.method_state["peer"]["batch_stats"], peer["batch_stats"])
  assert not _leaves_equal(after.opt_state, after.method_state["peer"]["opt_state"])
  assert int(after.step) == int(state.step) + 1

  # A momentum in net 1's optimiser moves net 1 only: the peer steps from its own state.
  pushed = state.replace(opt_state=jax.tree.map(
      lambda x: x + 0.1 if x.dtype == jnp.float32 and x.ndim > 0 else x, state.opt_state))
  after_pushed, _ = step(pushed, batch)
  assert not _leaves_equal(after_pushed.params, after.params)
  assert _leaves_equal(after_pushed.method_state["peer"], after.method_state["peer"])


@pytest.mark.parametrize("name", NAMES)
def test_step_lowers_its_own_loss(name):
  method_checks.assert_lowers_own_loss(name, "coteaching", **{"coteaching.forget_rate": 0.2})


def test_exports_and_label_issue_scores():
  method, state, _ = method_checks.toy_state("coteaching", batch=method_checks.toy_batch(40),
                                             **{"noise.rate": 0.4})
  assert set(method.export(state)) == {"selected_by_net1", "selected_by_net2"}
  half = {k: v[:20] for k, v in _shuffled_batch(40).items()}  # 20 of the 40 samples
  state, _ = jax.jit(method.phases[0].step)(method.begin_epoch(state, 12, 0.05), half)
  exported = {k: np.asarray(v) for k, v in method.export(state).items()}
  assert all(v.shape == (40,) and v.dtype == np.int8 for v in exported.values())
  s1, s2 = exported["selected_by_net1"], exported["selected_by_net2"]
  unvisited = np.setdiff1d(np.arange(40), np.asarray(half["index"]))
  assert s1[unvisited].sum() == 0 and s1.sum() == 12 and s2.sum() == 12  # floor(0.6·20)
  scores = np.asarray(method.label_issue_scores(state))
  assert scores.dtype == np.float32
  np.testing.assert_array_equal(scores, 1.0 - (s1.astype(np.float32) + s2) / 2)
  assert set(np.unique(scores)) <= {0.0, 0.5, 1.0} and (scores == 0).any()
  assert method.predict(state, half["image"]).shape == (20, 3)
  names = [name for name, _ in method.models]
  assert names == ["net1", "net2"]
  peer_logits = dict(method.models)["net2"](state, half["image"])
  assert not np.allclose(peer_logits, method.predict(state, half["image"]))


# --- through the loop --------------------------------------------------------------------------


@pytest.mark.slow
def test_coteaching_run_evaluates_both_networks(tmp_path):
  config = tiny_config.with_overrides(tiny_config.get_config(), method="coteaching",
                                      num_epochs=3)
  (results,) = experiment.run(config, str(tmp_path))["coteaching"]
  run_dir = next(p.parent for p in tmp_path.rglob("results.json"))
  assert json.loads((run_dir / "results.json").read_text())["method"] == "coteaching"
  history = results["history"]
  assert len(history) == 3
  for record in history:
    assert record["model"] in ("net1", "net2")
    chosen = record["model"]
    other = "net2" if chosen == "net1" else "net1"
    assert record["test_accuracy"] == record[f"{chosen}/test_accuracy"]
    assert record["meta_accuracy"] >= record[f"{other}/meta_accuracy"]
    assert 0 < record["train/num_kept"] <= config.batch_size
  best = results["best"]
  best_record = history[best["epoch"] - 1]
  assert best["test_accuracy"] == best_record[f"{best_record['model']}/test_accuracy"]
  # The ramp over T_k = 10 epochs: 0, 0.4/9, 0.8/9 of each batch left out.
  kept = [record["train/num_kept"] for record in history]
  assert kept == [32.0, math.floor((1 - 0.4 / 9) * 32), math.floor((1 - 0.8 / 9) * 32)]
  for name in ("selected_by_net1", "selected_by_net2"):
    selected = np.load(run_dir / f"{name}.npy")
    assert selected.shape == (results["num_train"],) and set(np.unique(selected)) <= {0, 1}
  assert results["label_issues"] is not None and results["label_issues"]["measured_on"] > 0
  scores = np.load(run_dir / "label_issue_scores.npy")
  assert scores.shape == (results["num_train"],)


@pytest.mark.slow
def test_second_network_survives_kill_resume_and_two_runs(tmp_path, monkeypatch):
  from mln_jax import trained
  config = tiny_config.with_overrides(tiny_config.get_config(), method="coteaching",
                                      num_epochs=2, num_runs=2)
  uninterrupted = experiment.run(config, str(tmp_path / "a"))["coteaching"]
  tiny_config.run_killed(monkeypatch, lambda: experiment.run(config, str(tmp_path / "b")),
                         epoch=1)
  resumed = experiment.run(config, str(tmp_path / "b"))["coteaching"]
  assert [r["history"][-1]["train/loss"] for r in resumed] == [
      r["history"][-1]["train/loss"] for r in uninterrupted]
  peers = []
  for index in range(2):
    state, _ = trained.load_trained_state(str(tmp_path / "a" / f"run_{index}"))
    state_b, _ = trained.load_trained_state(str(tmp_path / "b" / f"run_{index}"))
    jax.tree.map(np.testing.assert_array_equal, state.method_state, state_b.method_state)
    peers.append(state.method_state["peer"]["params"])
  assert not _leaves_equal(*peers)  # each run has its own second network
