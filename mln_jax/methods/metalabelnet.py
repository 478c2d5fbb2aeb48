"""MetaLabelNet (SPEC): a cross-entropy warm-up, then the extractor is frozen and phase 2 trains the
classifier on soft labels meta-learnt on the clean meta data (`steps.meta_step`)."""

from __future__ import annotations

import functools

import ml_collections

from mln_jax import steps
from mln_jax.methods.base import Method, Phase
from mln_jax.train_state import TrainState, freeze_extractor


def enter_phase2(state: TrainState, begins: bool) -> TrainState:
  """Where the warm-up has just ended, the classifier becomes the frozen extractor; a run resumed
  later in phase 2 restored its frozen extractor with the state, which is marked so."""
  if begins:
    return freeze_extractor(state)
  return state if state.extractor_frozen else state.replace(extractor_frozen=True)


def method(config: ml_collections.ConfigDict) -> Method:
  # The warm-up makes the extractor, and phase 2 needs at least one epoch.
  if not 0 < config.warmup_epochs < config.num_epochs:
    raise ValueError(f"config.warmup_epochs={config.warmup_epochs} must lie in [1, num_epochs - 1 "
                     f"= {config.num_epochs - 1}] for MetaLabelNet.")
  # The reference's double BatchNorm update is a static choice of the step (one compiled program).
  meta_step = (functools.partial(steps.meta_step, reference_batch_norm=True)
               if config.reference_batch_norm else steps.meta_step)
  return Method("metalabelnet", (
      # Model selection as in the reference: over the epochs of phase 2 only.
      Phase("warm-up", 0, steps.warmup_step, selects_best=False),
      Phase("metalabelnet", config.warmup_epochs, meta_step, uses_meta=True,
            trains_on="all", enter=enter_phase2,
            soft_labels=lambda state, batch: steps.predict_soft_labels(state, batch["image"]),
            soft_labels_from_images=True),
  ))
