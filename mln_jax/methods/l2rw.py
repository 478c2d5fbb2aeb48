"""Learning to Reweight (L2RW; Ren et al., ICML 2018; BASELINES.md §11): per-step sample weights
from one look-ahead on clean meta data, no learnt weighting network.

Every step asks, for each training sample, whether up-weighting it would lower the clean meta loss
after one SGD step. With per-sample weights ε (at ε = 0), θ'(ε) = θ − α∇θ Σ_i ε_i ℓ_i(θ); since
θ'(0) = θ, u_i = −∂L_meta(θ'(ε))/∂ε_i at ε = 0 equals α·[J_ℓ(θ) g]_i = α·⟨∇ℓ_i(θ), g⟩ with
g = ∇θ mean CE(f(x_m; θ), y_m): the alignment of the sample's gradient with the meta gradient.
The weights are w̃_i = max(u_i, 0), w_i = w̃_i/Σ_j w̃_j (all 0 where the sum is 0), and the
classifier takes one SGD step (momentum, weight decay, BatchNorm statistics updated) on
Σ_i w_i ℓ_i, a sum (the weights sum to 1).

The step computes u by `jax.grad` with respect to ε through `steps.inner_update` (the inner-update
machinery MetaLabelNet's and MW-Net's meta-gradients use, `steps.meta_gradient_autodiff`):
`reweighting_signal_autodiff`. `reweighting_signal_jvp` is the same quantity by its closed form (one
JVP of the per-sample loss vector along g), kept as the cheap equivalent and tested against it.
α is the classifier's current learning rate η_t; it cancels in w except for the zero test.

The reference has no L2RW; the registry name `l2rw` is the published algorithm on the shared
protocol with the meta split as clean data (the paper's noisy-CIFAR runs: 1,000 clean images,
WRN-28-10, momentum SGD). No settings of its own. Unlabelled samples (label −1) get weight 0.

Beyond BASELINES.md (which gives L2RW no state): for the exports, `method_state` keeps per sample
the last relative weight B·w_i (1 = the uniform weight 1/B, 0 = left out; 1 until first seen),
written as `sample_weights.npy`, and the last alignment ⟨∇ℓ_i, g⟩ = u_i/α (0 until first seen),
written as `meta_alignment.npy`. The label-issue score is −alignment: monotone in the weight within
a batch (w is a non-decreasing function of u) but continuous, where most weights tie at 0.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mln_jax import steps
from mln_jax.methods.base import Method, Phase, StateContext
from mln_jax.methods.mwnet import per_sample_cross_entropy
from mln_jax.train_state import TrainState

Batch = dict[str, jax.Array]


def _per_sample_loss_fn(state: TrainState, images: jax.Array, labels: jax.Array
                        ) -> Callable[[Any], jax.Array]:
  """θ -> (B,) per-sample cross-entropies of a train-mode forward (statistics discarded)."""
  return lambda params: per_sample_cross_entropy(
      steps.forward_train(state, params, images)[0], labels)


def reweighting_signal_autodiff(state: TrainState, batch: Batch, meta_batch: Batch,
                                learning_rate: float | jax.Array
                                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """u = −∇ε L_meta(θ − α∇θ Σ_i ε_i ℓ_i(θ)) at ε = 0, by `jax.grad` through `steps.inner_update`
  (second order). Returns u (B,), the meta loss (at θ'(0) = θ) and the meta batch's logits."""
  labels = batch["label"]
  epsilon = jnp.zeros(labels.shape, jax.tree.leaves(state.params)[0].dtype)

  def inner_loss_of(eps):
    return lambda logits: jnp.sum(eps * per_sample_cross_entropy(logits, labels))

  loss, grads, meta_logits, _ = steps.meta_gradient_autodiff(
      state, batch["image"], meta_batch, epsilon, inner_loss_of, learning_rate=learning_rate)
  return -grads, loss, meta_logits


def reweighting_signal_jvp(state: TrainState, batch: Batch, meta_batch: Batch,
                           learning_rate: float | jax.Array) -> tuple[jax.Array, jax.Array]:
  """u = α·J_ℓ(θ) g with g = ∇θ L_meta(θ): the closed form of `reweighting_signal_autodiff`
  (exact: at ε = 0 the inner step is the identity). Returns u (B,) and the meta loss."""
  (loss, _), g = jax.value_and_grad(lambda p: steps.meta_loss(state, p, meta_batch),
                                    has_aux=True)(state.params)
  _, jvp = jax.jvp(_per_sample_loss_fn(state, batch["image"], batch["label"]), (state.params,),
                   (g,))
  return learning_rate * jvp, loss


def normalized_weights(signal: jax.Array, labels: jax.Array) -> jax.Array:
  """w = max(u, 0)/Σ_j max(u_j, 0) over the labelled samples; all 0 where the sum is 0."""
  clipped = jnp.where(labels >= 0, jnp.maximum(signal, 0.0), 0.0)
  total = clipped.sum()
  return jnp.where(total > 0, clipped / jnp.where(total > 0, total, 1.0), 0.0)


def step(state: TrainState, batch: Batch, meta_batch: Batch
         ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One L2RW step: weights from the look-ahead, then SGD on Σ_i w_i ℓ_i."""
  images, labels = batch["image"], batch["label"]
  learning_rate = state.opt_state.hyperparams["learning_rate"]
  signal, loss_on_meta, meta_logits = reweighting_signal_autodiff(state, batch, meta_batch,
                                                                  learning_rate)
  weights = jax.lax.stop_gradient(normalized_weights(signal, labels))

  def train_loss(params):
    logits, batch_stats = steps.forward_train(state, params, images)
    per_sample = per_sample_cross_entropy(logits, labels)
    return jnp.sum(weights * per_sample), (logits, batch_stats, per_sample)

  (loss, (logits, batch_stats, per_sample)), grads = jax.value_and_grad(
      train_loss, has_aux=True)(state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  labelled = labels >= 0
  num_labelled = jnp.maximum(labelled.sum(), 1)
  table = state.method_state
  index = batch["index"]
  new_state = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates),
      batch_stats=batch_stats, opt_state=opt_state,
      method_state={
          **table,
          "weights": table["weights"].at[index].set(
              (weights * labels.shape[0]).astype(table["weights"].dtype)),
          "alignment": table["alignment"].at[index].set(
              jnp.where(labelled, signal / learning_rate, 0.0).astype(table["alignment"].dtype)),
      })
  metrics = {
      "loss": loss,
      "cross_entropy": per_sample.sum() / num_labelled,
      "meta_loss": loss_on_meta,
      "kept_fraction": (weights > 0).sum() / num_labelled,
      "accuracy": steps.labelled_accuracy(logits, labels),
      "meta_batch_accuracy": steps.labelled_accuracy(meta_logits, meta_batch["label"]),
  }
  return new_state, metrics


def init_state(state: TrainState, context: StateContext) -> TrainState:
  return state.replace(method_state={
      **state.method_state,
      "weights": jnp.ones((context.num_train,), jnp.float32),
      "alignment": jnp.zeros((context.num_train,), jnp.float32)})


def method(config: ml_collections.ConfigDict) -> Method:
  del config  # no settings of its own
  return Method(
      "l2rw", (Phase("l2rw", 0, step, uses_meta=True),), init_state=init_state,
      export=lambda state: {"sample_weights": state.method_state["weights"],
                            "meta_alignment": state.method_state["alignment"]},
      label_issue_scores=lambda state: -state.method_state["alignment"])
