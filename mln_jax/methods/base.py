"""What a method is: phases with pure steps, and the hooks the loop calls (see
`mln_jax.methods`)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from mln_jax import steps
from mln_jax.train_state import TrainState, set_learning_rate, state_from_config

Batch = dict[str, jax.Array]
# (state, batch) -> (state, metrics), or (state, batch, meta_batch) -> ... where `uses_meta`.
StepFn = Callable[..., tuple[TrainState, dict[str, jax.Array]]]


def _unchanged(state: TrainState, begins: bool) -> TrainState:
  del begins
  return state


def _classifier_learning_rate(state: TrainState, epoch: int, learning_rate: float) -> TrainState:
  del epoch
  return state.replace(opt_state=set_learning_rate(state.opt_state, learning_rate))


def _no_method_state(state: TrainState, context: "StateContext") -> TrainState:
  del context
  return state


@dataclasses.dataclass(frozen=True)
class StateContext:
  """What a method's `init_state` may build its own state from, for one run.

  Attributes:
    labels: (N,) int32 given (noisy) training labels in sample-id order; −1 = unlabelled.
    clean_labels: (N,) int32 clean training labels where known (synthetic noise), else −1: only an
      oracle (e.g. Forward correction with the true noise matrix) may read them.
    num_classes: C.
    key: a PRNG key of the method's own, independent of the classifier's initialisation.
    new_classifier: `key -> TrainState`, a fresh state of the configured classifier and optimiser
      (a second network, or the fresh network of a method's second training).
  """
  labels: jax.Array
  clean_labels: jax.Array
  num_classes: int
  key: jax.Array
  new_classifier: Callable[[jax.Array], TrainState]

  @property
  def num_train(self) -> int:
    return self.labels.shape[0]


@dataclasses.dataclass(frozen=True)
class Phase:
  """Epochs `first_epoch` .. (the next phase's first epoch − 1) of a method.

  Attributes:
    name: the phase's label in the log and in each epoch's record ("warm-up", "metalabelnet").
    first_epoch: 0-based epoch the phase starts at.
    step: a pure, jittable step on normalised batches (`image`, `label` with −1 = unlabelled,
      `index` = the samples' ids): `(state, batch) -> (state, metrics)`, or with `uses_meta`
      `(state, batch, meta_batch) -> (state, metrics)`. Metrics are scalars, `loss` among them.
    uses_meta: the step takes a clean meta batch as well.
    selects_best: epochs of this phase count for the best-by-meta-accuracy model selection.
    trains_on: 'labelled' (samples with a label) or 'all' (unlabelled ones too).
    enter: `(state, begins) -> state`, called before every epoch of the phase the loop runs;
      `begins` is True only at the phase's very first step (False when a run resumes inside it).
    soft_labels: `(state, batch) -> (B, C)` label distributions the phase has for its training
      samples (tracked per epoch where cheap, exported at the end), or None. The batch holds
      unaugmented `image`s and their sample ids, `index` (no labels).
    soft_labels_from_images: whether `soft_labels` reads only the batch's images, so that it can
      judge images the run never trained on (`label_issues.cross_fit`); False where it looks a
      sample's own entry up by `index` (a per-sample label table).
    learning_rate: `0-based epoch -> classifier learning rate` for the phase's epochs, or None for
      the configured schedule (`config.learning_rate_at`); e.g. a second training that restarts
      the schedule, or a constant-rate first training.
    start_pass, start: where set, when the phase begins (not when a run resumes inside it: the
      result is in the checkpointed state), one inference pass of `start_pass(state, batch)`
      over all training samples (a batch as for `soft_labels`) gives per-sample outputs (N, ...)
      in sample-id order, and `state = start(state, outputs)` before `enter`: e.g. Forward
      correction's noise matrix estimated from the first training's predictions.
  """
  name: str
  first_epoch: int
  step: StepFn
  uses_meta: bool = False
  selects_best: bool = True
  trains_on: str = "labelled"
  enter: Callable[[TrainState, bool], TrainState] = _unchanged
  soft_labels: Callable[[TrainState, Batch], jax.Array] | None = None
  soft_labels_from_images: bool = False
  learning_rate: Callable[[int], float] | None = None
  start_pass: Callable[[TrainState, Batch], jax.Array] | None = None
  start: Callable[[TrainState, jax.Array], TrainState] | None = None

  def __post_init__(self):
    if (self.start_pass is None) != (self.start is None):
      raise ValueError(f"Phase {self.name!r}: start_pass and start go together.")
    if self.trains_on not in ("labelled", "all"):
      raise ValueError(f"Phase {self.name!r}: trains_on={self.trains_on!r} is not 'labelled' or "
                       "'all'.")


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method: its phases in order (the first starts at epoch 0) and its state hooks.

  Attributes:
    name: the registry name, written to results.json.
    phases: the phases, by increasing `first_epoch`; at least one `selects_best`.
    init_state: `(fresh state, StateContext) -> state` with the method's own `method_state`
      added (copies, not aliases, of any parameters it starts from: a donated state must not hold
      one buffer twice). Jittable: it runs under `vmap` over runs.
    begin_epoch: `(state, 0-based epoch, scheduled learning rate) -> state`, before every epoch:
      sets the rate of every optimiser the schedule drives (by default the classifier's, an
      `inject_hyperparams` optimiser) and any per-epoch schedule of the method, kept as arrays in
      `method_state` so that jitted steps read it (e.g. Co-teaching's forget rate).
    predict: `(state, normalised images) -> logits` of the model the method evaluates (by default
      the classifier; a method with a teacher may evaluate the teacher).
    export: `state -> {name: per-sample array}` of what the method learnt about its training
      samples beyond soft labels (sample weights, selections), written to `<name>.npy` files in
      each run's folder; None for nothing.
    label_issue_scores: for a method without soft labels, `state -> (N,)` scores in sample-id
      order, higher = the given label more likely wrong (a sample's loss weight turned around, how
      often it was left out); scored like soft labels against clean labels where known.
    models: where a method trains several models (Co-teaching's two networks, MLNT's student and
      teacher), `((name, predict), ...)`: each is evaluated every epoch and, per run, the one with
      the highest meta accuracy stands for the epoch (its name in the record's `model`). Empty:
      `predict` alone.
    num_epochs: the method's epochs in all, where they are not `config.num_epochs` (a method that
      trains twice: an estimator or feature network, then the classifier).
  """
  name: str
  phases: tuple[Phase, ...]
  init_state: Callable[[TrainState, int], TrainState] = _no_method_state
  begin_epoch: Callable[[TrainState, int, float], TrainState] = _classifier_learning_rate
  predict: Callable[[TrainState, jax.Array], jax.Array] = steps.predict
  export: Callable[[TrainState], dict[str, jax.Array]] | None = None
  label_issue_scores: Callable[[TrainState], jax.Array] | None = None
  models: tuple[tuple[str, Callable[[TrainState, jax.Array], jax.Array]], ...] = ()
  num_epochs: int | None = None

  def __post_init__(self):
    starts = [phase.first_epoch for phase in self.phases]
    if not starts or starts[0] != 0 or starts != sorted(set(starts)):
      raise ValueError(f"Method {self.name!r}: phases must start at epoch 0 and then at increasing "
                       f"epochs, got {starts}.")
    if self.num_epochs is not None and self.num_epochs <= starts[-1]:
      raise ValueError(f"Method {self.name!r}: {self.num_epochs} epochs leave its last phase none.")
    if not any(phase.selects_best for phase in self.phases):
      raise ValueError(f"Method {self.name!r}: no phase selects the best epoch (selects_best).")

  def total_epochs(self, config: ml_collections.ConfigDict) -> int:
    """The epochs a run of this method trains for."""
    return config.num_epochs if self.num_epochs is None else self.num_epochs

  def new_state(self, config: ml_collections.ConfigDict, image_shape: tuple[int, ...],
                num_classes: int, labels: jax.Array, clean_labels: jax.Array, key: jax.Array,
                new_classifier: Callable[[jax.Array], TrainState] | None = None) -> TrainState:
    """A fresh state of `config`'s classifier with this method's own state added (jittable unless
    `new_classifier`, the classifier's maker, is not: e.g. one that loads pretrained weights)."""
    if new_classifier is None:
      new_classifier = lambda k: state_from_config(config, image_shape, num_classes, k)
    context = StateContext(labels=jnp.asarray(labels, jnp.int32),
                           clean_labels=jnp.asarray(clean_labels, jnp.int32),
                           num_classes=num_classes, key=jax.random.fold_in(key, 0x6d657468),
                           new_classifier=new_classifier)
    return self.init_state(new_classifier(key), context)

  def phase_at(self, epoch: int) -> Phase:
    """The phase 0-based `epoch` belongs to."""
    return [phase for phase in self.phases if phase.first_epoch <= epoch][-1]
