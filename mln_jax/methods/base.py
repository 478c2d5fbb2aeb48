"""What a method is: phases with pure steps, and the hooks the loop calls (see
`mln_jax.methods`)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from mln_jax.train_state import TrainState, set_learning_rate

Batch = dict[str, jax.Array]
# (state, batch) -> (state, metrics), or (state, batch, meta_batch) -> ... where `uses_meta`.
StepFn = Callable[..., tuple[TrainState, dict[str, jax.Array]]]


def _unchanged(state: TrainState, begins: bool) -> TrainState:
  del begins
  return state


def _classifier_learning_rate(state: TrainState, learning_rate: float) -> TrainState:
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
    phases: the phases, by increasing `first_epoch`.
    init_state: `(fresh state, number of training samples) -> state` with the method's own
      `method_state` added.
    set_learning_rate: `(state, rate) -> state` for the epoch's scheduled rate (every optimiser the
      schedule drives; by default the classifier's).
  """
  name: str
  phases: tuple[Phase, ...]
  init_state: Callable[[TrainState, int], TrainState] = _no_method_state
  set_learning_rate: Callable[[TrainState, float], TrainState] = _classifier_learning_rate

  def __post_init__(self):
    starts = [phase.first_epoch for phase in self.phases]
    if not starts or starts[0] != 0 or starts != sorted(set(starts)):
      raise ValueError(f"Method {self.name!r}: phases must start at epoch 0 and then at increasing "
                       f"epochs, got {starts}.")

  def phase_at(self, epoch: int) -> Phase:
    """The phase 0-based `epoch` belongs to."""
    return [phase for phase in self.phases if phase.first_epoch <= epoch][-1]
