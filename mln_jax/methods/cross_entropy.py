"""Cross-entropy on the given (noisy) labels for every epoch: the baseline row of the paper's
tables."""

from __future__ import annotations

import ml_collections

from mln_jax import steps
from mln_jax.methods.base import Method, Phase


def method(config: ml_collections.ConfigDict) -> Method:
  del config  # no settings of its own
  return Method("cross_entropy", (Phase("cross-entropy", 0, steps.warmup_step),))
