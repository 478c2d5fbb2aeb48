"""Generalized cross-entropy (GCE; Zhang & Sabuncu, NeurIPS 2018): the negative Box-Cox loss
`L_q = (1 − p_ỹ^q)/q`, which interpolates between cross-entropy (q → 0) and the noise-robust mean
absolute error (q = 1).

Published algorithm = the MetaLabelNet reference (BASELINES.md §4): `L = mean_B[(1 − p_ỹ^q)/q]`,
q = 0.7 (`config.gce.q`; the paper's and the reference's value), on the shared protocol. No
variants. `p_ỹ^q` is computed as `exp(q·log_softmax(z)_ỹ)`, so its gradient stays finite where
`p_ỹ` underflows. The paper's truncated L_q (k = 0.5 with periodic pruning) is in neither the
reference nor here. Samples with label −1 (unlabelled) add nothing; a batch without labels has loss
0. Nothing departs from BASELINES.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from mln_jax import losses, steps
from mln_jax.methods.base import Method, Phase


def gce_loss(logits: jax.Array, labels: jax.Array, q: float = 0.7) -> jax.Array:
  """`mean[(1 − p_ỹ^q)/q]` over the labelled samples (label −1: unlabelled).

  Args:
    logits: (B, C) classifier logits.
    labels: (B,) int given labels, −1 for none.
    q: the exponent, in (0, 1].

  Returns:
    The scalar loss.
  """
  log_p = jax.nn.log_softmax(logits)
  log_p_label = jnp.take_along_axis(log_p, jnp.maximum(labels, 0)[:, None], axis=1)[:, 0]
  per_sample = (1.0 - jnp.exp(q * log_p_label)) / q
  return losses.mean_over_labelled(per_sample, labels)


def method(config: ml_collections.ConfigDict) -> Method:
  q = config.gce.q
  if not 0 < q <= 1:
    raise ValueError(f"config.gce.q={q} must lie in (0, 1].")
  loss_fn = lambda logits, labels: gce_loss(logits, labels, q)
  return Method("gce", (Phase("gce", 0, steps.supervised_step(loss_fn)),))
