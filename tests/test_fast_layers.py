"""The CNNs' layers written for XLA:CPU's speed: `layers.conv_same` / `layers.Conv` (a kernel
gradient of matmuls) and `layers.max_pool` (a gradient without select-and-scatter).

Values and derivatives of every order must be those of nn.Conv / nn.max_pool (to float64 rounding;
the pool's bit for bit, ties included), and the parameters the same tree with the same initial
values, so that checkpoints and the PyTorch oracle are unaffected."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mln_jax import layers, models


def _reference_conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _inputs(dtype=jnp.float64, kernel_size=3):
  kx, kk, kt = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (3, 6, 5, 4), dtype)
  kernel = jax.random.normal(kk, (kernel_size, kernel_size, 4, 7), dtype)
  target = jax.random.normal(kt, (3, 6, 5, 7), dtype)
  return x, kernel, target


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("kernel_size", [1, 2, 3])
def test_values_and_derivatives_of_every_order_are_the_convolution_s(kernel_size):
  with jax.enable_x64(True):
    x, kernel, target = _inputs(kernel_size=kernel_size)
    loss = lambda conv: lambda x, k: jnp.sum(jnp.tanh(conv(x, k)) * target)
    ours, reference = loss(layers.conv_same), loss(_reference_conv)
    assert _rel(layers.conv_same(x, kernel), _reference_conv(x, kernel)) == 0.0
    for a, b in zip(jax.grad(ours, (0, 1))(x, kernel), jax.grad(reference, (0, 1))(x, kernel)):
      assert _rel(a, b) < 1e-12
    # Second order, as in the meta gradient: the gradient of a function of the kernel gradient.
    second = lambda f: jax.grad(lambda x, k: jnp.sum(jnp.sin(jax.grad(f, 1)(x, k))), (0, 1))
    for a, b in zip(second(ours)(x, kernel), second(reference)(x, kernel)):
      assert _rel(a, b) < 1e-12
    # Forward mode (the closed-form meta gradient's JVP), in both arguments at once.
    tangents = (jnp.cos(x), jnp.sin(kernel))
    assert _rel(jax.jvp(ours, (x, kernel), tangents)[1],
                jax.jvp(reference, (x, kernel), tangents)[1]) < 1e-12
    # Batched over runs, as the loop's vmap over concurrent runs does.
    stacked = jax.vmap(jax.grad(ours, 1))(jnp.stack([x, 2 * x]), jnp.stack([kernel, -kernel]))
    expected = jax.vmap(jax.grad(reference, 1))(jnp.stack([x, 2 * x]),
                                                jnp.stack([kernel, -kernel]))
    assert _rel(stacked, expected) < 1e-12


def test_on_cpu_the_kernel_gradient_has_no_convolution():
  # The speed property (experiments/results/cpu_vs_torch.md): XLA:CPU's kernel-gradient
  # convolution is what made the steps slow, so the compiled kernel gradient must not contain one.
  x, kernel, target = _inputs(jnp.float32)
  kernel_gradient = lambda conv: jax.jit(jax.grad(
      lambda k, x, t: jnp.sum(conv(x, k) * t))).lower(kernel, x, target).compile().as_text()
  assert " convolution(" in kernel_gradient(_reference_conv)
  assert " convolution(" not in kernel_gradient(layers.conv_same)


def test_module_has_nn_conv_s_parameters_initial_values_and_outputs():
  kwargs = dict(kernel_init=layers.kaiming_normal_fan_out, bias_init=layers.torch_bias_init(36))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 4))
  ours = layers.Conv(5, (3, 3), **kwargs)
  reference = nn.Conv(5, (3, 3), padding=1, **kwargs)
  variables = ours.init(jax.random.PRNGKey(2), x)
  reference_variables = reference.init(jax.random.PRNGKey(2), x)
  assert jax.tree.structure(variables) == jax.tree.structure(reference_variables)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(reference_variables)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x), rtol=1e-5,
                             atol=1e-5)
  # The compute dtype applies as in nn.Conv: bfloat16 outputs, float32 parameters.
  bf16 = layers.Conv(5, (3, 3), dtype=jnp.bfloat16, **kwargs)
  assert bf16.apply(variables, x).dtype == jnp.bfloat16


def test_the_paper_s_cnn_keeps_its_parameter_names():
  variables = models.CifarCNN(num_classes=10).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                                   train=False)
  assert [k for k in variables["params"] if k.startswith("Conv")] == [
      f"Conv_{i}" for i in range(6)]


@pytest.mark.parametrize("shape", [(4, 8, 8, 3), (2, 7, 9, 5)])
def test_max_pool_equals_nn_max_pool_bit_for_bit_ties_included(shape):
  # Rounded values: many windows hold their maximum twice; the first (row-major) gets the gradient.
  x = jnp.round(2 * jax.random.normal(jax.random.PRNGKey(0), shape)) / 2
  target = jax.random.normal(jax.random.PRNGKey(1), (shape[0], shape[1] // 2, shape[2] // 2,
                                                     shape[3]))
  reference = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  ours = lambda x: layers.max_pool(x, 2)
  np.testing.assert_array_equal(ours(x), reference(x))
  gradient = lambda pool: jax.grad(lambda x: jnp.sum(pool(x) * target))(x)
  np.testing.assert_array_equal(gradient(ours), gradient(reference))
  assert np.sum(np.asarray(gradient(ours)) != 0) == target.size  # one winner per window
  tangent = jnp.cos(x)
  np.testing.assert_array_equal(jax.jvp(ours, (x,), (tangent,))[1],
                                jax.jvp(reference, (x,), (tangent,))[1])
  np.testing.assert_array_equal(jax.vmap(ours)(jnp.stack([x, -x])),
                                jax.vmap(reference)(jnp.stack([x, -x])))


def test_on_cpu_the_pool_gradient_has_no_select_and_scatter():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  target = jnp.ones((2, 4, 4, 3))
  hlo = lambda pool: jax.jit(jax.grad(lambda x, t: jnp.sum(pool(x) * t))).lower(
      x, target).as_text()
  assert "select_and_scatter" in hlo(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)))
  assert "select_and_scatter" not in hlo(lambda x: layers.max_pool(x, 2))
