"""`config.reference_batch_norm`: the authors' second BatchNorm update in fast-weight steps.

With it, a meta method's step moves the running statistics also toward its fast forwards' batch
statistics (SPEC, BASELINES "Reference-wide quirks"); nothing else of the step changes. The
PyTorch oracle (test_torch_oracle.py) checks MetaLabelNet's version against an independent
implementation; these tests check the update's exact form and that every meta method honours it.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import method_checks as mc
from mln_jax import losses, steps

MOMENTUM = 0.1  # layers.BatchNorm's
MLNT_FAST = {"mlnt.num_synthetic": 2, "mlnt.neighbours": 3, "mlnt.start_step": 0,
             "mlnt.ramp_end_step": 1}


def _meta_phase_state(name, reference_batch_norm, **overrides):
  """(method, its meta phase, the state that phase's first step gets) on the toy problem."""
  batch = mc.toy_batch(noisy_fraction=0.2)
  method, state, _ = mc.toy_state(name, batch=batch, reference_batch_norm=reference_batch_norm,
                                  **overrides)
  phase = method.phases[-1]
  state = mc.begin_phase(method, phase, state, batch)
  return phase, state, batch


def _max_difference(a, b):
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), a, b)))


def test_meta_step_adds_the_meta_batch_update_before_the_training_batch_one():
  # r_default = (1−m) r + m μ_train and r_reference = (1−m)((1−m) r + m μ_meta) + m μ_train, so
  # r_reference − r_default = (1−m)(s_meta − r) with s_meta = (1−m) r + m μ_meta, the statistics
  # the meta forward through θ' leaves.
  phase, state, batch = _meta_phase_state("metalabelnet", False)
  train = {k: batch[k] for k in ("image", "label", "index")}
  meta_batch = mc.toy_batch(seed=1)
  default, _ = jax.jit(steps.meta_step)(state, train, meta_batch)
  reference, _ = jax.jit(functools.partial(steps.meta_step, reference_batch_norm=True))(
      state, train, meta_batch)

  def meta_statistics(state):
    log_soft_labels = jax.nn.log_softmax(steps.soft_label_logits(state, state.mln_params,
                                                                 train["image"]))
    fast = steps.inner_update(state, train["image"],
                              lambda z: losses.soft_label_kl(z, log_soft_labels))
    return steps.meta_forward(state, fast, meta_batch)[1][1]

  s_meta = jax.jit(meta_statistics)(state)
  expected = jax.tree.map(lambda d, s, r: d + (1 - MOMENTUM) * (s - r), default.batch_stats,
                          s_meta, state.batch_stats)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               reference.batch_stats, expected)
  assert _max_difference(reference.batch_stats, default.batch_stats) > 1e-3
  for field in ("params", "opt_state", "mln_params", "mln_opt_state"):
    assert _max_difference(getattr(reference, field), getattr(default, field)) == 0.0, field


@pytest.mark.parametrize("name, overrides", [
    ("metalabelnet", {}), ("mslg", {}), ("mlnt", MLNT_FAST)])
def test_every_meta_method_honours_the_setting_in_the_statistics_only(name, overrides):
  meta_batch = mc.toy_batch(seed=1)
  after = {}
  for reference_batch_norm in (False, True):
    phase, state, batch = _meta_phase_state(name, reference_batch_norm, **overrides)
    after[reference_batch_norm], _ = mc.run_phase(phase, state, batch, 2, meta_batch)
  default, reference = after[False], after[True]
  assert _max_difference(reference.batch_stats, default.batch_stats) > 1e-3
  # The running statistics feed no training-mode forward: parameters are bit-identical.
  assert _max_difference(reference.params, default.params) == 0.0
  # ... while inference-mode predictions (running statistics) differ.
  images = mc.toy_batch(seed=2)["image"]
  assert not np.allclose(steps.predict(reference, images), steps.predict(default, images))


def test_the_setting_is_off_by_default_and_validated_as_a_bool():
  config = mc.toy_config("metalabelnet")
  assert config.reference_batch_norm is False
  with pytest.raises(TypeError):
    config.reference_batch_norm = "yes"
