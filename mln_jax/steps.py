"""Pure training and evaluation steps: `(state, batch, ...) -> (state, metrics)`.

Batches are dicts: `image` (float, normalised, NHWC) and `label` (int; −1 marks an unlabelled
sample). All functions are jittable; `meta_step` is SPEC's phase-2 steps 1–7.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mln_jax import losses
from mln_jax.train_state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


# Dropout keys (for classifiers with nn.Dropout; others ignore them) come from the state's key, the
# step and the batch's stream, far from the epoch indices the data stream folds into the same key.
_DROPOUT_STREAMS = {"train": 2**31 - 1, "meta": 2**31 - 2}


def forward_train(state: TrainState, params: Any, images: jax.Array, stream: str = "train",
                  batch_stats: Any = None) -> tuple[jax.Array, Any]:
  """Classifier logits in training mode (BatchNorm batch statistics) and the updated running stats.

  Every forward pass of one step over one stream drops the same units, so that the inner update,
  the JVP and the final update of `meta_step` see one and the same function of the parameters.
  `batch_stats` (default the classifier's) are the running statistics to update: a second network
  passes its own.
  """
  dropout_key = jax.random.fold_in(jax.random.fold_in(state.rng, _DROPOUT_STREAMS[stream]),
                                   state.step)
  batch_stats = state.batch_stats if batch_stats is None else batch_stats
  (logits, _), mutated = state.apply_fn({"params": params, "batch_stats": batch_stats},
                                        images, train=True, mutable=["batch_stats"],
                                        rngs={"dropout": dropout_key})
  return logits, mutated.get("batch_stats", {})


def labelled_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Batch accuracy of argmax(logits) over the samples with a label (label >= 0); 0 where there
  are none."""
  labelled = labels >= 0
  hits = (jnp.argmax(logits, -1) == labels) & labelled
  return hits.sum() / jnp.maximum(labelled.sum(), 1)


def apply_classifier_gradients(state: TrainState, grads: Any, batch_stats: Any) -> TrainState:
  """One update of the classifier's optimiser (SGD with momentum and L2) with `grads`, its running
  statistics replaced by `batch_stats` (those of the step's training forward), the step counted."""
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       batch_stats=batch_stats, opt_state=opt_state)


def supervised_step(loss_fn: Callable[[jax.Array, jax.Array], jax.Array]
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """A pure step of SGD on `loss_fn(logits, labels)` of the batch (labels −1: unlabelled), the
  classifier's BatchNorm statistics updated: the whole of a loss-only method."""
  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    def objective(params):
      logits, batch_stats = forward_train(state, params, batch["image"])
      return loss_fn(logits, batch["label"]), (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params)
    return (apply_classifier_gradients(state, grads, batch_stats),
            {"loss": loss, "accuracy": labelled_accuracy(logits, batch["label"])})
  return step


def table_target_step(table: str, loss_fn: Callable[[jax.Array, jax.Array], jax.Array]
                      ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """A pure SGD step on `loss_fn(logits, targets)`, the targets being the batch's rows of the
  per-sample table `method_state[table]` (learnt labels: Joint Optimization's step 2, PENCIL's
  frozen stage); `label_agreement` says how often a row's argmax keeps the given label."""
  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    targets = state.method_state[table][batch["index"]]

    def objective(params):
      logits, batch_stats = forward_train(state, params, batch["image"])
      return loss_fn(logits, targets), (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params)
    return apply_classifier_gradients(state, grads, batch_stats), {
        "loss": loss, "accuracy": labelled_accuracy(logits, batch["label"]),
        "label_agreement": labelled_accuracy(targets, batch["label"])}
  return step


_cross_entropy_step = supervised_step(losses.cross_entropy)


def warmup_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
  """Phase 1: one SGD step of cross-entropy on the (noisy) labels."""
  return _cross_entropy_step(state, batch)


def soft_label_logits(state: TrainState, mln_params: Any, images: jax.Array) -> jax.Array:
  """MetaLabelNet's logits for a batch: SLP on the frozen extractor's features (inference mode)."""
  if not state.extractor_frozen:
    raise ValueError("The state has no frozen feature extractor: MetaLabelNet's soft labels come "
                     "from the warmed-up classifier's features. Call freeze_extractor(state) after "
                     "the warm-up (a cross-entropy run has no extractor, hence no soft labels).")
  _, features = state.apply_fn(state.extractor_variables, images, train=False)
  return state.mln_apply_fn({"params": mln_params}, jax.lax.stop_gradient(features))


def inner_update(state: TrainState, images: jax.Array,
                 logits_loss: Callable[[jax.Array], jax.Array],
                 learning_rate: float | jax.Array | None = None) -> Any:
  """SPEC step 3: θ' = θ − α ∇_θ L(f_θ(x)), one optax SGD update of the classifier on any loss of
  its logits (MetaLabelNet: L_c against the soft labels; a reweighting method: a weighted
  cross-entropy). Differentiable in whatever `logits_loss` closes over. α is `learning_rate` (a
  traced value may follow a schedule) or, by default, `state.inner_lr`."""
  def classification_loss(params):
    logits, _ = forward_train(state, params, images)
    return logits_loss(logits)

  grads = jax.grad(classification_loss)(state.params)
  inner_tx = optax.sgd(state.inner_lr if learning_rate is None else learning_rate)
  updates, _ = inner_tx.update(grads, inner_tx.init(state.params), state.params)
  return optax.apply_updates(state.params, updates)


def meta_loss(state: TrainState, params: Any, meta_batch: Batch) -> tuple[jax.Array, jax.Array]:
  """SPEC step 4: cross-entropy on the clean meta batch (BatchNorm in training mode, stats
  discarded). Returns the loss and the logits."""
  loss, (logits, _) = meta_forward(state, params, meta_batch)
  return loss, logits


def meta_forward(state: TrainState, params: Any, meta_batch: Batch, batch_stats: Any = None
                 ) -> tuple[jax.Array, tuple[jax.Array, Any]]:
  """`meta_loss` with the running statistics the meta batch leaves on top of `batch_stats`
  (default the classifier's): `(loss, (logits, batch_stats))`, for a step that folds them in."""
  logits, new_stats = forward_train(state, params, meta_batch["image"], stream="meta",
                                    batch_stats=batch_stats)
  return losses.cross_entropy(logits, meta_batch["label"]), (logits, new_stats)


def meta_gradient_autodiff(state: TrainState, images: jax.Array, meta_batch: Batch,
                           meta_params: Any,
                           inner_loss_of: Callable[[Any], Callable[[jax.Array], jax.Array]],
                           learning_rate: float | jax.Array | None = None,
                           batch_stats: Any = None
                           ) -> tuple[jax.Array, Any, jax.Array, Any]:
  """∇ L_meta with respect to `meta_params`, by `jax.grad` through the inner optax update (second
  order): L_meta(θ − α ∇_θ L(f_θ(x))) with L = `inner_loss_of(meta_params)`, a loss of the logits.

  Any bilevel method with a meta network that shapes the classifier's loss fits: MetaLabelNet's
  `inner_loss_of(φ)` is L_c against the soft labels MLN_φ(e(x)). The inner step size is
  `learning_rate` (default `state.inner_lr`). Returns the meta loss, the gradient, the meta
  batch's logits and the running statistics its forward leaves on top of `batch_stats` (default
  the classifier's; a step that keeps one update per step discards them).
  """
  def meta_objective(params):
    fast_params = inner_update(state, images, inner_loss_of(params), learning_rate)
    return meta_forward(state, fast_params, meta_batch, batch_stats)

  (loss, (meta_logits, meta_stats)), grads = jax.value_and_grad(meta_objective, has_aux=True)(
      meta_params)
  return loss, grads, meta_logits, meta_stats


def meta_gradient_jvp(state: TrainState, images: jax.Array, meta_batch: Batch, feature_logits_fn,
                      batch_stats: Any = None) -> tuple[jax.Array, Any, jax.Array, Any]:
  """MetaLabelNet's gradient by SPEC's closed form, valid for a plain SGD inner step:

  ∂L_meta/∂ŷ_ic = α/(B·C) · [J_p(θ) g]_ic / ŷ_ic with g = ∇_θ' L_meta(θ'), followed by one backward
  pass through MetaLabelNet. One JVP through the classifier replaces the backward-of-a-backward.
  Returns what `meta_gradient_autodiff` does.
  """
  mln_logits, mln_vjp = jax.vjp(feature_logits_fn, state.mln_params)
  log_soft_labels = jax.nn.log_softmax(mln_logits)
  fast_params = inner_update(state, images, lambda logits: losses.soft_label_kl(logits,
                                                                                 log_soft_labels))
  (loss, (meta_logits, meta_stats)), g = jax.value_and_grad(
      lambda p: meta_forward(state, p, meta_batch, batch_stats), has_aux=True)(fast_params)

  probabilities = lambda params: jax.nn.softmax(forward_train(state, params, images)[0])
  _, jvp_p = jax.jvp(probabilities, (state.params,), (g,))
  # Chain through ŷ = softmax(logits): ∂L/∂logits = ŷ ⊙ (∂L/∂ŷ − Σ_c ŷ_c ∂L/∂ŷ_c). With
  # ∂L/∂ŷ = a/ŷ the ŷ cancels: ∂L/∂logits = a − ŷ Σ_c a_c, finite even where ŷ underflows to 0.
  scaled_jvp = state.inner_lr / jvp_p.size * jvp_p
  grad_logits = scaled_jvp - jnp.exp(log_soft_labels) * scaled_jvp.sum(-1, keepdims=True)
  (grads,) = mln_vjp(grad_logits)
  return loss, grads, meta_logits, meta_stats


def mln_meta_gradient(state: TrainState, images: jax.Array, meta_batch: Batch, feature_logits_fn
                      ) -> tuple[jax.Array, Any, jax.Array, Any]:
  """MetaLabelNet's ∇_φ L_meta (SPEC steps 1–4) by `state.meta_gradient`: 'autodiff' or 'jvp'.
  Returns the meta loss, the gradient, the meta logits and the classifier's running statistics
  with the meta batch's folded in."""
  if state.meta_gradient == "jvp":
    return meta_gradient_jvp(state, images, meta_batch, feature_logits_fn)

  def inner_loss_of(mln_params):
    log_soft_labels = jax.nn.log_softmax(feature_logits_fn(mln_params))
    return lambda logits: losses.soft_label_kl(logits, log_soft_labels)

  return meta_gradient_autodiff(state, images, meta_batch, state.mln_params, inner_loss_of)


def meta_step(state: TrainState, batch: Batch, meta_batch: Batch,
              reference_batch_norm: bool = False) -> tuple[TrainState, Metrics]:
  """Phase 2, SPEC steps 1–7, for one training batch (labels unused) and one clean meta batch.

  1. ŷ = MLN(e(x)); 2–4. L_meta(θ − α∇_θ L_c(θ, ŷ)); 5. Adam step on φ with ∇_φ L_meta (second
  order); 6. ŷ' = MLN_new(e(x)); 7. SGD step on θ with L_c(θ, ŷ') + L_e(θ).

  BatchNorm running statistics move once per step, toward the training batch's (step 7). With
  `reference_batch_norm` they move twice, as in the authors' code (SPEC): toward the meta batch's
  statistics under θ' (step 4), then toward the training batch's.
  """
  images = batch["image"]
  feature_logits_fn = lambda mln_params: soft_label_logits(state, mln_params, images)

  loss_on_meta, mln_grads, meta_logits, meta_stats = mln_meta_gradient(
      state, images, meta_batch, feature_logits_fn)
  mln_updates, mln_opt_state = state.mln_tx.update(mln_grads, state.mln_opt_state, state.mln_params)
  mln_params = optax.apply_updates(state.mln_params, mln_updates)

  new_soft_logits = jax.lax.stop_gradient(feature_logits_fn(mln_params))
  log_soft_labels = jax.nn.log_softmax(new_soft_logits)
  running_stats = jax.lax.stop_gradient(meta_stats) if reference_batch_norm else state.batch_stats

  def train_loss(params):
    logits, batch_stats = forward_train(state, params, images, batch_stats=running_stats)
    classification = losses.soft_label_kl(logits, log_soft_labels)
    entropy = losses.entropy(logits)
    return classification + entropy, (logits, batch_stats, classification, entropy)

  (loss, (logits, batch_stats, classification, entropy)), grads = jax.value_and_grad(
      train_loss, has_aux=True)(state.params)
  new_state = apply_classifier_gradients(state, grads, batch_stats).replace(
      mln_params=mln_params, mln_opt_state=mln_opt_state)
  soft_argmax = jnp.argmax(new_soft_logits, -1)
  metrics = {
      "loss": loss,
      "classification_loss": classification,
      "entropy_loss": entropy,
      "meta_loss": loss_on_meta,
      "meta_batch_accuracy": labelled_accuracy(meta_logits, meta_batch["label"]),
      # How often the generated label's argmax keeps the given (noisy) label, over labelled samples.
      "soft_label_agreement": labelled_accuracy(new_soft_logits, batch["label"]),
      "accuracy_vs_soft_labels": jnp.mean(jnp.argmax(logits, -1) == soft_argmax),
  }
  return new_state, metrics


def predict(state: TrainState, images: jax.Array) -> jax.Array:
  """Classifier logits in inference mode (BatchNorm running statistics)."""
  logits, _ = state.apply_fn(state.variables, images, train=False)
  return logits


def predict_soft_labels(state: TrainState, images: jax.Array) -> jax.Array:
  """MetaLabelNet's soft labels ŷ for a batch of normalised images (needs a frozen extractor)."""
  return jax.nn.softmax(soft_label_logits(state, state.mln_params, images))
