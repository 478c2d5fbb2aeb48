"""mln_jax's steps against the PyTorch oracle's, timed in one process on the current CPU.

  python -m mln_jax.bench --vs_torch [--repeats=10] [--out=/tmp/vs_torch.json]

For each case (the paper's CNN at batch 128, the digits default's CNN at batch 32) the warm-up step
and the MetaLabelNet meta step (each meta gradient) of mln_jax and of `torch_oracle` (float32,
PyTorch's own threads and kernels) run from the same weights on the same random batches,
alternately, after untimed first calls; the medians and the ratios jax/torch are reported. Needs
torch.
"""

from __future__ import annotations

import datetime
import os
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mln_jax import config as config_lib, steps
from mln_jax.runtime import git_commit
from mln_jax.train_state import freeze_extractor, state_from_config

NUM_CLASSES = 10
# (name, model settings, image shape, batch size). "digits" is configs/digits.py's classifier
# (tests/test_bench_vs_torch.py keeps the two equal).
CASES = (
    ("cifar_cnn", {"name": "cifar_cnn"}, (32, 32, 3), 128),
    ("digits", {"name": "conv_bn", "blocks": ((32,), (64,)), "feature_dim": 64}, (8, 8, 1), 32),
)


def _case_config(model: dict[str, Any], batch_size: int, meta_gradient: str):
  config = config_lib.default_config()
  config.model.update(model)
  config.batch_size = batch_size
  config.mln.meta_gradient = meta_gradient
  return config


def _median_ms(times: Sequence[float]) -> float:
  return 1000 * statistics.median(times)


def _alternate(jax_call: Callable[[], None], torch_call: Callable[[], None], repeats: int,
               first_calls: int = 2) -> tuple[float, float]:
  """Median ms of `jax_call` and `torch_call`, timed alternately after `first_calls` untimed
  calls of each (JAX's first compiles)."""
  for _ in range(first_calls):
    jax_call()
    torch_call()
  jax_times, torch_times = [], []
  for _ in range(repeats):
    start = time.perf_counter()
    jax_call()
    jax_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    torch_call()
    torch_times.append(time.perf_counter() - start)
  return _median_ms(jax_times), _median_ms(torch_times)


def compare_case(name: str, model: dict[str, Any], image_shape: tuple[int, ...], batch_size: int,
                 repeats: int, meta_gradients: Sequence[str] = ("autodiff", "jvp")
                 ) -> list[dict[str, Any]]:
  """Rows `{case, step, batch_size, jax_ms, torch_ms, ratio}` for one case's warm-up step and
  meta step (per meta gradient)."""
  import torch
  from mln_jax import torch_oracle

  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch_size, *image_shape)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32)
  meta_images = rng.normal(size=(batch_size, *image_shape)).astype(np.float32)
  meta_labels = rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32)
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
  meta_batch = {"image": jnp.asarray(meta_images), "label": jnp.asarray(meta_labels)}
  torch_images, torch_labels = (torch_oracle.images_to_torch(images),
                                torch_oracle.labels_to_torch(labels))
  torch_meta_images = torch_oracle.images_to_torch(meta_images)
  torch_meta_labels = torch_oracle.labels_to_torch(meta_labels)

  rows = []
  for meta_gradient in meta_gradients:
    config = _case_config(model, batch_size, meta_gradient)
    state = freeze_extractor(state_from_config(config, image_shape, NUM_CLASSES,
                                               jax.random.PRNGKey(0)))
    oracle = torch_oracle.TorchMetaLabelNet.from_train_state(
        state, dtype=torch.float32, mln_learning_rate=config.mln.learning_rate,
        mln_weight_decay=config.mln.weight_decay,
        blocks=(torch_oracle.CIFAR_BLOCKS if config.model.name == "cifar_cnn"
                else tuple(tuple(b) for b in config.model.blocks)))
    holder = {"state": state}
    timed = [("meta", jax.jit(steps.meta_step, donate_argnums=0), (batch, meta_batch),
              lambda: oracle.meta_step(torch_images, torch_meta_images, torch_meta_labels))]
    if meta_gradient == meta_gradients[0]:  # the warm-up step reads no meta-gradient setting
      timed.insert(0, ("warm-up", jax.jit(steps.warmup_step, donate_argnums=0), (batch,),
                       lambda: oracle.warmup_step(torch_images, torch_labels)))
    for step_name, step, inputs, torch_call in timed:
      def jax_call(step=step, inputs=inputs):
        holder["state"], metrics = step(holder["state"], *inputs)
        jax.block_until_ready((holder["state"], metrics))
      jax_ms, torch_ms = _alternate(jax_call, torch_call, repeats)
      label = step_name if step_name == "warm-up" else f"meta/{meta_gradient}"
      rows.append({"case": name, "step": label, "batch_size": batch_size,
                   "jax_ms": jax_ms, "torch_ms": torch_ms, "ratio": jax_ms / torch_ms})
  return rows


def compare_with_torch(repeats: int = 10, meta_gradients: Sequence[str] = ("autodiff", "jvp"),
                       cases: Sequence[str] = ()) -> dict[str, Any]:
  """Every case of CASES (or those named in `cases`) compared; the report with its environment."""
  import torch
  report = {
      "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
      "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
      "jax_version": jax.__version__, "torch_version": torch.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "commit": git_commit(),
      "date": datetime.date.today().isoformat(), "repeats": repeats, "rows": [],
  }
  for name, model, image_shape, batch_size in CASES:
    if not cases or name in cases:
      report["rows"] += compare_case(name, model, image_shape, batch_size, repeats,
                                     meta_gradients)
  return report


def format_comparison(report: dict[str, Any]) -> str:
  lines = [f"{report['device']}, {report['cpu_count']} CPUs, torch {report['torch_version']} "
           f"({report['torch_threads']} threads), JAX {report['jax_version']}, commit "
           f"{report['commit']}, medians of {report['repeats']}",
           f"{'case':<12}{'step':<16}{'batch':>6}{'jax ms':>10}{'torch ms':>10}{'jax/torch':>11}"]
  for row in report["rows"]:
    lines.append(f"{row['case']:<12}{row['step']:<16}{row['batch_size']:>6}{row['jax_ms']:>10.1f}"
                 f"{row['torch_ms']:>10.1f}{row['ratio']:>11.2f}")
  return "\n".join(lines)
