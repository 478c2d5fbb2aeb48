"""Forward loss correction (Patrini et al., CVPR 2017): model the label noise by a row-stochastic
matrix `T_ij = P(ỹ = j | y = i)` and fit the noisy labels through it, `L = mean_B[−log Σ_i p̂_i
T_iỹ]` with `p̂ = clip(p, 1e-7, 1 − 1e-7)` and T fixed, so that the classifier's p estimates the
*clean* posterior.

Registry names (BASELINES.md §6):
- `forward` (published, no clean data): two trainings. Phase "estimator" trains cross-entropy on
  the noisy labels for E epochs (`config.forward.estimator_epochs`, 0 = `config.num_epochs`: a
  whole CE run, as the paper) with the configured schedule. When phase "forward" begins, P = the
  estimator's probabilities on all N training images (no augmentation, BatchNorm running
  statistics); per class i, `thr_i` = the 97th percentile (`config.forward.percentile`) of column
  `P[:, i]` with numpy's 'higher' method (an actual sample value), the anchor `k_i` = the sample
  with the largest `P[k, i]` strictly below `thr_i`, `T̂[i] = P[k_i]`, row-normalised. Then a FRESH
  classifier (its own initialisation and optimiser state, made at the start and kept in
  `method_state["fresh"]`) trains `config.num_epochs` epochs with L and T̂, the learning-rate
  schedule restarting at the phase's first epoch. The method trains E + num_epochs epochs; only
  the second training's epochs select the best model.
- `forward_oracle`: one training with the true T: row-normalised counts of the (clean, noisy)
  pairs of the training labels. It NEEDS CLEAN LABELS (`StateContext.clean_labels`, synthetic
  noise): a class with no counted pair (clean labels unknown, −1, or a class absent) gets the
  identity row, i.e. no correction, since a jittable `init_state` cannot raise on the data.
- `forward_reference` (the MetaLabelNet authors' code): the oracle's counts, but (i) counted over
  the unshuffled training order (= sample-id order) in batches of 32 with a buffered fancy-index
  increment, so a pair counts at most once per batch of 32 consecutive ids; (ii) normalised as
  numpy's `T / T.sum(axis=1)`, which divides column j by the sum of row j; (iii) T multiplies the
  *logits* and softmax is applied twice: `L = mean_B[lse(u) − u_ỹ]`, `u = softmax(z·T)`. Also needs
  clean labels (empty rows: identity, as the oracle).

Defaults: E = num_epochs (Patrini: a full CE run; the reference uses the true T instead), the 97th
percentile (Patrini's code). Patrini's CIFAR-10 runs: ResNet, lr 0.1/0.01/0.001 at epochs 40/80,
120 epochs, batch 128, weight decay 1e-4; here the shared protocol.

Departure from BASELINES.md: P comes from the estimator as it ends (its last epoch), not from its
best-validation checkpoint (Patrini: the lowest loss on 10% held-out noisy data) — the loop's
start pass sees the current state. Samples with label −1 (unlabelled) add nothing to any loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mln_jax import config as config_lib, losses, steps
from mln_jax.methods.base import Batch, Method, Phase, StateContext
from mln_jax.train_state import TrainState, copy_tree

PROBABILITY_CLIP = 1e-7
# The reference counts (clean, noisy) pairs in loader batches of this size.
REFERENCE_COUNT_BATCH = 32


def forward_loss(logits: jax.Array, labels: jax.Array, noise_matrix: jax.Array) -> jax.Array:
  """`mean[−log Σ_i p̂_i T_iỹ]`, `p̂ = clip(softmax(logits), 1e-7, 1 − 1e-7)`, over the labelled
  samples (label −1: unlabelled).

  Args:
    logits: (B, C) classifier logits.
    labels: (B,) int given (noisy) labels, −1 for none.
    noise_matrix: (C, C) row-stochastic T, `T[i, j] = P(noisy j | clean i)`.

  Returns:
    The scalar loss.
  """
  p_hat = jnp.clip(jax.nn.softmax(logits), PROBABILITY_CLIP, 1.0 - PROBABILITY_CLIP)
  noisy_probs = p_hat @ noise_matrix
  labelled = labels >= 0
  chosen = jnp.take_along_axis(noisy_probs, jnp.maximum(labels, 0)[:, None], axis=1)[:, 0]
  # Unlabelled rows read 1 before the log, so that no 0 there can make a NaN gradient.
  return losses.mean_over_labelled(-jnp.log(jnp.where(labelled, chosen, 1.0)), labels)


def forward_reference_loss(logits: jax.Array, labels: jax.Array, noise_matrix: jax.Array
                           ) -> jax.Array:
  """The reference's corrected loss: `mean[lse(u) − u_ỹ]`, `u = softmax(logits @ T)` (T on the
  logits, softmax twice), over the labelled samples (label −1: unlabelled)."""
  u = jax.nn.softmax(logits @ noise_matrix)
  log_u = jax.nn.log_softmax(u)
  per_sample = -jnp.take_along_axis(log_u, jnp.maximum(labels, 0)[:, None], axis=1)[:, 0]
  return losses.mean_over_labelled(per_sample, labels)


def percentile_index(num: int, percentile: float) -> int:
  """The position in an ascending sort of `num` values of numpy's `percentile(..., method=
  'higher')`: numpy itself, on the positions."""
  return int(np.percentile(np.arange(num), percentile, method="higher"))


def estimate_noise_matrix(probs: jax.Array, percentile: float = 97.0) -> jax.Array:
  """Patrini's anchor estimator T̂ from (N, C) class probabilities on the noisy training set.

  Per class i: `thr_i` = the `percentile`-th percentile of `probs[:, i]` ('higher': a sample's
  value); the anchor is the first sample with the largest `probs[k, i] < thr_i` (the first sample
  where none is below, as Patrini's argmax over zeroed values); `T̂[i] = probs[k_i]`; rows
  normalised to sum 1. Jittable (N is static).
  """
  probs = probs.astype(jnp.float32)
  position = percentile_index(probs.shape[0], percentile)
  thresholds = jnp.sort(probs, axis=0)[position]                      # (C,)
  below = jnp.where(probs < thresholds[None, :], probs, 0.0)          # (N, C)
  anchors = jnp.argmax(below, axis=0)                                 # (C,) sample ids
  rows = probs[anchors]
  return rows / rows.sum(axis=1, keepdims=True)


def _pair_one_hot(clean_labels: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """(N, C·C): one-hot of each sample's (clean, noisy) pair; zero where either is unknown."""
  known = (clean_labels >= 0) & (labels >= 0)
  pair = jnp.maximum(clean_labels, 0) * num_classes + jnp.maximum(labels, 0)
  return jax.nn.one_hot(pair, num_classes * num_classes) * known[:, None]


def _identity_where_empty(counts: jax.Array) -> jax.Array:
  # A clean class with no counted pair has nothing to say about its noise: leave it uncorrected.
  empty = counts.sum(axis=1, keepdims=True) == 0
  return jnp.where(empty, jnp.eye(counts.shape[0], dtype=counts.dtype), counts)


def oracle_noise_matrix(clean_labels: jax.Array, labels: jax.Array, num_classes: int
                        ) -> jax.Array:
  """The true T: row-normalised counts of the (clean, noisy) label pairs, over the samples where
  both are known (≥ 0); a row without counts is the identity row."""
  counts = _pair_one_hot(clean_labels, labels, num_classes).sum(0)
  counts = _identity_where_empty(counts.reshape(num_classes, num_classes))
  return counts / counts.sum(axis=1, keepdims=True)


def reference_noise_matrix(clean_labels: jax.Array, labels: jax.Array, num_classes: int,
                           count_batch: int = REFERENCE_COUNT_BATCH) -> jax.Array:
  """The reference's T: in each batch of `count_batch` consecutive sample ids a (clean, noisy) pair
  counts at most once (numpy's buffered `T[clean, noisy] += 1`), summed over batches; rows without
  counts become identity rows; then divided as numpy's `T / T.sum(axis=1)` broadcasts (column j by
  the sum of row j)."""
  pairs = _pair_one_hot(clean_labels, labels, num_classes)
  padding = -pairs.shape[0] % count_batch  # zero rows count nothing
  pairs = jnp.pad(pairs, ((0, padding), (0, 0)))
  counts = pairs.reshape(-1, count_batch, num_classes * num_classes).max(axis=1).sum(axis=0)
  counts = _identity_where_empty(counts.reshape(num_classes, num_classes))
  return counts / counts.sum(axis=1)[None, :]


def export_noise_matrix(state: TrainState) -> dict[str, jax.Array]:
  """The T the corrected network trained through, written as noise_matrix.npy (C × C)."""
  return {"noise_matrix": state.method_state["noise_matrix"]}


def corrected_step(loss):
  """A supervised step on `loss(logits, labels, T)` with T = `method_state["noise_matrix"]`."""
  def step(state: TrainState, batch: Batch):
    noise_matrix = state.method_state["noise_matrix"]
    return steps.supervised_step(lambda logits, labels: loss(logits, labels, noise_matrix))(
        state, batch)
  return step


def _check_percentile(config: ml_collections.ConfigDict) -> float:
  percentile = config.forward.percentile
  if not 0 <= percentile <= 100:
    raise ValueError(f"config.forward.percentile={percentile} must lie in [0, 100].")
  return percentile


def estimator_epochs(config: ml_collections.ConfigDict) -> int:
  """E: the epochs of the cross-entropy network T̂ is estimated from."""
  epochs = config.forward.estimator_epochs
  if epochs < 0:
    raise ValueError(f"config.forward.estimator_epochs={epochs} must be ≥ 0 (0: num_epochs).")
  return epochs or config.num_epochs


def method(config: ml_collections.ConfigDict) -> Method:
  """Forward correction with T̂ estimated from a cross-entropy network (no clean data)."""
  percentile = _check_percentile(config)
  first = estimator_epochs(config)

  def init_state(state: TrainState, context: StateContext) -> TrainState:
    fresh = context.new_classifier(jax.random.split(context.key)[0])
    fresh_copy = {"params": copy_tree(fresh.params), "batch_stats": copy_tree(fresh.batch_stats),
                  "opt_state": copy_tree(fresh.opt_state)}
    return state.replace(method_state={
        "noise_matrix": jnp.eye(context.num_classes, dtype=jnp.float32), "fresh": fresh_copy})

  def start_pass(state: TrainState, batch: Batch) -> jax.Array:
    return jax.nn.softmax(steps.predict(state, batch["image"]))

  def start(state: TrainState, probs: jax.Array) -> TrainState:
    fresh = state.method_state["fresh"]
    # The fresh copy stays in method_state, so checkpoints keep one structure in both phases.
    return state.replace(
        params=copy_tree(fresh["params"]), batch_stats=copy_tree(fresh["batch_stats"]),
        opt_state=copy_tree(fresh["opt_state"]),
        method_state={**state.method_state,
                      "noise_matrix": estimate_noise_matrix(probs, percentile)})

  return Method(
      "forward",
      (Phase("estimator", 0, steps.warmup_step, selects_best=False),
       Phase("forward", first, corrected_step(forward_loss),
             learning_rate=lambda epoch: config_lib.learning_rate_at(config, epoch - first),
             start_pass=start_pass, start=start)),
      init_state=init_state, export=export_noise_matrix, num_epochs=first + config.num_epochs)


def oracle_method(config: ml_collections.ConfigDict) -> Method:
  """Forward correction with the true T from the clean training labels (needs clean labels)."""
  del config  # no settings of its own

  def init_state(state: TrainState, context: StateContext) -> TrainState:
    noise_matrix = oracle_noise_matrix(context.clean_labels, context.labels, context.num_classes)
    return state.replace(method_state={"noise_matrix": noise_matrix.astype(jnp.float32)})

  return Method("forward_oracle", (Phase("forward", 0, corrected_step(forward_loss)),),
                init_state=init_state, export=export_noise_matrix)


def reference_method(config: ml_collections.ConfigDict) -> Method:
  """Forward correction as the MetaLabelNet reference runs it (needs clean labels)."""
  del config  # no settings of its own

  def init_state(state: TrainState, context: StateContext) -> TrainState:
    noise_matrix = reference_noise_matrix(context.clean_labels, context.labels,
                                          context.num_classes)
    return state.replace(method_state={"noise_matrix": noise_matrix.astype(jnp.float32)})

  return Method("forward_reference",
                (Phase("forward", 0, corrected_step(forward_reference_loss)),),
                init_state=init_state, export=export_noise_matrix)
