"""`steps.warmup_step` and `steps.meta_step` against a PyTorch oracle written from SPEC
(`mln_jax.torch_oracle`), on the paper's CIFAR-10 CNN in float64.

From identical weights and batches, JAX and PyTorch run 3 warm-up steps, freeze the extractor and
run 3 meta steps; after every step each compared quantity must agree per leaf to
max|jax − torch| ≤ 1e-8 · max|torch|: classifier parameters, BatchNorm running statistics, SGD
momentum, MetaLabelNet parameters, Adam moments and counts, soft labels, losses, meta loss and
the MetaLabelNet gradient (JAX's read off its Adam moments: `meta_step` does not return it). The
oracle differentiates with torch.autograd (second order); both JAX meta-gradients ('autodiff',
'jvp') and both BatchNorm settings are checked against it, two of the four combinations in the
slow tier. Measured: at most ~1e-11 (the momentum of conv biases, whose gradient before a
BatchNorm is rounding noise), ~1e-13 elsewhere.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from optax import tree_utils as otu  # noqa: E402

from mln_jax import models, steps, torch_oracle  # noqa: E402
from mln_jax.train_state import create_train_state, freeze_extractor  # noqa: E402

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
BATCH = 8
WARMUP_STEPS = 3
META_STEPS = 3
RTOL = 1e-8
MLN_LR, MLN_WD, ADAM_B1 = 1e-2, 1e-4, 0.9

# Largest relative difference seen per quantity and its leaf, printed at the end of the module
# (pytest -s).
MAX_DIFFS: dict[str, tuple[float, str]] = {}


def relative_difference(actual, expected) -> float:
  """max|actual − expected| / max|expected| (0 where both are all zero, inf where only expected
  is)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape
  diff, scale = np.max(np.abs(actual - expected)), np.max(np.abs(expected))
  if scale == 0:
    return 0.0 if diff == 0 else np.inf
  return float(diff / scale)


def assert_trees_close(what: str, actual, expected, rtol: float = RTOL) -> None:
  """Leaf by leaf: max|a − b| ≤ rtol · max|b|; integer leaves equal."""
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
  flat_b, tree_b = jax.tree_util.tree_flatten_with_path(expected)
  assert tree_a == tree_b, what
  worst = MAX_DIFFS.get(what, (0.0, ""))
  for (path, a), (_, b) in zip(flat_a, flat_b):
    name = f"{what}{jax.tree_util.keystr(path)}"
    if not np.issubdtype(np.asarray(b).dtype, np.floating):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
      continue
    difference = relative_difference(a, b)
    assert difference <= rtol, f"{name}: relative difference {difference:.3g} > {rtol:g}"
    worst = max(worst, (difference, name))
  MAX_DIFFS[what] = worst


def compared_state(state) -> dict:
  """The state's fields the test compares: everything a step updates, and the extractor."""
  return {
      "step": state.step, "params": state.params, "batch_stats": state.batch_stats,
      "sgd_momentum": otu.tree_get(state.opt_state, "trace"),
      "sgd_count": otu.tree_get(state.opt_state, "count"),
      "mln_params": state.mln_params,
      "adam_mu": otu.tree_get(state.mln_opt_state, "mu"),
      "adam_nu": otu.tree_get(state.mln_opt_state, "nu"),
      "adam_count": otu.tree_get(state.mln_opt_state, "count"),
      "extractor": (state.extractor_params, state.extractor_batch_stats),
  }


def assert_states_close(actual, expected, rtol: float = RTOL) -> None:
  actual, expected = compared_state(actual), compared_state(expected)
  for field in actual:
    assert_trees_close(field, actual[field], expected[field], rtol)


def make_batch(seed: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
  """A random batch for JAX (NHWC) and the same for the oracle (NCHW), in float64."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((BATCH, *IMAGE_SHAPE))
  labels = rng.integers(0, NUM_CLASSES, BATCH)
  jax_batch = {"image": images, "label": labels}
  return (jax_batch, torch_oracle.images_to_torch(images, torch.float64),
          torch_oracle.labels_to_torch(labels))


def meta_batches(step: int):
  return make_batch(100 + step), make_batch(200 + step)


def to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module", autouse=True)
def report_differences():
  yield
  print("\nlargest relative difference JAX vs torch oracle, per quantity:")
  for what, (value, leaf) in sorted(MAX_DIFFS.items()):
    print(f"  {what:26s} {value:9.3g}  {leaf}")


@pytest.fixture(scope="module")
def warmed():
  """JAX and the oracle after the warm-up from the same float64 weights, extractors frozen:
  `(jax_state, oracle_state, jax_losses, oracle_losses)`, the oracle's as a TrainState."""
  with jax.enable_x64(True):
    state = create_train_state(jax.random.PRNGKey(0), models.CifarCNN(num_classes=NUM_CLASSES),
                               IMAGE_SHAPE, NUM_CLASSES, mln_learning_rate=MLN_LR,
                               mln_weight_decay=MLN_WD)
    state = jax.tree.map(
        lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    oracle = torch_oracle.TorchMetaLabelNet.from_train_state(
        state, dtype=torch.float64, mln_learning_rate=MLN_LR, mln_weight_decay=MLN_WD)
    warmup = jax.jit(steps.warmup_step)
    jax_losses, oracle_losses = [], []
    for i in range(WARMUP_STEPS):
      jax_batch, images, labels = make_batch(i)
      state, metrics = warmup(state, jax_batch)
      jax_losses.append({k: float(v) for k, v in metrics.items()})
      oracle_losses.append({k: float(v) for k, v in oracle.warmup_step(images, labels).items()})
    state = freeze_extractor(state)
    oracle.freeze_extractor()
    return state, oracle.to_train_state(state), jax_losses, oracle_losses


@pytest.fixture(scope="module")
def runs(warmed):
  """Memoised phase-2 runs from the warmed-up states: `jax(meta_gradient, reference_bn)` and
  `oracle(reference_bn)` return the per-step records `(state, metrics)` (the oracle's autograd
  has no JAX meta-gradient setting)."""
  jax_start, oracle_start, _, _ = warmed
  cache = {}

  def jax_run(meta_gradient, reference_bn):
    key = ("jax", meta_gradient, reference_bn)
    if key not in cache:
      step = jax.jit(functools.partial(steps.meta_step, reference_batch_norm=reference_bn))
      soft_labels = jax.jit(steps.predict_soft_labels)
      records = []
      with jax.enable_x64(True):
        # The warm-up does not read the setting: one warm-up serves both meta-gradient settings.
        state = jax_start.replace(meta_gradient=meta_gradient)
        for i in range(META_STEPS):
          (batch, _, _), (meta_batch, _, _) = meta_batches(i)
          previous = state
          state, metrics = step(state, batch, meta_batch)
          metrics = {k: float(v) for k, v in metrics.items()}
          metrics["soft_labels"] = np.asarray(soft_labels(state, batch["image"]))
          metrics["mln_grads"] = adam_gradient(previous, state)
          records.append((to_numpy(state), metrics))
      cache[key] = records
    return cache[key]

  def oracle_run(reference_bn):
    key = ("oracle", reference_bn)
    if key not in cache:
      oracle = torch_oracle.TorchMetaLabelNet.from_train_state(
          oracle_start, dtype=torch.float64, mln_learning_rate=MLN_LR, mln_weight_decay=MLN_WD,
          reference_batch_norm=reference_bn)
      records = []
      for i in range(META_STEPS):
        (_, images, _), (_, meta_images, meta_labels) = meta_batches(i)
        out = oracle.meta_step(images, meta_images, meta_labels)
        metrics = {k: float(v) for k, v in out.items() if k not in ("mln_grads", "soft_labels")}
        metrics["soft_labels"] = out["soft_labels"].numpy()
        metrics["mln_grads"] = torch_oracle.torch_to_flax(out["mln_grads"],
                                                          oracle_start.mln_params)
        records.append((oracle.to_train_state(oracle_start), metrics))
      cache[key] = records
    return cache[key]

  return jax_run, oracle_run


def adam_gradient(before, after):
  """JAX's ∇_φ L_meta of one meta step, read off its Adam state (meta_step does not return it):
  mu' = b1·mu + (1 − b1)(g + wd·φ), so g = (mu' − b1·mu)/(1 − b1) − wd·φ."""
  mu_before = otu.tree_get(before.mln_opt_state, "mu")
  mu_after = otu.tree_get(after.mln_opt_state, "mu")
  return jax.tree.map(
      lambda m1, m0, phi: np.asarray((m1 - ADAM_B1 * m0) / (1 - ADAM_B1) - MLN_WD * phi),
      mu_after, mu_before, before.mln_params)


def test_conversion_round_trip_is_exact(warmed):
  jax_state = warmed[0]
  # SGD momentum from the warm-up; Adam moments too: fake a state after one MetaLabelNet update.
  with jax.enable_x64(True):
    adam = jax.tree.map(lambda p: p + 1.0, jax_state.mln_params)
    mln_opt_state = otu.tree_set(jax_state.mln_opt_state, mu=adam, nu=jax.tree.map(jnp.abs, adam))
    mln_opt_state = otu.tree_set(mln_opt_state, count=jnp.asarray(3, jnp.int32))
    jax_state = jax_state.replace(mln_opt_state=mln_opt_state)
  oracle = torch_oracle.TorchMetaLabelNet.from_train_state(jax_state, dtype=torch.float64)
  assert_states_close(oracle.to_train_state(jax_state), jax_state, rtol=0.0)
  assert int(otu.tree_get(oracle.to_train_state(jax_state).mln_opt_state, "count")) == 3


def test_warmup_matches_oracle(warmed):
  jax_state, oracle_state, jax_losses, oracle_losses = warmed
  for jax_metrics, oracle_metrics in zip(jax_losses, oracle_losses):
    for name in ("loss", "accuracy"):
      assert_trees_close(f"warmup_{name}", jax_metrics[name], oracle_metrics[name])
  assert_states_close(jax_state, oracle_state)
  assert int(jax_state.step) == WARMUP_STEPS


@pytest.mark.parametrize("meta_gradient,reference_bn", [
    ("autodiff", False),
    ("jvp", True),
    pytest.param("jvp", False, marks=pytest.mark.slow),
    pytest.param("autodiff", True, marks=pytest.mark.slow),
])
def test_meta_steps_match_oracle(runs, meta_gradient, reference_bn):
  jax_run, oracle_run = runs
  jax_records, oracle_records = jax_run(meta_gradient, reference_bn), oracle_run(reference_bn)
  for (jax_state, jax_metrics), (oracle_state, oracle_metrics) in zip(jax_records,
                                                                      oracle_records):
    for name in ("loss", "classification_loss", "entropy_loss", "meta_loss", "soft_labels",
                 "mln_grads"):
      assert_trees_close(name, jax_metrics[name], oracle_metrics[name])
    assert_states_close(jax_state, oracle_state)
  assert int(jax_records[-1][0].step) == WARMUP_STEPS + META_STEPS


def test_reference_batch_norm_moves_only_the_running_statistics(runs):
  """The two BatchNorm settings differ in the running statistics, in JAX and in the oracle, and in
  nothing else (training-mode forwards never read them): the parametrisation is not vacuous."""
  jax_run, oracle_run = runs
  for default, reference in [(oracle_run(False), oracle_run(True)),
                             (jax_run("autodiff", False), jax_run("jvp", True))]:
    default_state, reference_state = default[-1][0], reference[-1][0]
    differences = [relative_difference(a, b) for a, b in zip(
        jax.tree.leaves(reference_state.batch_stats), jax.tree.leaves(default_state.batch_stats))]
    print(f"\nrunning statistics, reference vs default BatchNorm: relative difference "
          f"{min(differences):.3g} to {max(differences):.3g} over the leaves")
    assert min(differences) > 1e-4, differences
    assert_trees_close("params_across_bn_settings", reference_state.params, default_state.params,
                       rtol=1e-10)


def test_comparison_detects_the_other_batch_norm_setting(runs):
  """JAX's default against the oracle's reference BatchNorm fails the comparison: it can fail."""
  jax_run, oracle_run = runs
  jax_state, oracle_state = jax_run("autodiff", False)[-1][0], oracle_run(True)[-1][0]
  with pytest.raises(AssertionError, match=r"batch_stats"):
    assert_trees_close("batch_stats", jax_state.batch_stats, oracle_state.batch_stats)
