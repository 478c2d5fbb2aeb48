"""Joint Optimization (Tanaka et al., CVPR 2018): learn the network and the labels alternately.

Step 1 trains the classifier on per-sample soft labels Y (an (N, C) table in `method_state`, at
first the given labels e_ỹ) with L = mean_B[−Σ_c y_ic log p_ic] + α·Σ_c π_c log(π_c/p̄_c) +
β·mean_B[−Σ_c p_ic log p_ic]: the class-prior term (π = 1/C, p̄ the batch's mean prediction) keeps
the predictions from collapsing onto one class, the entropy term makes them confident. Every step
stores its samples' predictions sg(p_i) (the train-mode, augmented forward) in the epoch's slot of a
window × N × C history; after each epoch t ≥ t_begin (1-based) every label becomes the mean of its
predictions in the window. Step 2 trains a fresh network with mean_B[−Σ_c y_ic log p_ic] on the
final labels Y.

Variants (../shared/BASELINES.md §7):
- `joint_optimization` (default, published): both steps as above; the epoch is selected in step 2.
- `joint_optimization_reference`: what the MetaLabelNet reference runs: one training of the shared
  protocol, no label updates and no step 2, with L = CE(z, ỹ) + α·(−Σ_c (1/C) log p̄_c) +
  β·mean_B[lse(p_i) − Σ_c p_ic²] (its "entropy" is log_softmax applied to probabilities).

Defaults (`config.joint_optimization`; neither source has this CNN): step 1 = 120 epochs at a
constant lr 0.01, t_begin 70, window 10, α 1.2, β 0.8; step 2 = `config.num_epochs` epochs of the
shared protocol (its schedule restarts at the step's first epoch). The JO paper/code (PreAct
ResNet-32): step 1 200 epochs at lr 0.1, step 2 120 epochs at lr 0.2 (×0.1 at 40 and 80), code
defaults α 1.0, β 0.5.

Implementation: the epoch-end label update runs at the start of the next epoch (`begin_epoch` at
0-based epoch t follows 1-based epoch t); `begin_epoch` at epoch S1 (the first of step 2) makes the
last update. Each history slot has a filled mask (window, N): an epoch that dropped its last
partial batch skips a few samples, so a label is the mean over the slots that hold the sample's
prediction (unchanged where none does), and a slot's mask is reset when the epoch that overwrites
it begins. The slot the steps write is an array in `method_state`, set by `begin_epoch`, which
records the epoch it began so that a run resumed inside an epoch (mid-epoch checkpoints) neither
updates nor resets twice. The fresh network of step 2 is made by `init_state` and kept in
`method_state["other_network"]`; step 2's `enter` swaps it with the step-1 network (which then
stays there, so the state keeps one structure in both steps).

Departures from BASELINES.md: a sample without a label (−1) starts with a uniform row of Y; the
steps train on labelled samples only, so such a row stays uniform. Both steps report Y of their
samples as soft labels (label agreement tracked per epoch; step 2's are exported and scored); an
epoch's record shows the labels it trained on, as the update after it runs when the next begins.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from mln_jax import config as config_lib
from mln_jax import losses, steps
from mln_jax.methods.base import Batch, Method, Phase, StateContext
from mln_jax.train_state import TrainState, set_learning_rate

Metrics = dict[str, jax.Array]


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """mean_B[−Σ_c y_ic log p_ic] of soft targets y (B, C)."""
  return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1))


def _log_mean_prediction(logits: jax.Array) -> jax.Array:
  """log p̄_c = log mean_B p_ic, from the log-probabilities: finite even where every p_ic
  underflows."""
  return jax.nn.logsumexp(jax.nn.log_softmax(logits), axis=0) - jnp.log(logits.shape[0])


def prior_loss(logits: jax.Array) -> jax.Array:
  """Σ_c π_c log(π_c/p̄_c) = KL(π ‖ p̄), π = 1/C uniform, p̄ = mean_B p."""
  num_classes = logits.shape[-1]
  return jnp.mean(-jnp.log(num_classes) - _log_mean_prediction(logits))


def prediction_entropy(logits: jax.Array) -> jax.Array:
  """mean_B[−Σ_c p_ic log p_ic]."""
  log_p = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.sum(jnp.exp(log_p) * log_p, axis=-1))


def step1_loss(logits: jax.Array, targets: jax.Array, alpha: float, beta: float
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
  """Step 1's L = soft CE against Y + α·KL(π ‖ p̄) + β·entropy; returns L and its three terms."""
  classification = soft_cross_entropy(logits, targets)
  prior = prior_loss(logits)
  entropy = prediction_entropy(logits)
  return classification + alpha * prior + beta * entropy, (classification, prior, entropy)


def reference_loss(logits: jax.Array, labels: jax.Array, alpha: float, beta: float) -> jax.Array:
  """The reference's CE(z, ỹ) + α·(−Σ_c (1/C) log p̄_c) + β·mean_B[lse(p_i) − Σ_c p_ic²]."""
  p = jax.nn.softmax(logits)
  prior = -jnp.mean(_log_mean_prediction(logits))
  entropy = jnp.mean(jax.nn.logsumexp(p, axis=-1) - jnp.sum(p * p, axis=-1))
  return losses.cross_entropy(logits, labels) + alpha * prior + beta * entropy


def initial_labels(labels: jax.Array, num_classes: int) -> jax.Array:
  """Y = e_ỹ (float32), a uniform row where the label is −1."""
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return jnp.where((labels >= 0)[:, None], one_hot, 1.0 / num_classes)


def averaged_labels(labels: jax.Array, history: jax.Array, filled: jax.Array) -> jax.Array:
  """Each row's mean over the history slots that hold it; the old row where none does.

  Args:
    labels: (..., N, C) current Y.
    history: (..., window, N, C) stored predictions.
    filled: (..., window, N) which slots hold a prediction of the sample.
  """
  counts = filled.sum(-2)[..., None]
  sums = jnp.sum(jnp.where(filled[..., None], history, 0.0), axis=-3)
  return jnp.where(counts > 0, sums / jnp.maximum(counts, 1), labels)


def init_state(state: TrainState, context: StateContext, window: int) -> TrainState:
  """Y = e_ỹ, an empty history, and the fresh network of step 2 (params, BN statistics, optimiser
  state, from the method's own key)."""
  num, num_classes = context.num_train, context.num_classes
  _, network_key = jax.random.split(context.key)
  fresh = context.new_classifier(network_key)
  return state.replace(method_state={
      "labels": initial_labels(context.labels, num_classes),
      "history": jnp.zeros((window, num, num_classes), jnp.float32),
      "filled": jnp.zeros((window, num), bool),
      "slot": jnp.zeros((), jnp.int32),
      # The epoch whose `begin_epoch` ran last (−1: none yet).
      "began": jnp.full((), -1, jnp.int32),
      "other_network": {"params": fresh.params, "batch_stats": fresh.batch_stats,
                        "opt_state": fresh.opt_state},
  })


def begin_epoch(state: TrainState, epoch: int, learning_rate: float, *, window: int,
                label_start_epoch: int, step1_epochs: int) -> TrainState:
  """Sets the classifier's rate; where 0-based `epoch` has not begun yet: after (1-based) epoch
  `epoch` of step 1, if it is ≥ t_begin, Y = the mean of the window; in step 1, the epoch's slot
  is emptied and made the one the steps write. Works on a state stacked over runs too."""
  state = state.replace(opt_state=set_learning_rate(state.opt_state, learning_rate))
  table = state.method_state
  new = table["began"] != epoch
  update = new & (label_start_epoch <= epoch) & (epoch <= step1_epochs)
  labels = jnp.where(update[..., None, None],
                     averaged_labels(table["labels"], table["history"], table["filled"]),
                     table["labels"])
  in_step1 = new & (epoch < step1_epochs)
  slot = epoch % window
  emptied = table["filled"] & (jnp.arange(window) != slot)[:, None]
  filled = jnp.where(in_step1[..., None, None], emptied, table["filled"])
  return state.replace(method_state={
      **table, "labels": labels, "filled": filled,
      "slot": jnp.where(in_step1, slot, table["slot"]).astype(jnp.int32),
      "began": jnp.full_like(table["began"], epoch)})


def step1_step(alpha: float, beta: float
               ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Step 1: an SGD step of `step1_loss` against Y of the batch; sg(p) goes into the history slot
  of the epoch at the batch's ids."""
  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    table = state.method_state
    index = batch["index"]
    targets = table["labels"][index]

    def objective(params):
      logits, batch_stats = steps.forward_train(state, params, batch["image"])
      loss, parts = step1_loss(logits, targets, alpha, beta)
      return loss, (logits, batch_stats, parts)

    (loss, (logits, batch_stats, (classification, prior, entropy))), grads = jax.value_and_grad(
        objective, has_aux=True)(state.params)
    predictions = jax.lax.stop_gradient(jax.nn.softmax(logits))
    slot = table["slot"]
    new_state = steps.apply_classifier_gradients(state, grads, batch_stats).replace(method_state={
        **table, "history": table["history"].at[slot, index].set(predictions),
        "filled": table["filled"].at[slot, index].set(True)})
    return new_state, {"loss": loss, "classification_loss": classification,
                       "prior_loss": prior, "entropy_loss": entropy,
                       "accuracy": steps.labelled_accuracy(logits, batch["label"]),
                       "label_agreement": steps.labelled_accuracy(targets, batch["label"])}
  return step


# Step 2: an SGD step of the soft cross-entropy against the final Y of the batch.
step2_step = steps.table_target_step("labels", soft_cross_entropy)


def enter_step2(state: TrainState, begins: bool) -> TrainState:
  """Where step 2 begins, the fresh network becomes the classifier and the step-1 network takes
  its place in `method_state` (a swap: no buffer is held twice); a resumed run restored the
  swapped state."""
  if not begins:
    return state
  other = state.method_state["other_network"]
  step1_network = {"params": state.params, "batch_stats": state.batch_stats,
                   "opt_state": state.opt_state}
  return state.replace(params=other["params"], batch_stats=other["batch_stats"],
                       opt_state=other["opt_state"],
                       method_state={**state.method_state, "other_network": step1_network})


def soft_labels(state: TrainState, batch: Batch) -> jax.Array:
  """Y of the batch's samples."""
  return state.method_state["labels"][batch["index"]]


def method(config: ml_collections.ConfigDict) -> Method:
  """Joint Optimization as published: step 1 with label updates, then a fresh network on Y."""
  settings = config.joint_optimization
  s1, window, t_begin = settings.step1_epochs, settings.window, settings.label_start_epoch
  if s1 < 1 or window < 1:
    raise ValueError(f"config.joint_optimization.step1_epochs={s1}, window={window}: both must be "
                     "at least 1.")
  if not 1 <= t_begin <= s1:
    raise ValueError(f"config.joint_optimization.label_start_epoch={t_begin} must lie in "
                     f"[1, step1_epochs = {s1}] (1-based: the first epoch after which the labels "
                     "are updated); otherwise step 2 would train on the given labels.")
  step1_lr = settings.step1_learning_rate

  def init(state, context):
    return init_state(state, context, window)

  def begin(state, epoch, learning_rate):
    return begin_epoch(state, epoch, learning_rate, window=window, label_start_epoch=t_begin,
                       step1_epochs=s1)

  # Config copy frozen now, so a later edit of `config` does not move the schedule.
  schedule_config = config.copy_and_resolve_references()
  return Method("joint_optimization", (
      Phase("step 1", 0, step1_step(settings.alpha, settings.beta), selects_best=False,
            soft_labels=soft_labels, learning_rate=lambda epoch: step1_lr),
      Phase("step 2", s1, step2_step, enter=enter_step2, soft_labels=soft_labels,
            learning_rate=lambda epoch: config_lib.learning_rate_at(schedule_config, epoch - s1)),
  ), init_state=init, begin_epoch=begin, num_epochs=s1 + config.num_epochs)


def reference_method(config: ml_collections.ConfigDict) -> Method:
  """The reference's Joint Optimization: one training, its loss, no label updates."""
  alpha, beta = config.joint_optimization.alpha, config.joint_optimization.beta
  loss = lambda logits, labels: reference_loss(logits, labels, alpha, beta)
  return Method("joint_optimization_reference",
                (Phase("joint optimization", 0, steps.supervised_step(loss)),))

