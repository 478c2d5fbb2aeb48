"""The losses of MetaLabelNet (SPEC, phase 2), each averaged as the reference implementation
does."""

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean categorical cross-entropy of integer labels over the labelled samples.

  A label −1 marks an unlabelled sample: it adds nothing (optax alone would read it as the last
  class), and a batch without labels has loss 0.
  """
  labelled = labels >= 0
  per_sample = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
  return jnp.where(labelled, per_sample, 0.0).sum() / jnp.maximum(labelled.sum(), 1)


def soft_label_kl(logits: jax.Array, log_soft_labels: jax.Array) -> jax.Array:
  """L_c = 1/(B·C) · Σ_i Σ_c p_ic (log p_ic − log ŷ_ic): KL(p ‖ ŷ) averaged over all B·C entries."""
  log_p = jax.nn.log_softmax(logits)
  return jnp.mean(jnp.exp(log_p) * (log_p - log_soft_labels))


def entropy(logits: jax.Array) -> jax.Array:
  """L_e = −1/(B·C) · Σ_i Σ_c p_ic log p_ic: pushes predictions to peak at one class."""
  log_p = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.exp(log_p) * log_p)
