"""Shared checks of a registered method's steps on a toy problem, for the per-method test files.

A learnable toy: 8×8 one-channel images whose class (of 3) is a bright row, plus noise; a batch is
the whole toy set, `index` = the sample ids. `toy_state` makes a method's fresh state as the
loop would (one run, not stacked); `run_phase` runs a phase's jitted step on one fixed batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import tiny_config
from mln_jax import methods

NUM_CLASSES = 3
IMAGE_SHAPE = (8, 8, 1)
# Two architectures every step must run on: a BatchNorm CNN and an MLP (no BatchNorm).
MODELS = {"conv_bn": {"model.name": "conv_bn", "model.blocks": ((4,),), "model.feature_dim": 8},
          "mlp": {"model.name": "mlp", "model.hidden": (16,)}}


def toy_batch(num: int = 32, seed: int = 0, noisy_fraction: float = 0.0) -> dict[str, jax.Array]:
  """`num` toy samples: `image` (normalised-like floats), `label` (a `noisy_fraction` of them
  flipped to the next class), `clean_label`, `index`."""
  rng = np.random.default_rng(seed)
  clean = np.arange(num) % NUM_CLASSES
  images = rng.normal(0, 0.3, (num,) + IMAGE_SHAPE).astype(np.float32)
  images[np.arange(num), 2 * clean + 1, :, 0] += 2.0
  labels = clean.copy()
  flipped = rng.random(num) < noisy_fraction
  labels[flipped] = (labels[flipped] + 1) % NUM_CLASSES
  return {"image": jnp.asarray(images), "label": jnp.asarray(labels, jnp.int32),
          "clean_label": jnp.asarray(clean, jnp.int32),
          "index": jnp.arange(num, dtype=jnp.int32)}


def as_float64(tree):
  """`tree` with its floating leaves in float64 (for finite-difference checks under
  `jax.enable_x64`)."""
  return jax.tree.map(
      lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def toy_batches(dtype=jnp.float32) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """A 16-sample training batch (30% of labels flipped) and a clean 12-sample meta batch, images in
  `dtype`."""
  batch, meta_batch = toy_batch(num=16, noisy_fraction=0.3), toy_batch(num=12, seed=1)
  cast = lambda b: {k: v.astype(dtype) if k == "image" else v for k, v in b.items()}
  return cast(batch), cast(meta_batch)


def toy_config(method: str, model: str = "conv_bn", **overrides):
  """tiny_config's settings for `method` on `model` (a key of MODELS), dotted `overrides` on top."""
  config = tiny_config.get_config()
  config.method = method
  config.optim.learning_rate = 0.05
  return tiny_config.with_overrides(config, **MODELS[model], **overrides)


def toy_state(method_name: str, model: str = "conv_bn", batch: dict | None = None, seed: int = 0,
              **overrides):
  """(method, fresh state, config) for the toy problem; the state's tables span the batch's
  samples (labels from `batch`, the default toy batch if None)."""
  batch = toy_batch() if batch is None else batch
  config = toy_config(method_name, model, **overrides)
  method = methods.get(config)
  state = method.new_state(config, IMAGE_SHAPE, NUM_CLASSES, batch["label"], batch["clean_label"],
                           jax.random.PRNGKey(seed))
  return method, state, config


def phase_named(method, name: str):
  return next(phase for phase in method.phases if phase.name == name)


def begin_phase(method, phase, state, batch: dict, epoch: int | None = None):
  """`state` as the loop hands it to `phase`'s first step: its start pass (over `batch`), `enter`
  and `begin_epoch` at the phase's first epoch (or `epoch`)."""
  epoch = phase.first_epoch if epoch is None else epoch
  if phase.start is not None:
    outputs = phase.start_pass(state, {"image": batch["image"], "index": batch["index"]})
    state = phase.start(state, outputs)
  state = phase.enter(state, True)
  learning_rate = phase.learning_rate(epoch) if phase.learning_rate else 0.05
  return method.begin_epoch(state, epoch, learning_rate)


def run_phase(phase, state, batch: dict, num_steps: int, meta_batch: dict | None = None):
  """`num_steps` jitted steps of `phase` on one fixed batch; returns the state and the per-step
  metrics (stacked)."""
  step = jax.jit(phase.step)
  train = {k: batch[k] for k in ("image", "label", "index")}
  history = []
  for _ in range(num_steps):
    if phase.uses_meta:
      state, metrics = step(state, train, meta_batch)
    else:
      state, metrics = step(state, train)
    history.append(metrics)
  return state, jax.tree.map(lambda *m: np.stack(m), *history)


def assert_lowers_own_loss(method_name: str, phase_name: str, num_steps: int = 25,
                           factor: float = 0.9, **overrides) -> None:
  """On both architectures, `num_steps` steps of the phase on a fixed toy batch lower the loss the
  step reports (first step vs the mean of the last three) by at least `factor`, and every metric
  stays finite."""
  batch = toy_batch(noisy_fraction=0.2)
  meta_batch = toy_batch(seed=1)
  for model in MODELS:
    method, state, _ = toy_state(method_name, model, batch=batch, **overrides)
    phase = phase_named(method, phase_name)
    state = begin_phase(method, phase, state, batch)
    _, metrics = run_phase(phase, state, batch, num_steps, meta_batch)
    for name, values in metrics.items():
      assert np.all(np.isfinite(values)), (method_name, model, name, values)
    losses = metrics["loss"]
    assert losses[-3:].mean() < factor * losses[0], (method_name, model, losses)
