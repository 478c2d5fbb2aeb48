"""The method registry and the seams a new method plugs into: names, a loss-only method in one
registry line, and per-sample state that follows every shuffle, checkpoint and run."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mln_jax import experiment, methods, steps, trained
from mln_jax.methods import Method, Phase
from mln_jax.train_state import set_learning_rate, state_from_config

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import tiny_config  # noqa: E402


def tiny(**overrides):
  return tiny_config.with_overrides(tiny_config.get_config(), **overrides)


def test_method_names_resolve_to_registry_entries():
  assert methods.resolve("metalabelnet") == ("metalabelnet",)
  assert methods.resolve("both") == ("cross_entropy", "metalabelnet")
  assert methods.resolve("metalabelnet, cross_entropy") == ("metalabelnet", "cross_entropy")
  assert methods.resolve(["cross_entropy", "both"]) == ("cross_entropy", "metalabelnet")
  published = methods.resolve("all")
  assert set(published) | set(methods.VARIANTS) == set(methods.names())
  assert not set(published) & set(methods.VARIANTS) and len(published) == 13
  assert methods.resolve("references") == methods.VARIANTS
  assert all(name.replace("_reference", "").replace("_oracle", "") in published
             for name in methods.VARIANTS)
  assert "l2rw" not in methods.resolve("table1") and len(methods.resolve("table1")) == 12
  with pytest.raises(ValueError, match=r"unknown method 'mixup'; choose from cross_entropy, sce, "
                                       r"gce, .*, metalabelnet, sce_reference, .* or a group: "
                                       r"both, table1, all, references"):
    methods.resolve("cross_entropy,mixup")
  with pytest.raises(ValueError, match="names 2 methods; one run trains one"):
    methods.get(tiny(method="both"))


def test_phases_of_the_two_methods():
  mln = methods.get(tiny())
  facts = [(p.name, p.first_epoch, p.uses_meta, p.selects_best, p.trains_on) for p in mln.phases]
  assert facts == [("warm-up", 0, False, False, "labelled"), ("metalabelnet", 2, True, True, "all")]
  assert [mln.phase_at(e).name for e in range(4)] == ["warm-up"] * 2 + ["metalabelnet"] * 2
  # Entering phase 2 at its start freezes the extractor; resuming inside it only marks it so.
  state = state_from_config(tiny(), (8, 8, 1), 10, jax.random.PRNGKey(0))
  assert mln.phases[1].enter(state, True).extractor_frozen
  resumed = mln.phases[1].enter(state, False)
  assert resumed.extractor_frozen and resumed.extractor_params is state.extractor_params
  (ce_phase,) = methods.get(tiny(method="cross_entropy")).phases
  assert ce_phase.step is mln.phases[0].step  # the warm-up is cross-entropy's step
  with pytest.raises(ValueError, match="phases must start at epoch 0"):
    Method("broken", (Phase("late", 3, steps.warmup_step),))
  with pytest.raises(ValueError, match="no phase selects the best epoch"):
    Method("blind", (Phase("only", 0, steps.warmup_step, selects_best=False),))


def test_the_loop_and_the_experiments_name_no_method():
  found = subprocess.run(
      ["git", "grep", "-n", "-e", '"metalabelnet"', "-e", '"cross_entropy"', "--", "mln_jax/",
       "experiments/*.py", ":!mln_jax/methods/", ":!mln_jax/config.py"],
      capture_output=True, text=True, cwd=TESTS.parent)
  if found.returncode == 128:
    pytest.skip("not a git checkout")
  assert found.stdout == ""


def _label_smoothing(epsilon):
  """A loss-only method's loss: cross-entropy against labels smoothed by `epsilon`."""
  def loss(logits, labels):
    labelled = labels >= 0
    targets = optax.smooth_labels(jax.nn.one_hot(jnp.maximum(labels, 0), logits.shape[-1]),
                                  epsilon)
    per_sample = optax.softmax_cross_entropy(logits, targets)
    return jnp.where(labelled, per_sample, 0.0).sum() / jnp.maximum(labelled.sum(), 1)
  return loss


@pytest.mark.slow
def test_a_loss_only_method_is_one_registry_entry(tmp_path, monkeypatch):
  monkeypatch.setitem(methods.REGISTRY, "label_smoothing", lambda config: Method(
      "label_smoothing", (Phase("label-smoothing", 0, steps.supervised_step(
          _label_smoothing(0.1))),)))
  results = experiment.run(tiny(method="label_smoothing,cross_entropy", num_epochs=2),
                           str(tmp_path))
  smoothed, plain = results["label_smoothing"][0], results["cross_entropy"][0]
  assert [h["phase"] for h in smoothed["history"]] == ["label-smoothing"] * 2
  assert smoothed["best"]["epoch"] >= 1 and smoothed["label_issues"] is None  # no soft labels
  # The same run but for the loss: the same first-epoch accuracy on the given labels would be a
  # coincidence, a different loss a certainty.
  assert smoothed["history"][0]["train/loss"] != plain["history"][0]["train/loss"]
  assert (tmp_path / "comparison.json").exists()


def _visit_counting_method(config):
  """A method with per-sample state (each sample's visits, and the label its batch carried), a
  per-epoch hook (epochs begun) and an export (the visits)."""
  del config
  base_step = steps.supervised_step(_label_smoothing(0.0))

  def init_state(state, context):
    num_train = context.num_train
    return state.replace(method_state={"visits": jnp.zeros(num_train, jnp.int32),
                                       "seen_label": jnp.full(num_train, -2, jnp.int32),
                                       "epochs_begun": jnp.zeros((), jnp.int32)})

  def begin_epoch(state, epoch, learning_rate):
    state = state.replace(opt_state=set_learning_rate(state.opt_state, learning_rate))
    table = state.method_state
    return state.replace(method_state={**table, "epochs_begun": table["epochs_begun"] + 1})

  def step(state, batch):
    state, metrics = base_step(state, batch)
    table = state.method_state
    return state.replace(method_state={
        **table, "visits": table["visits"].at[batch["index"]].add(1),
        "seen_label": table["seen_label"].at[batch["index"]].set(batch["label"])}), metrics

  return Method("visit_counting", (Phase("counting", 0, step),), init_state=init_state,
                begin_epoch=begin_epoch,
                export=lambda state: {"visits": state.method_state["visits"]})


@pytest.mark.slow
def test_per_sample_state_follows_shuffles_checkpoints_and_runs(tmp_path, monkeypatch):
  monkeypatch.setitem(methods.REGISTRY, "visit_counting", _visit_counting_method)
  config = tiny(method="visit_counting", num_runs=2, num_epochs=3)
  uninterrupted = experiment.run(config, str(tmp_path / "a"))["visit_counting"]

  tiny_config.run_killed(monkeypatch, lambda: experiment.run(config, str(tmp_path / "b")), epoch=2)
  resumed = experiment.run(config, str(tmp_path / "b"))["visit_counting"]
  assert [r["history"][-1]["train/loss"] for r in resumed] == [
      r["history"][-1]["train/loss"] for r in uninterrupted]

  steps_per_epoch = uninterrupted[0]["history"][0]["steps"]
  for index, run in enumerate(uninterrupted):
    state, run_config = trained.load_trained_state(str(tmp_path / "a" / f"run_{index}"))
    state_b, _ = trained.load_trained_state(str(tmp_path / "b" / f"run_{index}"))
    jax.tree.map(np.testing.assert_array_equal, state.method_state, state_b.method_state)
    visits, seen = (np.asarray(state.method_state[k]) for k in ("visits", "seen_label"))
    labels = np.load(tmp_path / "a" / f"run_{index}" / "labels.npz")["noisy"]
    # Every step visited a batch of distinct samples; shuffles differ between epochs.
    assert visits.sum() == 3 * steps_per_epoch * config.batch_size and visits.max() <= 3
    assert (visits < 3).any()
    # The table entry of sample i holds sample i's label, in each run's own noisy labels.
    np.testing.assert_array_equal(seen[visits > 0], labels[visits > 0])
    assert np.all(seen[visits == 0] == -2)
    # Once per epoch, also across the kill; the export is the run's own table.
    assert int(state_b.method_state["epochs_begun"]) == 3
    np.testing.assert_array_equal(np.load(tmp_path / "b" / f"run_{index}" / "visits.npy"),
                                  np.asarray(state_b.method_state["visits"]))
  labels_0, labels_1 = (np.load(tmp_path / "a" / f"run_{i}" / "labels.npz")["noisy"]
                        for i in (0, 1))
  assert (labels_0 != labels_1).any()  # the runs' tables are their own, not copies


@pytest.mark.slow
def test_streamed_batches_carry_their_samples_ids(tmp_path, monkeypatch):
  pytest.importorskip("tensorflow")
  import fake_layouts
  import test_streamed
  fake_layouts.clothing1m(tmp_path / "clothing1m")
  monkeypatch.setitem(methods.REGISTRY, "visit_counting", _visit_counting_method)
  config = test_streamed.tiny_streamed("clothing1m", tmp_path / "clothing1m", num_epochs=2,
                                       method="visit_counting")
  results = experiment.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["method"] == "visit_counting" and results["last"]["epoch"] == 2
  state, _ = trained.load_trained_state(str(tmp_path / "run"))
  visits, seen = (np.asarray(state.method_state[k]) for k in ("visits", "seen_label"))
  labels = np.load(tmp_path / "run" / "labels.npz")["noisy"]
  assert visits.sum() == 2 * 48 and visits.max() == 2  # 48 images, batches of 8: all, twice
  np.testing.assert_array_equal(seen, labels)
