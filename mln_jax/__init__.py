"""MetaLabelNet in JAX/Flax: learning soft labels from noisy labels by meta-learning.

Library entry points:
  create_train_state, TrainState, freeze_extractor  -- the pure train state
  warmup_step, meta_step, predict, predict_soft_labels  -- jittable pure steps
  train.run / train.train_and_evaluate                  -- the two-phase loop with checkpoints
"""

from mln_jax.steps import meta_step, predict, predict_soft_labels, warmup_step
from mln_jax.train_state import TrainState, create_train_state, freeze_extractor

__all__ = ["TrainState", "create_train_state", "freeze_extractor", "meta_step", "predict",
           "predict_soft_labels", "warmup_step"]
