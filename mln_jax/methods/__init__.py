"""Training methods as data: each is a list of phases, each phase a pure step and a few facts.

The loop (`mln_jax.loop`) knows no method by name. For the epoch it is in, it asks the method for
its phase and runs that phase's step over the batches the phase trains on, with meta batches if the
phase asks for them; it selects the best epoch by meta accuracy over the phases that say so, calls a
phase's `enter` when it starts (or resumes inside it), and tracks and exports the phase's
`soft_labels`.

Adding a method: write `mln_jax/methods/<name>.py` with a `method(config) -> Method` and add one
line to `REGISTRY` below; its settings go in their own group of `mln_jax/config.py`. The shapes of
the methods this fits:
- a loss-only method (SCE, GCE, Bootstrapping): one phase (or a cross-entropy warm-up first) whose
  step is `steps.supervised_step` with the method's loss of (logits, labels);
- extra networks or a teacher (Co-teaching's second network, MLNT's EMA teacher, Meta-Weight-Net's
  weighting network): kept in `TrainState.method_state`, made by the method's `init_state` (after
  any pretrained weights are loaded); their optimisers' rates and the method's own schedules (a
  forget rate) are set per epoch by its `begin_epoch`; `predict` says which model is evaluated;
- per-sample state (Joint Optimization's and PENCIL's label distributions, MSLG's soft labels): an
  (N, C) table in `method_state`, read and written at `batch["index"]` (every batch carries its
  samples' ids, so the table follows every shuffle); it is checkpointed with the state and stacked
  per run under `num_runs` like every other leaf; a phase's `soft_labels` may read it at
  `batch["index"]` (exported with the label-issue report like MetaLabelNet's), and the method's
  `export` writes any other per-sample array (sample weights, selections);
- bilevel methods: `steps.meta_gradient_autodiff` differentiates through the inner optax update
  (`steps.inner_update`, at a given or scheduled step size) of any loss of the classifier's logits,
  with respect to any meta parameters.
"""

from __future__ import annotations

from typing import Callable, Sequence

import ml_collections

from mln_jax.methods import (bootstrap, coteaching, cross_entropy, forward, gce,
                             joint_optimization, l2rw, metalabelnet, mlnt, mslg, mwnet, pencil, sce)
from mln_jax.methods.base import Method, Phase, StateContext

__all__ = ["GROUPS", "Method", "Phase", "REGISTRY", "StateContext", "VARIANTS", "get", "names",
           "resolve", "with_method"]

# The published methods, in the order of the paper's Table I (and L2RW), then the variants that
# reproduce the MetaLabelNet authors' code where it departs from the paper (BASELINES.md).
REGISTRY: dict[str, Callable[[ml_collections.ConfigDict], Method]] = {
    "cross_entropy": cross_entropy.method,
    "sce": sce.method,
    "gce": gce.method,
    "bootstrap": bootstrap.method,
    "forward": forward.method,
    "joint_optimization": joint_optimization.method,
    "pencil": pencil.method,
    "coteaching": coteaching.method,
    "mlnt": mlnt.method,
    "mwnet": mwnet.method,
    "l2rw": l2rw.method,
    "mslg": mslg.method,
    "metalabelnet": metalabelnet.method,
    "sce_reference": sce.reference_method,
    "forward_oracle": forward.oracle_method,
    "forward_reference": forward.reference_method,
    "joint_optimization_reference": joint_optimization.reference_method,
    "pencil_reference": pencil.reference_method,
    "coteaching_reference": coteaching.reference_method,
    "mlnt_reference": mlnt.reference_method,
    "mslg_reference": mslg.reference_method,
}
VARIANTS = ("sce_reference", "forward_oracle", "forward_reference",
            "joint_optimization_reference", "pencil_reference", "coteaching_reference",
            "mlnt_reference", "mslg_reference")
# Names that stand for several methods.
GROUPS: dict[str, tuple[str, ...]] = {
    "both": ("cross_entropy", "metalabelnet"),
    # The rows of the paper's Table I.
    "table1": tuple(name for name in REGISTRY if name not in VARIANTS + ("l2rw",)),
    "all": tuple(name for name in REGISTRY if name not in VARIANTS),  # the published methods
    "references": VARIANTS,
}


def names() -> tuple[str, ...]:
  return tuple(REGISTRY)


def resolve(spec: str | Sequence[str]) -> tuple[str, ...]:
  """The method names `config.method` stands for: one name, several (a comma-separated string or a
  sequence), 'both' or 'all'."""
  requested = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
  resolved: list[str] = []
  for name in requested:
    for method_name in GROUPS.get(name, (name,)):
      if method_name not in REGISTRY:
        raise ValueError(f"config.method={spec!r}: unknown method {method_name!r}; choose from "
                         f"{', '.join(REGISTRY)} (or a list of them, or a group: "
                         f"{', '.join(GROUPS)}).")
      if method_name not in resolved:
        resolved.append(method_name)
  if not resolved:
    raise ValueError(f"config.method={spec!r} names no method; choose from {', '.join(REGISTRY)}.")
  return tuple(resolved)


def with_method(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """A copy of `config` that trains the one method `name`."""
  config = config.copy_and_resolve_references()
  config.method = name
  return config


def get(config: ml_collections.ConfigDict) -> Method:
  """The one method `config.method` names, built from (and checked against) `config`."""
  resolved = resolve(config.method)
  if len(resolved) != 1 or (isinstance(config.method, str) and config.method in GROUPS):
    raise ValueError(f"config.method={config.method!r} names {len(resolved)} methods; one run "
                     "trains one (mln_jax.experiment.run trains several, one after another).")
  return REGISTRY[resolved[0]](config)
