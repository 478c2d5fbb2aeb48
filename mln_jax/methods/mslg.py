"""MSLG (Algan & Ulusoy, ICPR 2020): meta soft label generation, MetaLabelNet's predecessor.

Every training sample owns free label logits ỹ_i ∈ R^C (a per-sample table, as PENCIL's), and its
soft label is ŷ_i = softmax(ỹ_i). After a cross-entropy warm-up, each step takes one virtual
plain-SGD step of the classifier on L_c(θ, ŷ) = KL(p ‖ ŷ) averaged over B·C, measures the clean
meta batch's cross-entropy at those fast weights, moves the batch's label logits down its gradient
(second order) and writes them back, then trains the classifier on the updated soft labels plus an
entropy term (BASELINES.md §13). Its soft labels (the table's softmax) are exported and scored as
label-issue detections like MetaLabelNet's.

Published algorithm (registry name `mslg`): phase "warm-up" (epochs 0 .. E1 − 1, E1 =
`config.warmup_epochs`, as MetaLabelNet's): cross-entropy on the given labels, not used for model
selection (as MetaLabelNet's warm-up). Phase "mslg" (E1 ..), per batch:
  1. z = f(x; θ) (train mode); ŷ = softmax(ỹ[ids]).
  2. L_c(θ, ŷ) = mean_BC[p (log p − log(ŷ + 1e-10))].
  3. θ' = θ − α ∇_θ L_c (plain SGD, all parameters).
  4. L_meta = mean CE(f(x_m; θ'), y_m) (train-mode BN, statistics discarded).
  5. ỹ[ids] ← ỹ[ids] − β ∂L_meta/∂ỹ[ids] (plain GD, written back at the batch's ids).
  6. L = L_c(θ, sg(softmax(ỹ[ids]))) + γ mean_BC[−p log p] on the z of step 1; an SGD step
     (momentum, weight decay) of θ, BN running statistics from the forward of step 1.
Step 5's gradient is `steps.meta_gradient_autodiff` (jax.grad through the inner optax update);
`meta_gradient_closed_form` is the exact cheap alternative (one JVP, §13) and is tested against it.
The table starts at K·e_ỹ; a sample without a label (ỹ = −1) starts at a zero row, i.e. a uniform
soft label — it never trains here (the phase trains on labelled samples), so its row stays so.

Reference deviations (`mslg_reference`, the MetaLabelNet authors' copy of `mslg.py`):
  (i) a first run for a noise setting finds no cached initial-label file and leaves the table at
      zero: uniform initial soft labels (reproduced: the table starts at zeros);
  (iv) found in that copy's code, not listed in BASELINES.md: each epoch it copies the step's labels
      from the initial table (`y_hat = new_y[0].copy()`) and writes its updates into a per-epoch
      history that no step reads back, so every step starts from the initial rows — zeros — and
      the label updates never accumulate across epochs (the original MSLG repository reads them
      back). Reproduced: the step starts from zero rows and the table keeps each sample's latest
      update (what the reference's history holds for the last epoch, and what is exported);
  (iii) the fast forward on the meta batch also updates the BN running statistics, after the
      training batch's forward (reproduced: the meta forward's statistics are folded in on top of
      the training forward's ones; the meta loss itself is unchanged, train-mode BN). The
      published `mslg` does the same with `config.reference_batch_norm`;
  (ii) the warm-up checkpoint is cached per noise setting without the seed, so all seeds share one
      warm-up: not reproduced (each run trains its own warm-up; sharing one across runs is a
      property of a cache between processes, not of a run).
Not shipped: the no-clean-data option (`mslg.py -c 0`: meta data picked from the training set by
low warm-up loss).

Defaults (`config.mslg`, the reference's CIFAR-10 values, also the original MSLG repository's):
α = `inner_lr` 0.5, β = `label_lr` 4000, γ = `entropy_weight` 1, K = `k` 10, E1 44 of 120 epochs,
the shared lr schedule, meta batches from the validation split (Clothing1M: β 1500, E1 1, 10
epochs). The paper's own table of values was not checked (BASELINES.md §13).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mln_jax import losses, steps
from mln_jax.methods.base import Method, Phase, StateContext
from mln_jax.train_state import TrainState

Batch = dict[str, jax.Array]
TABLE = "label_logits"  # method_state key of the (N, C) label-logit table ỹ
SOFT_LABEL_EPSILON = 1e-10  # inside log(ŷ + ε) of L_c, as the reference


def classification_loss(logits: jax.Array, soft_labels: jax.Array) -> jax.Array:
  """MSLG's L_c = mean over all B·C entries of p (log p − log(ŷ + 1e-10)), p = softmax(logits).

  Args:
    logits: (B, C) classifier logits.
    soft_labels: (B, C) label distributions ŷ (rows sum to 1; entries may be 0).

  Returns:
    The scalar loss (KL(p ‖ ŷ) per sample, divided by B·C as the reference averages).
  """
  log_p = jax.nn.log_softmax(logits)
  return jnp.mean(jnp.exp(log_p) * (log_p - jnp.log(soft_labels + SOFT_LABEL_EPSILON)))


def initial_table(labels: jax.Array, num_classes: int, k: float) -> jax.Array:
  """The (N, C) label logits K·e_ỹ of the given labels; an unlabelled sample (−1) gets a zero row
  (a uniform soft label)."""
  return k * jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)


def inner_loss_of(rows: jax.Array) -> Callable[[jax.Array], jax.Array]:
  """The inner loss of step 3 as a function of the batch's label logits: L_c(·, softmax(rows))."""
  soft_labels = jax.nn.softmax(rows)
  return lambda logits: classification_loss(logits, soft_labels)


def meta_gradient_closed_form(state: TrainState, images: jax.Array, meta_batch: Batch,
                              rows: jax.Array, inner_lr: float | jax.Array
                              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """∂L_meta/∂ỹ for the batch's label logits `rows` by §13's closed form (plain SGD inner step).

  v_ic = ∂L_meta/∂ŷ_ic = α/(B·C) · [J_p(θ) g]_ic / (ŷ_ic + 1e-10) with g = ∇_θ' L_meta(θ'), one JVP
  of the classifier's probabilities instead of a backward through a backward; then through the
  softmax: ∂L_meta/∂ỹ_i = ŷ_i ⊙ (v_i − ⟨v_i, ŷ_i⟩).

  Returns:
    The meta loss, the (B, C) gradient and the meta batch's logits, as
    `steps.meta_gradient_autodiff` with `inner_loss_of`.
  """
  soft_labels = jax.nn.softmax(rows)
  fast_params = steps.inner_update(state, images, inner_loss_of(rows), inner_lr)
  (loss, meta_logits), g = jax.value_and_grad(
      lambda params: steps.meta_loss(state, params, meta_batch), has_aux=True)(fast_params)
  probabilities = lambda params: jax.nn.softmax(steps.forward_train(state, params, images)[0])
  _, jvp_p = jax.jvp(probabilities, (state.params,), (g,))
  v = inner_lr / jvp_p.size * jvp_p / (soft_labels + SOFT_LABEL_EPSILON)
  grads = soft_labels * (v - jnp.sum(v * soft_labels, -1, keepdims=True))
  return loss, grads, meta_logits


def make_step(inner_lr: float, label_lr: float, entropy_weight: float, reference: bool = False,
              reference_batch_norm: bool = False
              ) -> Callable[[TrainState, Batch, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """The "mslg" phase's step (module docstring, steps 1–6): `(state, batch, meta_batch) ->
  (state, metrics)`. `reference`: the `mslg_reference` step (starts every update from zero rows);
  `reference_batch_norm`: the meta forward's BN statistics are folded into the running ones on top
  of the training forward's (deviation (iii))."""
  def step(state: TrainState, batch: Batch, meta_batch: Batch):
    images, index = batch["image"], batch["index"]
    table = state.method_state[TABLE]
    rows = jnp.zeros_like(table[index]) if reference else table[index]
    # Step 1's forward of θ: its logits are the final loss's (as the reference reuses them) and
    # its BN statistics the new running ones; the classifier's gradient comes by its pullback.
    logits, pullback, batch_stats = jax.vjp(
        lambda params: steps.forward_train(state, params, images), state.params, has_aux=True)
    loss_on_meta, row_grads, meta_logits, meta_stats = steps.meta_gradient_autodiff(
        state, images, meta_batch, rows, inner_loss_of, learning_rate=inner_lr,
        batch_stats=batch_stats)
    if reference_batch_norm:
      batch_stats = jax.lax.stop_gradient(meta_stats)
    new_rows = rows - label_lr * row_grads
    soft_labels = jax.lax.stop_gradient(jax.nn.softmax(new_rows))

    def train_loss(z):
      classification = classification_loss(z, soft_labels)
      entropy = losses.entropy(z)
      return classification + entropy_weight * entropy, (classification, entropy)

    (loss, (classification, entropy)), logit_grads = jax.value_and_grad(
        train_loss, has_aux=True)(logits)
    (grads,) = pullback(logit_grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats, opt_state=opt_state,
        method_state={**state.method_state, TABLE: table.at[index].set(new_rows)})
    metrics = {
        "loss": loss,
        "classification_loss": classification,
        "entropy_loss": entropy,
        "meta_loss": loss_on_meta,
        "meta_batch_accuracy": steps.labelled_accuracy(meta_logits, meta_batch["label"]),
        "accuracy": steps.labelled_accuracy(logits, batch["label"]),
        # How often the updated soft label's argmax keeps the given (noisy) label.
        "soft_label_agreement": steps.labelled_accuracy(new_rows, batch["label"]),
        "label_step_norm": label_lr * jnp.sqrt(jnp.sum(row_grads ** 2)),
    }
    return new_state, metrics
  return step


def table_soft_labels(state: TrainState, batch: Batch) -> jax.Array:
  """The batch's soft labels softmax(ỹ[ids]) (B, C), read at its sample ids."""
  return jax.nn.softmax(state.method_state[TABLE][batch["index"]])


def _build(config: ml_collections.ConfigDict, name: str, reference: bool) -> Method:
  warmup_epochs = config.warmup_epochs
  if not 0 <= warmup_epochs < config.num_epochs:
    raise ValueError(f"config.warmup_epochs={warmup_epochs} must lie in [0, num_epochs - 1 = "
                     f"{config.num_epochs - 1}] for {name}: its label phase needs an epoch.")
  settings = config.mslg
  k = settings.k

  def init_state(state: TrainState, context: StateContext) -> TrainState:
    table = (jnp.zeros((context.num_train, context.num_classes), jnp.float32) if reference
             else initial_table(context.labels, context.num_classes, k))
    return state.replace(method_state={TABLE: table})

  label_phase = Phase(
      "mslg", warmup_epochs,
      make_step(settings.inner_lr, settings.label_lr, settings.entropy_weight, reference,
                reference or config.reference_batch_norm),
      uses_meta=True, trains_on="labelled", selects_best=True, soft_labels=table_soft_labels)
  # Model selection as MetaLabelNet's: over the label phase's epochs only.
  warmup = (Phase("warm-up", 0, steps.warmup_step, selects_best=False),) if warmup_epochs else ()
  return Method(name, warmup + (label_phase,), init_state=init_state)


def method(config: ml_collections.ConfigDict) -> Method:
  """MSLG as published (BASELINES.md §13): table K·e_ỹ, label updates kept across epochs."""
  return _build(config, "mslg", reference=False)


def reference_method(config: ml_collections.ConfigDict) -> Method:
  """`mslg_reference`: the MetaLabelNet authors' `mslg.py` (deviations (i), (iii), (iv) in the
  module docstring)."""
  return _build(config, "mslg_reference", reference=True)
