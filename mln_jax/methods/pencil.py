"""PENCIL (Yi & Wu, CVPR 2019): probabilistic end-to-end noise correction.

Every training sample owns free label logits ỹ_i ∈ R^C (an (N, C) table in `method_state`, read
and written at `batch["index"]`), its label distribution y^d_i = softmax(ỹ_i). Stage 1
(epochs < s1) trains the classifier with cross-entropy on the given labels. Stage 2 (s1 ≤ e < s2)
learns the network and the labels together: L = L_c + α·L_o + β·L_e with
L_c = mean_BC[p (log p − log y^d)] (the network follows the labels), L_o = mean_B[−log y^d_{i,ỹ_i}]
(the labels stay compatible with the given ones) and L_e = mean_BC[−p log p] (confident
predictions); one forward and one backward give ∇θ and ∇ỹ at the same point, θ takes an SGD step
and the batch's label logits a plain gradient-descent step ỹ_i ← ỹ_i − λ ∂L/∂ỹ_i, with the closed
form ∂L/∂ỹ_i = (y^d_i − p_i)/(B·C) + α·(y^d_i − e_ỹ_i)/B. Stage 3 (e ≥ s2) trains with L_c on the
labels as stage 2 left them (frozen).

Variants (../shared/BASELINES.md §8):
- `pencil` (default): the paper's L_o, a cross-entropy of y^d against the given label.
- `pencil_reference`: the MetaLabelNet reference's (and the PENCIL authors' own code's) L_o, which
  applies log_softmax to the probabilities y^d: mean_B[lse(y^d_i) − y^d_{i,ỹ_i}]; its ỹ gradient
  comes from autodiff. Everything else is shared.

Defaults (`config.pencil`, the reference's CIFAR-10 values): α 0.1, β 0.8, λ 400, K 10, s1 21,
s2 80 of 120 epochs, the shared learning-rate schedule. The PENCIL authors' code (PreAct ResNet-32):
α 0.4, β 0.1, λ 600, K 10, s1 70, s2 200 of 320 epochs.

Departures from BASELINES.md: the table is initialised to K·e_ỹ at the start instead of at the end
of stage 1 — the same thing, since stage 1 does not touch it. A sample without a label (−1) gets a
zero row (uniform y^d) and adds nothing to L_o (it is still divided by the batch size B, so the
closed form above holds); the phases train on labelled samples only, so such a row is never
updated. Every phase counts for the best-epoch selection (the shared protocol), and stages 2 and 3
report softmax(ỹ) of their samples as soft labels (tracked per epoch, exported at the end).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from mln_jax import losses, steps
from mln_jax.methods.base import Batch, Method, Phase, StateContext
from mln_jax.train_state import TrainState

Metrics = dict[str, jax.Array]
# L_o of (label logits rows (B, C), given labels (B,)) -> scalar.
CompatibilityLoss = Callable[[jax.Array, jax.Array], jax.Array]


def classification_loss(logits: jax.Array, label_logits: jax.Array) -> jax.Array:
  """L_c = mean_BC[p (log p − log y^d)], p = softmax(logits), y^d = softmax(label_logits)."""
  log_p = jax.nn.log_softmax(logits)
  return jnp.mean(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(label_logits)))


def compatibility_loss(label_logits: jax.Array, labels: jax.Array) -> jax.Array:
  """The paper's L_o = mean_B[−log y^d_{i,ỹ_i}]: cross-entropy of y^d = softmax(label_logits)
  against the given labels; an unlabelled sample (−1) adds 0 but still counts in B."""
  log_label = jnp.take_along_axis(jax.nn.log_softmax(label_logits), jnp.maximum(labels, 0)[:, None],
                                  axis=-1)[:, 0]
  return -jnp.where(labels >= 0, log_label, 0.0).sum() / labels.shape[0]


def reference_compatibility_loss(label_logits: jax.Array, labels: jax.Array) -> jax.Array:
  """The reference's L_o = mean_B[lse(y^d_i) − y^d_{i,ỹ_i}]: log_softmax applied to the
  probabilities y^d (not to their logits); unlabelled samples as `compatibility_loss`."""
  label_probs = jax.nn.softmax(label_logits)
  per_sample = (jax.nn.logsumexp(label_probs, axis=-1)
                - jnp.take_along_axis(label_probs, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0])
  return jnp.where(labels >= 0, per_sample, 0.0).sum() / labels.shape[0]


def entropy_loss(logits: jax.Array) -> jax.Array:
  """L_e = mean_BC[−p log p]."""
  return losses.entropy(logits)


def label_learning_loss(logits: jax.Array, label_logits: jax.Array, labels: jax.Array,
                        alpha: float, beta: float,
                        compatibility: CompatibilityLoss = compatibility_loss
                        ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
  """Stage 2's L = L_c + α·L_o + β·L_e; returns L and (L_c, L_o, L_e)."""
  l_c = classification_loss(logits, label_logits)
  l_o = compatibility(label_logits, labels)
  l_e = entropy_loss(logits)
  return l_c + alpha * l_o + beta * l_e, (l_c, l_o, l_e)


def label_logits_gradient(logits: jax.Array, label_logits: jax.Array, labels: jax.Array,
                          alpha: float) -> jax.Array:
  """The closed form of ∂L/∂ỹ_i for the paper's L_o: (y^d_i − p_i)/(B·C) + α·(y^d_i − e_ỹ_i)/B
  (the second term only for labelled samples; L_e does not depend on ỹ)."""
  num, num_classes = logits.shape
  label_probs = jax.nn.softmax(label_logits)
  one_hot = jax.nn.one_hot(labels, num_classes)  # all zeros where the label is −1
  compatibility = jnp.where((labels >= 0)[:, None], label_probs - one_hot, 0.0)
  return (label_probs - jax.nn.softmax(logits)) / (num * num_classes) + alpha * compatibility / num


def initial_label_logits(labels: jax.Array, num_classes: int, k: float) -> jax.Array:
  """The (N, C) table K·e_ỹ (float32); a zero row (uniform y^d) where the label is −1."""
  return k * jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)


def _init_state(k: float) -> Callable[[TrainState, StateContext], TrainState]:
  def init_state(state: TrainState, context: StateContext) -> TrainState:
    table = initial_label_logits(context.labels, context.num_classes, k)
    return state.replace(method_state={"label_logits": table})
  return init_state


def label_learning_step(alpha: float, beta: float, label_lr: float,
                        compatibility: CompatibilityLoss = compatibility_loss
                        ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Stage 2: one forward/backward of L at (θ, ỹ rows of the batch); an SGD step on θ and the
  plain gradient-descent step ỹ_i ← ỹ_i − λ ∂L/∂ỹ_i, written back at the batch's ids."""
  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    table = state.method_state["label_logits"]
    rows = table[batch["index"]]

    def objective(params, label_logits):
      logits, batch_stats = steps.forward_train(state, params, batch["image"])
      loss, parts = label_learning_loss(logits, label_logits, batch["label"], alpha, beta,
                                        compatibility)
      return loss, (logits, batch_stats, parts)

    (loss, (logits, batch_stats, (l_c, l_o, l_e))), (grads, row_grads) = jax.value_and_grad(
        objective, argnums=(0, 1), has_aux=True)(state.params, rows)
    new_rows = rows - label_lr * row_grads
    new_state = steps.apply_classifier_gradients(state, grads, batch_stats).replace(
        method_state={**state.method_state,
                      "label_logits": table.at[batch["index"]].set(new_rows)})
    return new_state, {"loss": loss, "classification_loss": l_c, "compatibility_loss": l_o,
                       "entropy_loss": l_e,
                       "accuracy": steps.labelled_accuracy(logits, batch["label"]),
                       # How often the learnt label's argmax keeps the given label.
                       "label_agreement": steps.labelled_accuracy(new_rows, batch["label"])}
  return step


# Stage 3: an SGD step on L_c against the (frozen) learnt labels of the batch.
frozen_labels_step = steps.table_target_step("label_logits", classification_loss)


def soft_labels(state: TrainState, batch: Batch) -> jax.Array:
  """y^d = softmax(ỹ) of the batch's samples (read from the table by id)."""
  return jax.nn.softmax(state.method_state["label_logits"][batch["index"]])


def _build(config: ml_collections.ConfigDict, name: str,
           compatibility: CompatibilityLoss) -> Method:
  settings = config.pencil
  s1, s2 = settings.stage2_epoch, settings.stage3_epoch
  # Stage 3 may lie beyond the run (a run that ends while learning labels); stages 1 and 2 not.
  if not (0 < s1 < s2 and s1 < config.num_epochs):
    raise ValueError(f"config.pencil.stage2_epoch={s1}, stage3_epoch={s2}: PENCIL needs "
                     f"0 < stage2_epoch < stage3_epoch and stage2_epoch < num_epochs = "
                     f"{config.num_epochs} (stages 1 and 2 at least one epoch each).")
  if settings.label_lr <= 0:
    raise ValueError(f"config.pencil.label_lr={settings.label_lr} must be positive.")
  return Method(name, (
      Phase("cross-entropy", 0, steps.supervised_step(losses.cross_entropy)),
      Phase("label learning", s1, label_learning_step(settings.alpha, settings.beta,
                                                       settings.label_lr, compatibility),
            soft_labels=soft_labels),
      Phase("frozen labels", s2, frozen_labels_step, soft_labels=soft_labels),
  ), init_state=_init_state(settings.k))


def method(config: ml_collections.ConfigDict) -> Method:
  """PENCIL as published (L_o a cross-entropy of y^d)."""
  return _build(config, "pencil", compatibility_loss)


def reference_method(config: ml_collections.ConfigDict) -> Method:
  """PENCIL as the MetaLabelNet reference (and PENCIL's code) runs it: L_o with log_softmax of
  y^d."""
  return _build(config, "pencil_reference", reference_compatibility_loss)
