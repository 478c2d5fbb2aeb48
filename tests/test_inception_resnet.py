"""Inception-ResNet-v2: size and grid shapes of the full network (traced only), its minimum input,
and the MetaLabelNet steps on a small variant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mln_jax import steps
from mln_jax.inception_resnet import MIN_INPUT_SIZE, InceptionResNetV2
from mln_jax.train_state import create_train_state, freeze_extractor

# One block of each kind at an eighth of the width: the full topology at a fraction of the compile
# time.
SMALL = dict(num_block35=1, num_block17=1, num_block8=1, width_multiplier=0.125)


def _variable_shapes(model, side):
  # eval_shape: shapes and dtypes without initialising (or compiling) 56M parameters.
  images = jnp.zeros((1, side, side, 3))
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))


def _outputs_and_grids(model, variables, side):
  """Shapes of (logits, features) and of each top-level stage's output (mixed_5b, conv2d_7b,
  ...)."""
  images = jax.ShapeDtypeStruct((2, side, side, 3), jnp.float32)
  top_level = lambda module, method: method == "__call__" and len(module.scope.path) == 1
  outputs, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, capture_intermediates=top_level,
                               mutable=["intermediates"]), variables, images)
  grids = {name: value["__call__"][0] for name, value in state["intermediates"].items()}
  return outputs, grids


def _count(tree):
  return sum(leaf.size for leaf in jax.tree.leaves(tree))


def test_full_model_parameter_count():
  # 55,843,464 is the count timm reports for `inception_resnet_v2` (1000 classes, BatchNorm scale
  # and bias included). Cross-checked with a throwaway PyTorch re-implementation of the same layout,
  # whose outputs matched this module's (weights copied over) to 1e-5 at 299x299, train and eval
  # mode.
  variables = _variable_shapes(InceptionResNetV2(num_classes=1000), 299)
  assert _count(variables["params"]) == 55_843_464
  assert _count(variables["batch_stats"]) == 60_544  # mean and var of 30,272 BatchNorm channels
  # The paper's WebVision head: 50 classes, 950 x (1536 + 1) fewer classifier weights.
  variables = _variable_shapes(InceptionResNetV2(num_classes=50), 299)
  assert _count(variables["params"]) == 55_843_464 - 950 * 1537 == 54_383_314
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_full_model_grids_and_outputs_at_299(dtype):
  model = InceptionResNetV2(num_classes=50, dtype=dtype)
  variables = _variable_shapes(model, 299)
  (logits, features), grids = _outputs_and_grids(model, variables, 299)
  expected = {"conv2d_1a": (149, 149, 32), "conv2d_2a": (147, 147, 32), "conv2d_2b": (147, 147, 64),
              "conv2d_3b": (73, 73, 80), "conv2d_4a": (71, 71, 192), "mixed_5b": (35, 35, 320),
              "block35_9": (35, 35, 320), "mixed_6a": (17, 17, 1088), "block17_19": (17, 17, 1088),
              "mixed_7a": (8, 8, 2080), "block8_9": (8, 8, 2080), "conv2d_7b": (8, 8, 1536)}
  for name, shape in expected.items():
    assert grids[name].shape == (2, *shape), name
  assert len([name for name in grids if name.startswith("block")]) == 10 + 20 + 10
  assert grids["conv2d_7b"].dtype == dtype  # compute dtype inside; float32 parameters (above)
  assert logits.shape == (2, 50) and features.shape == (2, 1536)
  assert logits.dtype == features.dtype == jnp.float32


def test_minimum_input_size():
  model = InceptionResNetV2(num_classes=5, **SMALL)
  variables = _variable_shapes(model, MIN_INPUT_SIZE)
  (logits, features), grids = _outputs_and_grids(model, variables, MIN_INPUT_SIZE)
  assert MIN_INPUT_SIZE == 75
  assert grids["mixed_7a"].shape[1:3] == (1, 1)  # the last reduction takes a 3x3 grid to 1x1
  assert logits.shape == (2, 5) and features.shape == (2, 192)  # 1536 x 0.125
  for shape in [(2, 74, 74, 3), (2, 75, 74, 3), (2, 74, 299, 3)]:
    with pytest.raises(ValueError, match="at least 75x75 pixels"):
      jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False))


@pytest.mark.slow
def test_warmup_and_meta_step_on_small_variant():
  model = InceptionResNetV2(num_classes=5, **SMALL)
  # An 'rbg' key and a jitted create_train_state: XLA:CPU compiles one normal sampler per kernel
  # shape, ~20 s with threefry keys against ~5 s with 'rbg' on 2 cores. The steps themselves are
  # unchanged.
  rng = jax.random.key(0, impl="rbg")
  state = jax.jit(create_train_state, static_argnums=(1, 2, 3))(
      rng, model, (MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3), 5)
  # Kaiming-normal convolutions (fan_out = 1536 x 0.125 for this 1x1 conv), PyTorch-default
  # classifier.
  kernel = state.params["conv2d_7b"]["conv"]["kernel"]
  assert float(jnp.std(kernel)) == pytest.approx(np.sqrt(2.0 / 192), rel=0.05)
  assert float(jnp.abs(state.params["classifier"]["kernel"]).max()) <= 1 / np.sqrt(192)

  def batch(seed):
    key_x, key_y = jax.random.split(jax.random.PRNGKey(seed))
    return {"image": jax.random.normal(key_x, (4, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3)),
            "label": jax.random.randint(key_y, (4,), 0, 5)}

  changed = lambda a, b: any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a),
                                                                   jax.tree.leaves(b)))
  warmed, metrics = jax.jit(steps.warmup_step)(state, batch(1))
  assert np.isfinite(metrics["loss"])
  assert changed(warmed.params, state.params) and changed(warmed.batch_stats, state.batch_stats)

  state = freeze_extractor(warmed)
  new_state, metrics = jax.jit(steps.meta_step)(state, batch(2), batch(3))
  for name, value in metrics.items():
    assert np.isfinite(value), name
  assert changed(new_state.params, state.params)
  assert changed(new_state.mln_params, state.mln_params)
  assert not changed(new_state.extractor_params, state.extractor_params)
