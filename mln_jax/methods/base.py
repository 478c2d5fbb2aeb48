"""What a method is: phases with pure steps, and the hooks the loop calls (see
`mln_jax.methods`)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
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


def _no_method_state(state: TrainState, num_train: int) -> TrainState:
  del num_train
  return state


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
      samples (tracked per epoch where cheap, exported at the end), or None.
  """
  name: str
  first_epoch: int
  step: StepFn
  uses_meta: bool = False
  selects_best: bool = True
  trains_on: str = "labelled"
  enter: Callable[[TrainState, bool], TrainState] = _unchanged
  soft_labels: Callable[[TrainState, Batch], jax.Array] | None = None

  def __post_init__(self):
    if self.trains_on not in ("labelled", "all"):
      raise ValueError(f"Phase {self.name!r}: trains_on={self.trains_on!r} is not 'labelled' or "
                       "'all'.")


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method: its phases in order (the first starts at epoch 0) and its state hooks.

  Attributes:
    name: the registry name, written to results.json.
    phases: the phases, by increasing `first_epoch`; at least one `selects_best`.
    init_state: `(fresh state, number of training samples) -> state` with the method's own
      `method_state` added (copies, not aliases, of any parameters it starts from: a donated state
      must not hold one buffer twice).
    begin_epoch: `(state, 0-based epoch, scheduled learning rate) -> state`, before every epoch:
      sets the rate of every optimiser the schedule drives (by default the classifier's, an
      `inject_hyperparams` optimiser) and any per-epoch schedule of the method, kept as arrays in
      `method_state` so that jitted steps read it (e.g. Co-teaching's forget rate).
    predict: `(state, normalised images) -> logits` of the model the method evaluates (by default
      the classifier; a method with a teacher may evaluate the teacher).
    export: `state -> {name: per-sample array}` of what the method learnt about its training
      samples beyond soft labels (sample weights, selections), written to `<name>.npy` files in
      each run's folder; None for nothing.
  """
  name: str
  phases: tuple[Phase, ...]
  init_state: Callable[[TrainState, int], TrainState] = _no_method_state
  begin_epoch: Callable[[TrainState, int, float], TrainState] = _classifier_learning_rate
  predict: Callable[[TrainState, jax.Array], jax.Array] = steps.predict
  export: Callable[[TrainState], dict[str, jax.Array]] | None = None

  def __post_init__(self):
    starts = [phase.first_epoch for phase in self.phases]
    if not starts or starts[0] != 0 or starts != sorted(set(starts)):
      raise ValueError(f"Method {self.name!r}: phases must start at epoch 0 and then at increasing "
                       f"epochs, got {starts}.")
    if not any(phase.selects_best for phase in self.phases):
      raise ValueError(f"Method {self.name!r}: no phase selects the best epoch (selects_best).")

  def new_state(self, config: ml_collections.ConfigDict, image_shape: tuple[int, ...],
                num_classes: int, num_train: int, key: jax.Array) -> TrainState:
    """A fresh state of `config`'s classifier with this method's own state added."""
    return self.init_state(state_from_config(config, image_shape, num_classes, key), num_train)

  def phase_at(self, epoch: int) -> Phase:
    """The phase 0-based `epoch` belongs to."""
    return [phase for phase in self.phases if phase.first_epoch <= epoch][-1]
