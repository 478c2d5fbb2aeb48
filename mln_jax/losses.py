"""The losses MetaLabelNet (SPEC, phase 2) and the methods share, each averaged as the reference
implementation does (a method's own losses live in its module)."""

import jax
import jax.numpy as jnp
import optax


def mean_over_labelled(per_sample: jax.Array, labels: jax.Array) -> jax.Array:
  """The mean of per-sample losses over the samples with a label (label >= 0).

  A label −1 marks an unlabelled sample: it adds nothing, and a batch without labels has loss 0
  (and a zero gradient).
  """
  labelled = labels >= 0
  return jnp.where(labelled, per_sample, 0.0).sum() / jnp.maximum(labelled.sum(), 1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean categorical cross-entropy of integer labels over the labelled samples (−1: unlabelled;
  optax alone would read it as the last class)."""
  per_sample = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
  return mean_over_labelled(per_sample, labels)


def soft_label_kl(logits: jax.Array, log_soft_labels: jax.Array) -> jax.Array:
  """L_c = 1/(B·C) · Σ_i Σ_c p_ic (log p_ic − log ŷ_ic): KL(p ‖ ŷ) averaged over all B·C entries."""
  log_p = jax.nn.log_softmax(logits)
  return jnp.mean(jnp.exp(log_p) * (log_p - log_soft_labels))


def entropy(logits: jax.Array) -> jax.Array:
  """L_e = −1/(B·C) · Σ_i Σ_c p_ic log p_ic: pushes predictions to peak at one class."""
  log_p = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.exp(log_p) * log_p)
