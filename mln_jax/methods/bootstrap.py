"""Soft bootstrapping (Reed et al., ICLR 2015 workshop): the target mixes the given label with the
model's own prediction, so that a confident prediction can outvote a wrong label.

Published algorithm = the MetaLabelNet reference (BASELINES.md §5):
`L = mean_B[−Σ_c (β e_ỹ + (1−β) p)_c log p_c]`, the gradient flowing through the prediction inside
the target too (the paper's equivalence: β·CE + (1−β)·entropy of p). β = 0.95
(`config.bootstrap.beta`): the paper's soft value and the reference's. Hard bootstrapping (the
argmax in place of p, β = 0.8) is not shipped. Samples with label −1 (unlabelled) add nothing; a
batch without labels has loss 0. One phase on the shared protocol; nothing departs from
BASELINES.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from mln_jax import losses, steps
from mln_jax.methods.base import Method, Phase


def soft_bootstrap_loss(logits: jax.Array, labels: jax.Array, beta: float = 0.95) -> jax.Array:
  """`mean[−Σ_c (β e_ỹ + (1−β) p)_c log p_c]` over the labelled samples (label −1: unlabelled),
  differentiated through p in the target as well.

  Args:
    logits: (B, C) classifier logits.
    labels: (B,) int given labels, −1 for none.
    beta: the label's share of the target.

  Returns:
    The scalar loss.
  """
  log_p = jax.nn.log_softmax(logits)
  label = jax.nn.one_hot(jnp.maximum(labels, 0), logits.shape[-1])
  target = beta * label + (1.0 - beta) * jnp.exp(log_p)  # no stop-gradient: as published
  per_sample = -(target * log_p).sum(-1)
  return losses.mean_over_labelled(per_sample, labels)


def method(config: ml_collections.ConfigDict) -> Method:
  beta = config.bootstrap.beta
  if not 0 <= beta <= 1:
    raise ValueError(f"config.bootstrap.beta={beta} must lie in [0, 1].")
  loss_fn = lambda logits, labels: soft_bootstrap_loss(logits, labels, beta)
  return Method("bootstrap", (Phase("bootstrap", 0, steps.supervised_step(loss_fn)),))
