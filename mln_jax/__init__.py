"""MetaLabelNet in JAX/Flax: learning soft labels from noisy labels by meta-learning.

Library entry points:
  create_train_state, TrainState, freeze_extractor      -- the pure train state
  warmup_step, meta_step, predict, predict_soft_labels  -- jittable pure steps
  experiment.run / experiment.train_and_evaluate        -- methods x seeds on the one training loop
  methods.REGISTRY                                      -- the methods, each a list of phases
  trained.load_trained_state / trained.soft_labels_for  -- finished runs as a library
"""

from mln_jax.steps import meta_step, predict, predict_soft_labels, warmup_step
from mln_jax.train_state import TrainState, create_train_state, freeze_extractor

__all__ = ["TrainState", "create_train_state", "freeze_extractor", "meta_step", "predict",
           "predict_soft_labels", "warmup_step"]
