"""Symmetric cross-entropy (SCE; Wang et al., ICCV 2019): cross-entropy plus a noise-robust
*reverse* cross-entropy, in which the prediction is the target and the (one-hot) label sits inside
the log.

Published algorithm (`sce`, BASELINES.md §3): `L = a·mean_B[−log clip(p_ỹ, 1e-7, 1)]
+ b·mean_B[−Σ_c p_c log clip(e_ỹ, A, 1)_c]`; the reverse term is `−log(A)·mean_B[1 − p_ỹ]`. The
paper writes the log of zero as a constant −4; the SCE authors' code clips the one-hot label at
A = 1e-4, the default here (`config.sce.label_clip`). Defaults a = 0.1, b = 1.0
(`config.sce.alpha`, `config.sce.beta`): the paper's CIFAR-10 values, also the MetaLabelNet
reference's.

Reference deviation (`sce_reference`): both logs of the MetaLabelNet authors' code are
`log_softmax` applied to *probabilities*: the CE part is `lse(p̂) − p̂_ỹ` with
`p̂ = clip(p, 1e-7, 1)` (bounded, weak gradient) and the reverse part `lse(q) − Σ_c p_c q_c` with
`q = clip(e_ỹ, A, 1)`, about 9.2× weaker than the published term.

Samples with label −1 (unlabelled) add nothing; a batch without labels has loss 0. One phase, the
shared protocol (as cross-entropy). Nothing departs from BASELINES.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from mln_jax import losses, steps
from mln_jax.methods.base import Method, Phase

# The lower clip of the predicted probability in the CE part (the SCE authors' and the reference's).
PROBABILITY_CLIP = 1e-7


def _clipped_one_hot(labels: jax.Array, num_classes: int, label_clip: float) -> jax.Array:
  # Unlabelled rows (−1) get an arbitrary class here; their loss is masked out afterwards.
  return jnp.clip(jax.nn.one_hot(jnp.maximum(labels, 0), num_classes), label_clip, 1.0)


def sce_loss(logits: jax.Array, labels: jax.Array, alpha: float = 0.1, beta: float = 1.0,
             label_clip: float = 1e-4) -> jax.Array:
  """The published SCE loss, averaged over the labelled samples (label −1: unlabelled).

  `alpha·(−log clip(p_ỹ, 1e-7, 1)) + beta·(−Σ_c p_c log clip(e_ỹ, label_clip, 1)_c)` per sample.

  Args:
    logits: (B, C) classifier logits.
    labels: (B,) int given labels, −1 for none.
    alpha: weight of the cross-entropy term.
    beta: weight of the reverse cross-entropy term.
    label_clip: the one-hot label's lower clip (log 0 reads as log(label_clip)).

  Returns:
    The scalar loss.
  """
  log_p = jax.nn.log_softmax(logits)
  log_p_label = jnp.take_along_axis(log_p, jnp.maximum(labels, 0)[:, None], axis=1)[:, 0]
  # Clipping log p equals clipping p (log is monotone) without log(softmax) underflowing to −inf.
  ce = -jnp.clip(log_p_label, jnp.log(PROBABILITY_CLIP), 0.0)
  label = _clipped_one_hot(labels, logits.shape[-1], label_clip)
  reverse_ce = -(jnp.exp(log_p) * jnp.log(label)).sum(-1)
  return losses.mean_over_labelled(alpha * ce + beta * reverse_ce, labels)


def sce_reference_loss(logits: jax.Array, labels: jax.Array, alpha: float = 0.1,
                       beta: float = 1.0, label_clip: float = 1e-4) -> jax.Array:
  """The MetaLabelNet reference's SCE: log_softmax applied to probabilities in both terms.

  Per sample `alpha·(lse(p̂) − p̂_ỹ) + beta·(lse(q) − Σ_c p_c q_c)`, `p̂ = clip(p, 1e-7, 1)`,
  `q = clip(e_ỹ, label_clip, 1)`; averaged over the labelled samples (label −1: unlabelled).
  """
  p = jax.nn.softmax(logits)
  p_hat = jnp.clip(p, PROBABILITY_CLIP, 1.0)
  label_index = jnp.maximum(labels, 0)[:, None]
  ce = -jnp.take_along_axis(jax.nn.log_softmax(p_hat), label_index, axis=1)[:, 0]
  q = _clipped_one_hot(labels, logits.shape[-1], label_clip)
  reverse_ce = -(p * jax.nn.log_softmax(q)).sum(-1)
  return losses.mean_over_labelled(alpha * ce + beta * reverse_ce, labels)


def _build(name: str, loss, config: ml_collections.ConfigDict) -> Method:
  settings = config.sce
  if settings.label_clip <= 0 or settings.label_clip >= 1:
    raise ValueError(f"config.sce.label_clip={settings.label_clip} must lie in (0, 1).")
  loss_fn = lambda logits, labels: loss(logits, labels, settings.alpha, settings.beta,
                                        settings.label_clip)
  return Method(name, (Phase(name, 0, steps.supervised_step(loss_fn)),))


def method(config: ml_collections.ConfigDict) -> Method:
  """SCE as published."""
  return _build("sce", sce_loss, config)


def reference_method(config: ml_collections.ConfigDict) -> Method:
  """SCE as the MetaLabelNet reference computes it."""
  return _build("sce_reference", sce_reference_loss, config)
