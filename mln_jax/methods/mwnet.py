"""Meta-Weight-Net (Shu et al., NeurIPS 2019; BASELINES.md §10): a loss-to-weight network.

A small MLP V(ℓ; φ) ∈ (0, 1) (the "VNet": Linear 1→hidden, ReLU, Linear hidden→1, sigmoid) maps a
training sample's cross-entropy to its loss weight. φ is meta-learnt on clean meta data: every step
takes one virtual plain-SGD step of the classifier on the weighted loss, at the classifier's current
learning rate η_t, measures the clean meta loss after it, and moves φ by Adam along the
second-order gradient of that meta loss; the classifier then takes its real step (momentum, weight
decay, BatchNorm statistics updated) on the loss weighted by the updated VNet. Step by step
(`make_step`):

1. a train-mode forward of θ gives the per-sample cross-entropies ℓ_i (its statistics discarded);
2. w_i = V(sg(ℓ_i); φ); θ' = θ − η_t ∇θ Σ_i c_i ℓ_i(θ) with c = w/B (or w/Σ_j w_j, below);
3. L_meta = mean CE(f(x_m; θ'), y_m) (train-mode BN); φ ← Adam step on ∇φ L_meta;
4. a new train-mode forward of θ gives ℓ_i; w_i = sg(V(ℓ_i; φ_new)); SGD step on Σ_i c_i ℓ_i.

The published algorithm and the MetaLabelNet reference agree (BASELINES.md: "no deviations"), so
there is one registry name, `mwnet`. Defaults (`config.mwnet`) are the reference's and the later
MW-Net script's: hidden 100, Adam lr 1e-3 with L2 1e-4 added to the gradient (PyTorch's Adam
weight decay), the loss (1/B)Σ w_i ℓ_i. `normalize_weights=True` is the MW-Net paper's first
script's batch normalisation of the weights, Σ w_i ℓ_i / Σ_j w_j, in both the virtual and the real
step (that script meta-trained φ by SGD at 1e-3; here Adam stays). The MW-Net paper's own setting:
1,000 clean training images as meta data, batch 100, SGD momentum 0.9, wd 5e-4, lr 0.1; here the
shared protocol's classifier settings and the meta split.

Unlabelled samples (label −1) get weight 0, and the mean runs over the labelled samples of the
batch (B where all are labelled, as in every phase that trains on labelled samples). The VNet's
parameters and Adam state, and a per-sample table of the last weight V gave each sample in its
real step (raw, in (0, 1); 0.5 until a sample is first seen), live in `method_state`; the table is
exported as `sample_weights.npy`, and 1 − weight is the label-issue score. `meta_gradient_jvp` is
the exact cheap form of step 3's gradient (one JVP instead of a backward through a backward), kept
for checks: the step uses `steps.meta_gradient_autodiff`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mln_jax import steps
from mln_jax.methods.base import Method, Phase, StateContext
from mln_jax.train_state import TrainState, adam_with_l2

Batch = dict[str, jax.Array]
# A sample's weight before its first real step: the middle of V's range, neutral for ranking.
UNSEEN_WEIGHT = 0.5


def torch_uniform(fan_in: int) -> Callable[..., jax.Array]:
  """PyTorch's default `nn.Linear` initialiser for weights and biases alike: U(±1/√fan_in)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class VNet(nn.Module):
  """V(ℓ; φ): per-sample losses (B,) -> weights (B,) in (0, 1); Linear 1→hidden, ReLU,
  Linear hidden→1, sigmoid, initialised as PyTorch initialises `nn.Linear`."""
  hidden: int = 100

  @nn.compact
  def __call__(self, losses: jax.Array) -> jax.Array:
    x = nn.Dense(self.hidden, kernel_init=torch_uniform(1), bias_init=torch_uniform(1),
                 name="hidden")(losses[..., None])
    x = nn.Dense(1, kernel_init=torch_uniform(self.hidden), bias_init=torch_uniform(self.hidden),
                 name="out")(nn.relu(x))
    return nn.sigmoid(x[..., 0])


def per_sample_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """(B,) cross-entropies −log p_i[y_i]; 0 for an unlabelled sample (label −1)."""
  per_sample = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
  return jnp.where(labels >= 0, per_sample, 0.0)


def loss_coefficients(weights: jax.Array, labels: jax.Array, normalize: bool) -> jax.Array:
  """c with Σ_i c_i ℓ_i the weighted loss: w_i/B (B = labelled samples), or w_i/Σ_j w_j where
  `normalize`; unlabelled samples 0, and all 0 where no weight is positive."""
  weights = jnp.where(labels >= 0, weights, 0.0)
  if normalize:
    total = weights.sum()
    return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)
  return weights / jnp.maximum((labels >= 0).sum(), 1)


def weighted_loss(weights: jax.Array, per_sample: jax.Array, labels: jax.Array,
                  normalize: bool = False) -> jax.Array:
  """MW-Net's training loss: (1/B)Σ_i w_i ℓ_i, or Σ_i w_i ℓ_i / Σ_j w_j where `normalize`, over
  the labelled samples."""
  return jnp.sum(loss_coefficients(weights, labels, normalize) * per_sample)


def sample_losses(state: TrainState, images: jax.Array, labels: jax.Array) -> jax.Array:
  """Step 1: sg(ℓ) at θ from a train-mode forward, its BatchNorm statistics discarded."""
  logits, _ = steps.forward_train(state, state.params, images)
  return jax.lax.stop_gradient(per_sample_cross_entropy(logits, labels))


def inner_loss_of(vnet: VNet, losses: jax.Array, labels: jax.Array, normalize: bool
                  ) -> Callable[[Any], Callable[[jax.Array], jax.Array]]:
  """φ -> the virtual step's loss of the classifier's logits, Σ_i c_i(V(sg ℓ; φ)) ℓ_i(logits)."""
  def of(vnet_params):
    coefficients = loss_coefficients(vnet.apply({"params": vnet_params}, losses), labels,
                                     normalize)
    return lambda logits: jnp.sum(coefficients * per_sample_cross_entropy(logits, labels))
  return of


def meta_gradient_jvp(state: TrainState, batch: Batch, meta_batch: Batch, vnet: VNet,
                      vnet_params: Any, learning_rate: float | jax.Array, normalize: bool = False
                      ) -> tuple[jax.Array, Any]:
  """∇φ L_meta by the exact identity of a plain-SGD inner step (BASELINES.md §10):

  θ' = θ − η Σ_i c_i ∇ℓ_i(θ), so ∂L_meta/∂c_i = −η [J_ℓ(θ) g]_i with g = ∇θ' L_meta(θ') — one JVP
  of the per-sample loss vector — then one VJP through c(V(sg ℓ; φ)) (c_i = w_i/B gives the
  −(η/B) of BASELINES). Returns the meta loss and the gradient.
  """
  images, labels = batch["image"], batch["label"]
  losses = sample_losses(state, images, labels)
  coefficients, coefficients_vjp = jax.vjp(
      lambda phi: loss_coefficients(vnet.apply({"params": phi}, losses), labels, normalize),
      vnet_params)
  weighted = lambda logits: jnp.sum(coefficients * per_sample_cross_entropy(logits, labels))
  fast_params = steps.inner_update(state, images, weighted, learning_rate)
  (loss, _), g = jax.value_and_grad(lambda p: steps.meta_loss(state, p, meta_batch),
                                    has_aux=True)(fast_params)
  per_sample = lambda params: per_sample_cross_entropy(
      steps.forward_train(state, params, images)[0], labels)
  _, jvp = jax.jvp(per_sample, (state.params,), (g,))
  (grads,) = coefficients_vjp(-learning_rate * jvp)
  return loss, grads


def make_step(vnet: VNet, vnet_tx: optax.GradientTransformation, normalize: bool
              ) -> Callable[[TrainState, Batch, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """MW-Net's step (steps 1–4 of the module docstring) for one training and one meta batch."""
  def step(state: TrainState, batch: Batch, meta_batch: Batch
           ) -> tuple[TrainState, dict[str, jax.Array]]:
    images, labels = batch["image"], batch["label"]
    table = state.method_state
    # η_t: the classifier's scheduled rate, set by begin_epoch into its optimiser state.
    learning_rate = state.opt_state.hyperparams["learning_rate"]

    losses = sample_losses(state, images, labels)
    loss_on_meta, vnet_grads, meta_logits, _ = steps.meta_gradient_autodiff(
        state, images, meta_batch, table["vnet_params"],
        inner_loss_of(vnet, losses, labels, normalize), learning_rate=learning_rate)
    vnet_updates, vnet_opt_state = vnet_tx.update(vnet_grads, table["vnet_opt_state"],
                                                  table["vnet_params"])
    vnet_params = optax.apply_updates(table["vnet_params"], vnet_updates)

    def train_loss(params):
      logits, batch_stats = steps.forward_train(state, params, images)
      per_sample = per_sample_cross_entropy(logits, labels)
      weights = jax.lax.stop_gradient(
          vnet.apply({"params": vnet_params}, jax.lax.stop_gradient(per_sample)))
      return weighted_loss(weights, per_sample, labels, normalize), (logits, batch_stats, weights)

    (loss, (logits, batch_stats, weights)), grads = jax.value_and_grad(
        train_loss, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    labelled = labels >= 0
    weights = jnp.where(labelled, weights, 0.0)
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats, opt_state=opt_state,
        method_state={**table, "vnet_params": vnet_params, "vnet_opt_state": vnet_opt_state,
                      "weights": table["weights"].at[batch["index"]].set(
                          weights.astype(table["weights"].dtype))})
    metrics = {
        "loss": loss,
        "meta_loss": loss_on_meta,
        "weight_mean": weights.sum() / jnp.maximum(labelled.sum(), 1),
        "accuracy": steps.labelled_accuracy(logits, labels),
        "meta_batch_accuracy": steps.labelled_accuracy(meta_logits, meta_batch["label"]),
    }
    return new_state, metrics
  return step


def method(config: ml_collections.ConfigDict) -> Method:
  settings = config.mwnet
  vnet = VNet(hidden=settings.hidden)
  vnet_tx = adam_with_l2(settings.learning_rate, settings.weight_decay)

  def init_state(state: TrainState, context: StateContext) -> TrainState:
    vnet_params = vnet.init(context.key, jnp.zeros((1,), jnp.float32))["params"]
    return state.replace(method_state={
        **state.method_state, "vnet_params": vnet_params,
        "vnet_opt_state": vnet_tx.init(vnet_params),
        "weights": jnp.full((context.num_train,), UNSEEN_WEIGHT, jnp.float32)})

  return Method(
      "mwnet",
      (Phase("meta-weight-net", 0, make_step(vnet, vnet_tx, settings.normalize_weights),
             uses_meta=True),),
      init_state=init_state,
      export=lambda state: {"sample_weights": state.method_state["weights"]},
      label_issue_scores=lambda state: 1.0 - state.method_state["weights"])
