"""Models: the paper's CNN's shapes and size, PyTorch-faithful BatchNorm, MetaLabelNet."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mln_jax import layers, models


def test_cifar_cnn_shapes_and_parameter_count():
  model = models.CifarCNN(num_classes=10)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)), train=False)
  logits, features = model.apply(variables, jnp.ones((3, 32, 32, 3)), train=False)
  assert logits.shape == (3, 10) and features.shape == (3, 256)
  assert bool(jnp.all(features >= 0))  # features are post-ReLU
  # Same count as the reference PyTorch model (convs with biases, 7 BatchNorms, FC 3136->256->10).
  assert sum(p.size for p in jax.tree.leaves(variables["params"])) == 1_639_794
  kernel = variables["params"]["Conv_1"]["kernel"]  # 3x3x64 -> 64, Kaiming normal with fan_out
  assert float(jnp.std(kernel)) == pytest.approx(np.sqrt(2.0 / (9 * 64)), rel=0.05)


def test_batch_norm_matches_pytorch_semantics():
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 3, 3, 4)) * 3.0 + 1.5
  bn = layers.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.PRNGKey(0), x)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(4))
  y, updated = bn.apply(variables, x, mutable=["batch_stats"])
  flat = np.asarray(x).reshape(-1, 4)
  expected = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)  # biased variance in the output
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 4), expected, rtol=1e-4, atol=1e-5)
  stats = updated["batch_stats"]
  np.testing.assert_allclose(stats["mean"], 0.1 * flat.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)  # unbiased
  # Inference mode uses the running statistics.
  y_eval = layers.BatchNorm(use_running_average=True).apply(
      {"params": variables["params"], "batch_stats": stats}, x)
  np.testing.assert_allclose(y_eval, (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5), rtol=1e-5)


def test_metalabelnet_is_one_linear_layer():
  mln = models.MetaLabelNet(num_classes=10)
  params = mln.init(jax.random.PRNGKey(0), jnp.zeros((1, 256)))["params"]
  assert jax.tree.map(jnp.shape, params) == {"Dense_0": {"kernel": (256, 10), "bias": (10,)}}
  assert float(jnp.abs(params["Dense_0"]["kernel"]).max()) <= 1 / 16  # PyTorch's U(±1/sqrt(256))


def test_unknown_model_name_is_rejected():
  with pytest.raises(ValueError, match="Unknown model 'vgg16': choose one of .*'resnet50'"):
    models.create_model("vgg16", 10)
