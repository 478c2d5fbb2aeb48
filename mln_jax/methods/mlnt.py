"""MLNT, meta-learning based noise-tolerant training (Li et al., CVPR 2019; BASELINES.md §12).

Before each conventional update the student θ is also made robust to label noise of its own
making: M synthetic noisy label sets ŷ^m relabel a share ρ of the batch with the given label of
one of each sample's k nearest batch members in the feature space of a frozen cross-entropy
network h; one plain SGD step θ'_m = θ − α∇θ CE(f(x;θ), ŷ^m) on each must leave the predictions
consistent with an EMA teacher θ̃, J_m = mean_BC[q (log q − log softmax f(x;θ'_m))],
q = sg(softmax f(x;θ̃)). One SGD step (momentum, weight decay) on ∇θ[L_ce + w_t·(1/M)Σ_m J_m]
follows, second order through the M fast steps. No clean data is used.

Here a run trains twice: phase "feature net" trains h by cross-entropy (`feature_epochs` epochs,
not model-selected), then phase "mlnt" copies it into `method_state["features"]` (frozen,
penultimate features) and trains a fresh student from the fresh network `init_state` kept, for
`num_epochs` epochs with the learning-rate schedule restarted.

Registry names:
- `mlnt` (the published algorithm as the MLNT code runs it): t counts the student's global steps
  since its training began; the meta term starts once t > `start_step`; for `start_step` < t ≤
  `ramp_end_step` its weight ramps up, w_t = w·exp(−5(1−u)²) with u = (t − start)/(end − start),
  and the teacher's EMA decay is γ = `ema_ramp`, afterwards w_t = w and γ = `ema`. The first meta
  step sets θ̃ := θ, later ones θ̃ ← γθ̃ + (1−γ)θ (parameters only; the teacher's BatchNorm
  statistics come from its own train-mode forwards). h runs in inference mode. Student and teacher
  are evaluated; the one better on the meta (validation) split stands for the epoch.
- `mlnt_reference` (the MetaLabelNet authors' `baselines.py`): the start test reads the
  within-epoch batch index, `index > start_step or epoch > 1` (0-based epoch of the student's
  training), so on CIFAR-10 (391 batches) the meta term starts at the third epoch at full weight,
  with γ = `ema` and no ramp; h runs in train mode (batch-statistic features); the M fast forwards
  also fold their batch statistics into the student's running averages (after the conventional
  forward's, in order m = 1..M, as PyTorch's functional forward does; `mlnt` does this too with
  `config.reference_batch_norm`); only the student is evaluated.

Defaults (`config.mlnt`; the reference's CIFAR-10 values): M = 10, ρ = 0.5, k = 10, α = 0.2,
w = 1, start_step = 500, ramp_end_step = 2000, ema_ramp = 0.99, ema = 0.999; `feature_epochs` 0
means `num_epochs`. The MLNT code (Clothing1M): the same M, ρ, k, w, α = 0.02, lr 8e-4, weight decay
1e-3, batch 32. As in both codes (not the paper), the meta and conventional gradients are summed in
one step and the KL averages over B·C.

Departures from BASELINES.md, and why:
- h is the feature phase's final model, not the best-validation checkpoint of a separate CE run
  (the loop selects no model of a phase that is not selected on; the reference also takes a final
  model); the reference's "any earlier CE run, or random weights" is not reproduced: both variants
  train their own h for `feature_epochs`.
- ρ·B is rounded to the nearest integer (the reference truncates; equal for its batches of 128
  and 80 at ρ = 0.5).
- A sample's k neighbours are its k nearest *other* batch members (itself is left out even where a
  duplicate ties it at distance 0; the reference takes ranks 1..k of the k+1 nearest).
- Synthetic labels draw their randomness from `state.rng` folded with a stream constant and the
  step (`label_key`), not from a global generator.
- The meta term is skipped with `lax.cond` before it starts; with `num_runs` > 1 the loop `vmap`s
  the step and a cond on the per-run step becomes a select, which computes both branches (the
  values are unchanged; only the saving is lost).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mln_jax import config as config_lib, losses, steps
from mln_jax.methods.base import Method, Phase, StateContext
from mln_jax.train_state import TrainState, copy_tree, set_learning_rate

Batch = dict[str, jax.Array]

# Synthetic labels' keys: state.rng folded with this stream ("mlnt"), then the step; far from the
# epoch indices the data stream folds into the same key and from the dropout streams.
_LABEL_STREAM = 0x6d6c6e74
# The reference's start test also starts the meta term at this 0-based epoch of the student's
# training (`epoch > 1`).
_REFERENCE_START_EPOCH = 2


def schedule(t: jax.Array, start_step: int, ramp_end_step: int, weight: float, ema_ramp: float,
             ema: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The MLNT code's ramp at student step t: (meta active, w_t, γ).

  Active iff t > start_step; for start_step < t ≤ ramp_end_step, w_t = w·exp(−5(1−u)²) with
  u = (t − start_step)/(ramp_end_step − start_step) and γ = ema_ramp; later w_t = w, γ = ema.
  w_t is 0 while inactive.
  """
  t = jnp.asarray(t, jnp.float32)
  active = t > start_step
  u = jnp.clip((t - start_step) / max(ramp_end_step - start_step, 1), 0.0, 1.0)
  in_ramp = t <= ramp_end_step
  w_t = jnp.where(in_ramp, weight * jnp.exp(-5.0 * (1.0 - u) ** 2), weight)
  gamma = jnp.where(in_ramp, ema_ramp, ema)
  return active, jnp.where(active, w_t, 0.0), gamma


def nearest_neighbours(features: jax.Array, k: int) -> jax.Array:
  """(B, k) batch positions of each sample's k nearest other samples by squared Euclidean
  distance of `features` (B, D), nearest first."""
  if not 0 < k < features.shape[0]:
    raise ValueError(f"MLNT: {k} neighbours need a batch of more than {k} samples (and k >= 1); "
                     f"the batch has {features.shape[0]}.")
  distances = jnp.sum((features[:, None, :] - features[None, :, :]) ** 2, -1)
  # Itself first, whatever ties it at distance 0, then its k nearest others.
  distances = jnp.where(jnp.eye(features.shape[0], dtype=bool), -jnp.inf, distances)
  _, nearest = jax.lax.top_k(-distances, k + 1)
  return nearest[:, 1:]


def synthetic_labels(key: jax.Array, features: jax.Array, labels: jax.Array, fraction: float,
                     neighbours: int) -> jax.Array:
  """One synthetic noisy label set ŷ (B,): round(ρ·B) batch samples, drawn without replacement,
  take the given label of one of their k nearest batch members (by `features`), chosen uniformly;
  the others keep their label. A pure function of (key, features, labels)."""
  batch_size = labels.shape[0]
  num_relabelled = int(round(fraction * batch_size))
  others = nearest_neighbours(jax.lax.stop_gradient(features), neighbours)
  order_key, pick_key = jax.random.split(key)
  chosen = jax.random.permutation(order_key, batch_size)[:num_relabelled]
  picks = jax.random.randint(pick_key, (num_relabelled,), 0, neighbours)
  # Copies of the *given* labels: one relabelled sample never passes on another's new label.
  return labels.at[chosen].set(labels[others[chosen, picks]])


def synthetic_label_sets(key: jax.Array, features: jax.Array, labels: jax.Array, num_sets: int,
                         fraction: float, neighbours: int) -> jax.Array:
  """(M, B) synthetic label sets, set m from `fold_in(key, m)` (the neighbours are found once:
  they do not depend on the key)."""
  keys = jax.vmap(lambda m: jax.random.fold_in(key, m))(jnp.arange(num_sets))
  return jax.vmap(synthetic_labels, in_axes=(0, None, None, None, None))(
      keys, features, labels, fraction, neighbours)


def label_key(state: TrainState) -> jax.Array:
  """The key of this step's synthetic labels: `state.rng` folded with a stream and the step."""
  return jax.random.fold_in(jax.random.fold_in(state.rng, _LABEL_STREAM), state.step)


def consistency_loss(logits: jax.Array, teacher_probs: jax.Array) -> jax.Array:
  """J = mean_BC[q (log q − log softmax(z))]: KL(q ‖ p) averaged over all B·C entries (PyTorch's
  KLDivLoss default), 0·log 0 = 0."""
  q = jax.lax.stop_gradient(teacher_probs)
  return jnp.mean(jax.scipy.special.xlogy(q, q) - q * jax.nn.log_softmax(logits))


def consistency(state: TrainState, params: Any, images: jax.Array, label_sets: jax.Array,
                teacher_probs: jax.Array, meta_lr: float, running_stats: Any = None
                ) -> tuple[jax.Array, Any]:
  """(1/M)Σ_m J_m(θ) for θ = `params`, with θ'_m = θ − α∇θ mean CE(f(x;θ), ŷ^m) (plain SGD, all
  parameters; differentiable in θ, second order) and J_m the consistency of f(x;θ'_m) (train-mode
  BatchNorm) with the teacher's `teacher_probs`.

  `running_stats`: None discards the fast forwards' BatchNorm statistics (returns None);
  otherwise each fast forward in turn folds its batch statistics into them (the reference), and
  the result is returned.
  """
  student = state.replace(params=params)

  def one_set(stats, synthetic):
    fast_params = steps.inner_update(
        student, images, lambda logits: losses.cross_entropy(logits, synthetic),
        learning_rate=meta_lr)
    fast_logits, new_stats = steps.forward_train(student, fast_params, images,
                                                 batch_stats=stats)
    return (None if stats is None else new_stats), consistency_loss(fast_logits, teacher_probs)

  # Unrolled rather than a lax.scan: XLA:CPU runs convolutions inside loop bodies many times
  # slower (M is small and static).
  stats, values = running_stats, []
  for synthetic in label_sets:
    stats, value = one_set(stats, synthetic)
    values.append(value)
  return jnp.mean(jnp.stack(values)), stats


def update_teacher(teacher_params: Any, params: Any, gamma: jax.Array, initialised: jax.Array
                   ) -> Any:
  """θ̃ := θ the first time (`initialised` false), afterwards θ̃ ← γθ̃ + (1−γ)θ."""
  return jax.tree.map(
      lambda tp, p: jnp.where(initialised, gamma * tp + (1.0 - gamma) * p, p), teacher_params,
      params)


def predict_teacher(state: TrainState, images: jax.Array) -> jax.Array:
  """The EMA teacher's logits in inference mode (its own BatchNorm running statistics)."""
  teacher = state.method_state["teacher"]
  logits, _ = state.apply_fn({"params": teacher["params"], "batch_stats": teacher["batch_stats"]},
                             images, train=False)
  return logits


def feature_net_features(state: TrainState, images: jax.Array, train: bool = False) -> jax.Array:
  """Penultimate features h(x) of the frozen feature net: inference mode (`train=False`) or
  batch statistics (the reference)."""
  variables = state.method_state["features"]
  variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  if train:
    key = jax.random.fold_in(jax.random.fold_in(state.rng, _LABEL_STREAM + 1), state.step)
    (_, features), _ = state.apply_fn(variables, images, train=True, mutable=["batch_stats"],
                                      rngs={"dropout": key})
  else:
    _, features = state.apply_fn(variables, images, train=False)
  return jax.lax.stop_gradient(features)


def make_step(settings: ml_collections.ConfigDict, reference: bool = False,
              reference_batch_norm: bool = False):
  """MLNT's training step (BASELINES §12 steps 1–4) with `settings` = `config.mlnt`;
  `reference_batch_norm`: the M fast forwards fold their batch statistics into the student's
  running ones, after the conventional forward's (the reference)."""
  num_sets, fraction, neighbours = settings.num_synthetic, settings.fraction, settings.neighbours
  meta_lr, weight = settings.meta_lr, settings.weight

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    table = state.method_state
    images, labels = batch["image"], batch["label"]
    if reference:
      within_epoch = state.step - table["epoch_start_step"]
      active = (within_epoch > settings.start_step) | (table["epoch"] >= _REFERENCE_START_EPOCH)
      w_t = jnp.where(active, weight, 0.0)
      gamma = jnp.asarray(settings.ema, jnp.float32)
    else:
      active, w_t, gamma = schedule(state.step - table["start_step"], settings.start_step,
                                    settings.ramp_end_step, weight, settings.ema_ramp,
                                    settings.ema)

    def cross_entropy_of(params):
      logits, batch_stats = steps.forward_train(state, params, images)
      return losses.cross_entropy(logits, labels), (logits, batch_stats)

    (cross_entropy, (logits, batch_stats)), grads = jax.value_and_grad(
        cross_entropy_of, has_aux=True)(state.params)
    teacher = table["teacher"]

    def meta(_):
      teacher_params = update_teacher(teacher["params"], state.params, gamma,
                                      table["teacher_ready"] > 0)
      teacher_logits, teacher_stats = steps.forward_train(
          state, teacher_params, images, batch_stats=teacher["batch_stats"])
      q = jax.lax.stop_gradient(jax.nn.softmax(teacher_logits))
      features = feature_net_features(state, images, train=reference)
      label_sets = synthetic_label_sets(label_key(state), features, labels, num_sets, fraction,
                                        neighbours)
      (value, fast_stats), meta_grads = jax.value_and_grad(consistency, argnums=1, has_aux=True)(
          state, state.params, images, label_sets, q, meta_lr,
          batch_stats if reference_batch_norm else None)
      student_stats = fast_stats if reference_batch_norm else batch_stats
      return teacher_params, teacher_stats, value, meta_grads, student_stats

    def skip(_):
      return (teacher["params"], teacher["batch_stats"], jnp.zeros((), cross_entropy.dtype),
              jax.tree.map(jnp.zeros_like, grads), batch_stats)

    teacher_params, teacher_stats, value, meta_grads, batch_stats = jax.lax.cond(
        active, meta, skip, None)
    w_t = w_t.astype(cross_entropy.dtype)
    grads = jax.tree.map(lambda g, m: g + w_t * m, grads, meta_grads)
    method_state = {**table,
                    "teacher": {"params": teacher_params, "batch_stats": teacher_stats},
                    "teacher_ready": jnp.where(active, 1, table["teacher_ready"]).astype(
                        table["teacher_ready"].dtype)}
    new_state = steps.apply_classifier_gradients(state, grads, batch_stats).replace(
        method_state=method_state)
    metrics = {"loss": cross_entropy + w_t * value, "cross_entropy": cross_entropy,
               "consistency": value, "meta_weight": w_t,
               "meta_active": active.astype(jnp.float32),
               "accuracy": steps.labelled_accuracy(logits, labels)}
    return new_state, metrics

  return step


def init_state(state: TrainState, context: StateContext) -> TrainState:
  """Every leaf MLNT will need, in the structure it keeps in both phases: the feature net (a
  placeholder until the student's training begins), the teacher, the fresh student's parameters,
  statistics and optimiser state, the student's first step and the epoch bookkeeping."""
  fresh = context.new_classifier(context.key)
  return state.replace(method_state={
      "features": {"params": copy_tree(state.params),
                   "batch_stats": copy_tree(state.batch_stats)},
      "teacher": {"params": copy_tree(fresh.params), "batch_stats": copy_tree(fresh.batch_stats)},
      "teacher_ready": jnp.zeros((), jnp.int32),
      "fresh": {"params": fresh.params, "batch_stats": fresh.batch_stats,
                "opt_state": fresh.opt_state},
      "start_step": jnp.zeros((), jnp.int32),
      # The 0-based epoch of the student's training begun last (−1 none yet) and the global step
      # it began at: the reference's start test reads the within-epoch batch index.
      "epoch": jnp.full((), -1, jnp.int32),
      "epoch_start_step": jnp.zeros((), jnp.int32),
  })


def enter_student(state: TrainState, begins: bool) -> TrainState:
  """Where the student's training begins: the cross-entropy network becomes the frozen feature
  net, the fresh network (parameters, statistics, optimiser state) the student, and the step
  becomes t = 0 of the ramp. A run resumed inside the phase restored all of it."""
  if not begins:
    return state
  table = state.method_state
  fresh = table["fresh"]
  return state.replace(
      params=copy_tree(fresh["params"]), batch_stats=copy_tree(fresh["batch_stats"]),
      opt_state=copy_tree(fresh["opt_state"]),
      method_state={**table,
                    "features": {"params": copy_tree(state.params),
                                 "batch_stats": copy_tree(state.batch_stats)},
                    "teacher_ready": jnp.zeros_like(table["teacher_ready"]),
                    "start_step": jnp.copy(state.step).astype(table["start_step"].dtype)})


def feature_epochs(config: ml_collections.ConfigDict) -> int:
  """F, the epochs of the cross-entropy feature net (`mlnt.feature_epochs`, 0: `num_epochs`)."""
  return config.mlnt.feature_epochs or config.num_epochs


def _build(config: ml_collections.ConfigDict, name: str, reference: bool) -> Method:
  settings = config.mlnt
  if settings.num_synthetic < 1 or settings.neighbours < 1 or not 0.0 <= settings.fraction <= 1.0:
    raise ValueError(f"config.mlnt: num_synthetic ({settings.num_synthetic}) and neighbours "
                     f"({settings.neighbours}) must be >= 1 and fraction ({settings.fraction}) in "
                     "[0, 1].")
  first = feature_epochs(config)

  def begin_epoch(state: TrainState, epoch: int, learning_rate: float) -> TrainState:
    state = state.replace(opt_state=set_learning_rate(state.opt_state, learning_rate))
    table = state.method_state
    student_epoch = epoch - first
    # Only a new epoch moves its start (a run resumed inside an epoch keeps it).
    new_epoch = table["epoch"] != student_epoch
    return state.replace(method_state={
        **table, "epoch": jnp.full_like(table["epoch"], student_epoch),
        "epoch_start_step": jnp.where(new_epoch, state.step, table["epoch_start_step"]).astype(
            table["epoch_start_step"].dtype)})

  models = () if reference else (("student", steps.predict), ("teacher", predict_teacher))
  return Method(name, (
      Phase("feature net", 0, steps.warmup_step, selects_best=False),
      Phase("mlnt", first,
            make_step(settings, reference, reference or config.reference_batch_norm),
            enter=enter_student,
            learning_rate=lambda epoch: config_lib.learning_rate_at(config, epoch - first)),
  ), init_state=init_state, begin_epoch=begin_epoch, models=models,
      num_epochs=first + config.num_epochs)


def method(config: ml_collections.ConfigDict) -> Method:
  """MLNT as published (the MLNT code's ramp; student and teacher evaluated)."""
  return _build(config, "mlnt", reference=False)


def mlnt_reference(config: ml_collections.ConfigDict) -> Method:
  """MLNT as the MetaLabelNet authors' `baselines.py` runs it (see the module docstring)."""
  return _build(config, "mlnt_reference", reference=True)


reference_method = mlnt_reference
