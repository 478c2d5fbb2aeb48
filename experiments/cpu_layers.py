"""Where a CNN step's time goes on this CPU: each convolution and pooling of the paper's CNN at
batch 128, timed alone, XLA's own form against mln_jax's layers (and PyTorch's, where installed).

  python experiments/cpu_layers.py [--repeats=3] [--out=/tmp/cpu_layers.json]

Per 3×3 convolution shape: the forward convolution, the input gradient and the kernel gradient,
by `lax.conv_general_dilated` (XLA) and by `layers.conv_same` (the kernel gradient as matmuls),
plus two other forms of the kernel gradient (one im2col matmul, all-matmul convolutions); per
pooling shape the max-pool gradient of `nn.max_pool` and of `layers.max_pool`; PyTorch's forward
and forward+backward of the same convolution. Best of `--repeats` after a first call, in ms.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mln_jax import layers

BATCH = 128
# (height = width, input channels, output channels) of the paper's CNN's convolutions.
CONVOLUTIONS = ((32, 3, 64), (32, 64, 64), (16, 64, 128), (16, 128, 128), (8, 128, 196),
                (8, 196, 196))
POOLS = ((32, 64), (16, 128), (8, 196))


def best_ms(fn: Callable[..., Any], *args: Any, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return round(1000 * min(times), 1)


def _im2col(x: jax.Array) -> jax.Array:
  """The 3×3 'SAME' patches of x as rows (B·H·W, 9·C)."""
  batch, height, width, channels = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.concatenate([padded[:, i:i + height, j:j + width, :].reshape(-1, channels)
                          for i in range(3) for j in range(3)], -1)


def convolution_row(size: int, cin: int, cout: int, repeats: int) -> dict[str, Any]:
  kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (BATCH, size, size, cin))
  kernel = jax.random.normal(kk, (3, 3, cin, cout))
  g = jax.random.normal(kg, (BATCH, size, size, cout))
  input_grad = lambda conv: jax.jit(lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g)[0])
  kernel_grad = lambda conv: jax.jit(lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0])
  im2col_kernel_grad = jax.jit(lambda x, g: _im2col(x).T @ g.reshape(-1, g.shape[-1]))
  row = {
      "shape": f"{size}x{size}x{cin}->{cout}",
      "forward_xla": best_ms(jax.jit(layers.lax_conv_same), x, kernel, repeats=repeats),
      "forward_as_matmuls": best_ms(jax.jit(layers.conv_as_matmuls), x, kernel,
                                    repeats=repeats),
      "input_grad_xla": best_ms(input_grad(layers.lax_conv_same), x, kernel, g, repeats=repeats),
      "kernel_grad_xla": best_ms(kernel_grad(layers.lax_conv_same), x, kernel, g, repeats=repeats),
      "kernel_grad_conv_same": best_ms(kernel_grad(layers.conv_same), x, kernel, g,
                                       repeats=repeats),
      "kernel_grad_im2col": best_ms(im2col_kernel_grad, x, g, repeats=repeats),
  }
  try:
    import torch
    import torch.nn.functional as F
  except ImportError:
    return row
  tx = torch.randn(BATCH, cin, size, size)
  tw = torch.randn(cout, cin, 3, 3)
  row["torch_forward"] = best_ms(lambda: F.conv2d(tx, tw, padding=1), repeats=repeats)
  tx.requires_grad_()
  tw.requires_grad_()

  def forward_backward():
    y = F.conv2d(tx, tw, padding=1)
    y.backward(torch.ones_like(y))
  row["torch_forward_backward"] = best_ms(forward_backward, repeats=repeats)
  return row


def pool_row(size: int, channels: int, repeats: int) -> dict[str, Any]:
  x = jax.random.normal(jax.random.PRNGKey(0), (BATCH, size, size, channels))
  t = jax.random.normal(jax.random.PRNGKey(1), (BATCH, size // 2, size // 2, channels))
  gradient = lambda pool: jax.jit(jax.grad(lambda x, t: jnp.sum(pool(x) * t)))
  return {"shape": f"{size}x{size}x{channels}",
          "grad_nn_max_pool": best_ms(gradient(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))),
                                      x, t, repeats=repeats),
          "grad_layers_max_pool": best_ms(gradient(lambda x: layers.max_pool(x, 2)), x, t,
                                          repeats=repeats)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  report = {"device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
            "jax_version": jax.__version__, "batch": BATCH,
            "convolutions": [convolution_row(*c, args.repeats) for c in CONVOLUTIONS],
            "pools": [pool_row(*p, args.repeats) for p in POOLS]}
  for section in ("convolutions", "pools"):
    for row in report[section]:
      print(json.dumps(row))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
