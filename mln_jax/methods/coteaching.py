"""Co-teaching (Han et al., NeurIPS 2018): two networks teach each other with small-loss samples.

Two classifiers, initialised independently, train side by side on the same batches. Each ranks the
batch by its own per-sample loss and keeps the `n` samples it finds easiest (probably clean), and
these train the *other* network: θ1 descends the mean cross-entropy over θ2's selection and vice
versa, each with its own SGD state, so that the two networks' different errors filter each other's
noisy samples. The share left out, the forget rate f(e), ramps up linearly over the first T_k
epochs and then stays at τ (BASELINES.md §9):

  f(e) = τ^c · e / (T_k − 1) for e < T_k (the Co-teaching code's `linspace(0, τ^c, T_k)`),
  f(e) = τ after;  n = floor((1 − f(e)) · B).

Both networks are evaluated after every epoch; per run, the one with the higher meta (validation)
accuracy stands for the epoch (`Method.models`: "net1", "net2").

Registry names:
- `coteaching` (the published algorithm): τ = `config.coteaching.forget_rate`, or the configured
  noise rate where that is < 0 (the paper's choice: the true noise rate), c =
  `config.coteaching.exponent` (1), T_k = `config.coteaching.num_gradual` (10). Ranking by the
  stop-gradient cross-entropy of the training forward itself (train-mode BN, full batch): one
  forward and one backward per network (2F 2B). The paper's own optimiser (Adam 1e-3, decaying from
  epoch 80 of 200, batch 128, a 9-layer CNN) is not used: the shared SGD protocol is.
- `coteaching_reference` (the MetaLabelNet authors' `baselines.py`): (i) τ = 0.2 whatever the
  noise and c = 0.2, so f ramps from 0 to 0.2^0.2 ≈ 0.725 over epochs 0 … T_k − 1 and drops to 0.2
  at epoch T_k (reproduced, drop included); (ii) the ranking comes from an extra no-gradient forward
  of each network in inference mode (BN running statistics) and ranks by `lse(p) − p_ỹ` with
  p = softmax(z) (softmax applied twice), and n = floor((1 − f) · nominal batch) with the nominal
  batch `config.batch_size` (the reference's 128 also for its 80-sample last batch), capped at the
  batch's labelled samples.
  Not reproduced: (iii) the reference trains each network with a second train-mode forward of only
  the peer-selected subset, so its BN batch statistics (and running averages) come from the
  subset. Under jit the subset's size n is a traced per-epoch value, and our BatchNorm has no mask
  for statistics over part of a batch, so this variant trains on the full-batch train-mode forward
  (as the published algorithm), the loss averaged over the peer's selection. (iv) The reference
  reports max(test1, test2) at the epoch of max(val1, val2), which is optimistic; the loop reports
  the test accuracy of the network that has the higher meta accuracy.

Choices BASELINES.md leaves open:
- Unlabelled samples (label −1) are never selected: they rank last (+inf), and n counts among the
  batch's labelled samples (n = floor((1 − f) · #labelled); equal to B on the labelled-only
  batches this phase trains on).
- n is computed in float32 with a 1e-3 tolerance below the floor, so that a product that is an
  integer in exact arithmetic (f = 0.4, B = 10) keeps its n rather than losing a sample to
  rounding. Ties in the loss are broken by batch position (a stable sort), so exactly n samples
  are selected.
- The peer's dropout (for classifiers that have dropout) uses a key of its own.
- `selected_by_net1` / `selected_by_net2` (exported, int8) hold each sample's selection at its
  last visit (0 for a sample never visited); `label_issue_scores` = 1 − (s1 + s2)/2: a sample
  both networks left out scores 1. A real-noise dataset (noise.kind 'none') has no synthetic
  noise rate: set `config.coteaching.forget_rate` to an estimate of it (otherwise
  `config.noise.rate` is used, with a warning).
"""

from __future__ import annotations

import math
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mln_jax import steps
from mln_jax.methods.base import Method, Phase, StateContext
from mln_jax.train_state import TrainState, set_learning_rate

Batch = dict[str, jax.Array]

# The reference's fixed schedule constants (BASELINES.md §9, deviation (i)).
REFERENCE_FORGET_RATE = 0.2
REFERENCE_EXPONENT = 0.2
# Below-the-floor tolerance of n = floor((1 − f)·B): float32 products of exact integers.
_KEEP_TOLERANCE = 1e-3
# Folded into the method's key for the second network, and into the data key for its dropout.
_PEER_INIT = 0x70656572
_PEER_DROPOUT = 0x64726f70


def forget_rate(epoch: int, tau: float, num_gradual: int, exponent: float = 1.0) -> float:
  """The share of each batch left out at 0-based `epoch`: `linspace(0, tau**exponent,
  num_gradual)[epoch]` during the ramp (e < T_k), `tau` after."""
  if epoch < num_gradual:
    return float(np.linspace(0.0, tau ** exponent, num_gradual)[epoch])
  return float(tau)


def num_kept(batch_size: int | jax.Array, rate: float | jax.Array) -> jax.Array:
  """n = floor((1 − rate)·batch_size), in float32 (jittable), clipped to [0, batch_size]; a
  product within 1e-3 below an integer counts as that integer (float32 rounding)."""
  size = jnp.asarray(batch_size, jnp.float32)
  kept = jnp.floor((1.0 - jnp.asarray(rate, jnp.float32)) * size + _KEEP_TOLERANCE)
  return jnp.clip(kept, 0.0, size).astype(jnp.int32)


def per_sample_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """(B,) cross-entropy `lse(z) − z_ỹ` of each sample; 0 for unlabelled ones (label −1)."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
  picked = jnp.take_along_axis(log_p, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
  return jnp.where(labels >= 0, -picked, 0.0)


def reference_ranking_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """(B,) the reference's ranking "loss": cross-entropy applied to the probabilities,
  `lse(p) − p_ỹ` with p = softmax(z); 0 for unlabelled samples."""
  p = jax.nn.softmax(logits.astype(jnp.float32))
  picked = jnp.take_along_axis(p, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
  return jnp.where(labels >= 0, jax.nn.logsumexp(p, axis=-1) - picked, 0.0)


def small_loss_mask(losses: jax.Array, labelled: jax.Array, n: jax.Array) -> jax.Array:
  """(B,) bool: the `n` labelled samples with the smallest `losses` (ties to the earlier batch
  position, so exactly min(n, #labelled) are selected)."""
  ranked = jnp.where(labelled, losses, jnp.inf)
  order = jnp.argsort(ranked, stable=True)
  ranks = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  return (ranks < n) & labelled


def selected_mean(losses: jax.Array, selected: jax.Array, n: jax.Array) -> jax.Array:
  """The mean of `losses` over the `n` `selected` samples (0 where none are)."""
  return jnp.where(selected, losses, 0.0).sum() / jnp.maximum(n, 1).astype(jnp.float32)


def _peer_variables(state: TrainState) -> dict[str, Any]:
  peer = state.method_state["peer"]
  return {"params": peer["params"], "batch_stats": peer["batch_stats"]}


def predict_peer(state: TrainState, images: jax.Array) -> jax.Array:
  """The second network's logits in inference mode (its own BN running statistics)."""
  logits, _ = state.apply_fn(_peer_variables(state), images, train=False)
  return logits


def init_state(state: TrainState, context: StateContext) -> TrainState:
  """Adds the second network (independent initialisation, own SGD state), the forget rate and the
  per-sample selection tables (jittable)."""
  peer = context.new_classifier(jax.random.fold_in(context.key, _PEER_INIT))
  num_train = context.num_train
  method_state = dict(state.method_state)
  method_state.update({
      "peer": {"params": peer.params, "batch_stats": peer.batch_stats,
               "opt_state": peer.opt_state},
      "forget_rate": jnp.zeros((), jnp.float32),
      "selected_by_net1": jnp.zeros((num_train,), jnp.int8),
      "selected_by_net2": jnp.zeros((num_train,), jnp.int8),
  })
  return state.replace(method_state=method_state)


def make_begin_epoch(tau: float, num_gradual: int, exponent: float):
  """`begin_epoch`: both networks' learning rates and this epoch's forget rate f(e)."""
  def begin_epoch(state: TrainState, epoch: int, learning_rate: float) -> TrainState:
    method_state = dict(state.method_state)
    peer = dict(method_state["peer"])
    peer["opt_state"] = set_learning_rate(peer["opt_state"], learning_rate)
    method_state["peer"] = peer
    method_state["forget_rate"] = jnp.full_like(
        method_state["forget_rate"], forget_rate(epoch, tau, num_gradual, exponent))
    return state.replace(opt_state=set_learning_rate(state.opt_state, learning_rate),
                         method_state=method_state)
  return begin_epoch


def make_step(reference: bool = False, nominal_batch_size: int | None = None):
  """The Co-teaching step: both networks' SGD steps in one, each on the peer's selection.

  Args:
    reference: rank by the reference's no-gradient inference-mode `lse(p) − p_ỹ` (and count n
      from `nominal_batch_size`) instead of the training forward's stop-gradient cross-entropy.
    nominal_batch_size: with `reference`, n = floor((1 − f)·nominal), capped at the batch's
      labelled samples.
  """
  def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    method_state = state.method_state
    peer = method_state["peer"]
    images, labels = batch["image"], batch["label"]
    labelled = labels >= 0
    num_labelled = labelled.sum()
    rate = method_state["forget_rate"]
    if reference:
      # As the reference's slice [:n] of a shorter (last) batch: n from the nominal size, then
      # capped at the batch's labelled samples.
      n = jnp.minimum(num_kept(nominal_batch_size or labels.shape[0], rate), num_labelled)
      # The reference's extra forwards: inference mode, no gradient, running statistics.
      rank1 = reference_ranking_loss(steps.predict(state, images), labels)
      rank2 = reference_ranking_loss(predict_peer(state, images), labels)
      rank1, rank2 = jax.lax.stop_gradient((rank1, rank2))
    else:
      n = num_kept(num_labelled, rate)
    # The peer's own dropout masks (classifiers with dropout; the others ignore the key).
    peer_view = state.replace(rng=jax.random.fold_in(state.rng, _PEER_DROPOUT))

    def objective(both):
      params1, params2 = both
      logits1, stats1 = steps.forward_train(state, params1, images)
      logits2, stats2 = steps.forward_train(peer_view, params2, images,
                                            batch_stats=peer["batch_stats"])
      loss1 = per_sample_cross_entropy(logits1, labels)
      loss2 = per_sample_cross_entropy(logits2, labels)
      if reference:
        keep1 = small_loss_mask(rank1, labelled, n)
        keep2 = small_loss_mask(rank2, labelled, n)
      else:
        keep1 = small_loss_mask(jax.lax.stop_gradient(loss1), labelled, n)
        keep2 = small_loss_mask(jax.lax.stop_gradient(loss2), labelled, n)
      # Each network learns from the samples its peer selected. The masks carry no gradient, so
      # ∇θ1 of the sum is ∇θ1 L1 and ∇θ2 is ∇θ2 L2.
      net1_loss = selected_mean(loss1, keep2, n)
      net2_loss = selected_mean(loss2, keep1, n)
      return net1_loss + net2_loss, (net1_loss, net2_loss, keep1, keep2, logits1, logits2,
                                     stats1, stats2)

    (_, aux), (grads1, grads2) = jax.value_and_grad(objective, has_aux=True)(
        (state.params, peer["params"]))
    net1_loss, net2_loss, keep1, keep2, logits1, logits2, stats1, stats2 = aux
    updates1, opt_state1 = state.tx.update(grads1, state.opt_state, state.params)
    updates2, opt_state2 = state.tx.update(grads2, peer["opt_state"], peer["params"])
    index = batch["index"]
    new_method_state = dict(method_state)
    new_method_state.update({
        "peer": {"params": optax.apply_updates(peer["params"], updates2),
                 "batch_stats": stats2, "opt_state": opt_state2},
        "selected_by_net1": method_state["selected_by_net1"].at[index].set(
            keep1.astype(jnp.int8)),
        "selected_by_net2": method_state["selected_by_net2"].at[index].set(
            keep2.astype(jnp.int8)),
    })
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates1),
                              batch_stats=stats1, opt_state=opt_state1,
                              method_state=new_method_state)
    n_float = jnp.maximum(n, 1).astype(jnp.float32)
    metrics = {
        "loss": 0.5 * (net1_loss + net2_loss),
        "loss_net1": net1_loss,
        "loss_net2": net2_loss,
        "accuracy": steps.labelled_accuracy(logits1, labels),
        "accuracy_net2": steps.labelled_accuracy(logits2, labels),
        "num_kept": n.astype(jnp.float32),
        "forget_rate": rate,
        # How much the two selections agree (they drift apart less as training goes on).
        "selection_overlap": (keep1 & keep2).sum() / n_float,
    }
    return new_state, metrics
  return step


def export(state: TrainState) -> dict[str, jax.Array]:
  """Each sample's selection by either network at its last visit (int8, sample-id order)."""
  return {name: state.method_state[name] for name in ("selected_by_net1", "selected_by_net2")}


def label_issue_scores(state: TrainState) -> jax.Array:
  """1 − (selected_by_net1 + selected_by_net2)/2: 1 where both networks left the sample out."""
  selected = (state.method_state["selected_by_net1"].astype(jnp.float32)
              + state.method_state["selected_by_net2"].astype(jnp.float32))
  return 1.0 - 0.5 * selected


def _build(name: str, tau: float, num_gradual: int, exponent: float, step) -> Method:
  if not 0.0 <= tau < 1.0:
    raise ValueError(f"{name}: the forget rate tau={tau} must lie in [0, 1).")
  if num_gradual < 0 or not math.isfinite(exponent) or exponent <= 0:
    raise ValueError(f"{name}: config.coteaching.num_gradual={num_gradual} must be >= 0 and "
                     f"exponent={exponent} > 0.")
  return Method(name, (Phase("coteaching", 0, step),), init_state=init_state,
                begin_epoch=make_begin_epoch(tau, num_gradual, exponent), predict=steps.predict,
                export=export, label_issue_scores=label_issue_scores,
                models=(("net1", steps.predict), ("net2", predict_peer)))


def _published_tau(config: ml_collections.ConfigDict) -> float:
  tau = config.coteaching.forget_rate
  if tau >= 0:
    return float(tau)
  if config.noise.kind == "none":
    logging.warning("coteaching: config.coteaching.forget_rate < 0 takes config.noise.rate = %s, "
                    "but noise.kind='none' (the dataset's own noisy labels): set "
                    "config.coteaching.forget_rate to an estimate of its noise rate.",
                    config.noise.rate)
  return float(config.noise.rate)


def method(config: ml_collections.ConfigDict) -> Method:
  """Published Co-teaching (see the module docstring)."""
  cfg = config.coteaching
  return _build("coteaching", _published_tau(config), cfg.num_gradual, cfg.exponent, make_step())


def reference_method(config: ml_collections.ConfigDict) -> Method:
  """The MetaLabelNet reference's Co-teaching: τ = 0.2, c = 0.2, inference-mode `lse(p) − p_ỹ`
  ranking, n from the nominal batch size (see the module docstring)."""
  return _build("coteaching_reference", REFERENCE_FORGET_RATE, config.coteaching.num_gradual,
                REFERENCE_EXPONENT, make_step(reference=True,
                                              nominal_batch_size=config.batch_size))
