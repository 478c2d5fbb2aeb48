"""Benchmark on the current device: step throughput with device-resident data, compile time, peak
memory, and (with the CIFAR-10 pack) end-to-end epoch times including evaluation.

  python -m mln_jax.bench --out=/tmp/bench.json [--data_dir=../shared/data/cifar10]
  python -m mln_jax.bench --streamed_config=configs/clothing1m.py --out=/tmp/clothing1m.json

With `--streamed_config` (Clothing1M, WebVision, Food-101N), the warm-up and meta steps of that
config's model, image size, classes and batch size are timed on synthetic uint8 batches already on
the device (the input pipeline is not part of the figure), as the streamed loop calls them.

Every phase step of every registered method (`mln_jax.methods`) is timed, each step once.
Throughput is measured on whole epochs of the training loop (`in_memory.make_train_epoch`) over
synthetic CIFAR-shaped uint8 data already on the device, after a first (compiling) call; the
reported figure is the median of `--repeats` timed epochs. The project's speed targets (one H100,
batch 128) are printed beside the numbers; they are not asserted anywhere.
"""

from __future__ import annotations

import datetime
import statistics
import tempfile
import time
from typing import Any, Callable, Sequence

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mln_jax import config as config_lib, experiment, file_lists, in_memory, methods, steps
from mln_jax import bench_vs_torch, streamed
from mln_jax.methods import Method, Phase
from mln_jax.runtime import git_commit, make_mesh, replicate, write_json_atomically
from mln_jax.train_state import TrainState

TARGETS = {  # images/s or seconds, one H100, batch 128, float32
    "meta_step_images_per_s": 40_000,
    "warmup_step_images_per_s": 120_000,
    "full_protocol_wall_s": 120,
}

FLAGS = flags.FLAGS
flags.DEFINE_list("batch_sizes", ["128", "512"], "Batch sizes to measure.")
flags.DEFINE_integer("steps", 100, "Steps per timed epoch.")
flags.DEFINE_integer("repeats", 3, "Timed epochs per measurement (median reported).")
flags.DEFINE_list("meta_gradients", ["autodiff", "jvp"], "Meta-gradient methods to measure.")
flags.DEFINE_string("methods", "both", "config.method: the methods whose steps to time (names, a "
                    "list or a group of mln_jax.methods, e.g. 'all').")
flags.DEFINE_string("model", "cifar_cnn", "Model name (config.model.name).")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "config.compute_dtype.")
flags.DEFINE_string("data_dir", "", "CIFAR-10 pack: also time end-to-end epochs with evaluation.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")
flags.DEFINE_integer("concurrent_runs", 8, "Also measure this many runs in one program (0: skip).")
flags.DEFINE_bool("vs_torch", False, "Instead: time mln_jax's warm-up and meta steps against the "
                  "PyTorch oracle's in this process (mln_jax.bench_vs_torch; needs torch).")
config_flags.DEFINE_config_file(
    "streamed_config", None, "A streamed dataset's config (configs/clothing1m.py, webvision.py, "
    "food101n.py): time its steps on synthetic inputs of its shapes instead of CIFAR-10's "
    "(--batch_sizes, if given, replaces its batch size).", lock_config=True)


def _peak_memory_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _phase_state(config: ml_collections.ConfigDict, method: Method, phase: Phase,
                 image_shape: tuple[int, ...], num_classes: int, num_train: int, key: jax.Array
                 ) -> TrainState:
  """A fresh state as `phase` runs on it (entered: MetaLabelNet's extractor frozen)."""
  labels = jnp.arange(num_train, dtype=jnp.int32) % num_classes
  return phase.enter(method.new_state(config, image_shape, num_classes, labels, labels, key), True)


def measure_epoch(config: ml_collections.ConfigDict, method: Method, phase: Phase, num_steps: int,
                  repeats: int, num_runs: int | None = None) -> dict[str, float]:
  """Images/s of whole training epochs of `phase` over device-resident synthetic data; with
  `num_runs`, that many independent runs in one vmapped program (aggregate images/s)."""
  mesh = make_mesh()
  rng = np.random.default_rng(0)
  num = num_steps * config.batch_size
  put = lambda x: replicate(mesh, x)
  per_run = (lambda x: np.stack([x] * num_runs)) if num_runs else (lambda x: x)
  images = rng.integers(0, 256, (num, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, num).astype(np.int32)
  num_meta = max(config.batch_size, 1000)
  data = (put(images), put(per_run(labels)))
  if phase.uses_meta:
    data += (put(per_run(images[:num_meta])), put(per_run(labels[:num_meta])))
  indices = put(per_run(np.arange(num, dtype=np.int32)))
  make_state = lambda key: _phase_state(config, method, phase, (32, 32, 3), 10, num, key)
  keys = jax.random.split(jax.random.PRNGKey(0), num_runs or 1)
  state = put(jax.vmap(make_state)(keys) if num_runs else make_state(keys[0]))
  epoch = in_memory.make_train_epoch(config, mesh, phase, num_runs)
  epoch_key = lambda i: (jax.random.split(jax.random.PRNGKey(i), num_runs) if num_runs
                         else jax.random.PRNGKey(i))

  start = time.perf_counter()
  state, metrics = epoch(state, data, indices, epoch_key(1))
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  times = []
  for repeat in range(repeats):
    start = time.perf_counter()
    state, metrics = epoch(state, data, indices, epoch_key(2 + repeat))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  steady = statistics.median(times)
  return {"images_per_s": num * (num_runs or 1) / steady, "epoch_s": steady,
          "compile_and_first_epoch_overhead_s": max(first - steady, 0.0)}


def step_flops(config: ml_collections.ConfigDict, method: Method, phase: Phase,
               image_shape: tuple[int, ...] = (32, 32, 3), num_classes: int = 10,
               num_train: int | None = None) -> float | None:
  """FLOPs of one step of `phase` as XLA counts them for this device's compiled program (None if
  unknown), on images of `image_shape` (CIFAR-10's by default) and `num_train` training samples
  (a method's per-sample tables; default one batch)."""
  state = _phase_state(config, method, phase, image_shape, num_classes,
                       num_train or config.batch_size, jax.random.PRNGKey(0))
  batch = {"image": jax.ShapeDtypeStruct((config.batch_size, *image_shape), np.float32),
           "label": jax.ShapeDtypeStruct((config.batch_size,), np.int32),
           "index": jax.ShapeDtypeStruct((config.batch_size,), np.int32)}
  args = (state, batch, batch) if phase.uses_meta else (state, batch)
  analysis = jax.jit(phase.step).lower(*args).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return (analysis or {}).get("flops")


def measured_phases(config: ml_collections.ConfigDict, method_spec: str = "both"
                    ) -> list[tuple[Method, Phase]]:
  """The phases of the methods `method_spec` names (a name, a list or a group of the registry),
  each step once (MetaLabelNet's warm-up is cross-entropy's step): what the benchmark times."""
  seen, phases = set(), []
  for name in methods.resolve(method_spec):
    method = methods.get(methods.with_method(config, name))
    for phase in method.phases:
      if phase.step not in seen:
        seen.add(phase.step)
        phases.append((method, phase))
  return phases


def _cases(config: ml_collections.ConfigDict, meta_gradients: Sequence[str],
           method_spec: str = "both") -> list[tuple[str, ml_collections.ConfigDict, Method, Phase]]:
  """(row name, config, method, phase) per measurement; `steps.meta_step` (MetaLabelNet's phase 2)
  once per meta gradient (config.mln.meta_gradient, which only it reads)."""
  cases = []
  for method, phase in measured_phases(config, method_spec):
    is_meta_step = getattr(phase.step, "func", phase.step) is steps.meta_step
    for meta_gradient in (meta_gradients if is_meta_step else [None]):
      case_config = config.copy_and_resolve_references()
      name = f"{method.name}/{phase.name}"
      if meta_gradient:
        case_config.mln.meta_gradient = meta_gradient
        name += f"/{meta_gradient}"
      cases.append((name, case_config, method, phase))
  return cases


def _streamed_num_classes(config: ml_collections.ConfigDict) -> int:
  fixed = {"clothing1m": file_lists.CLOTHING1M_CLASSES, "food101n": file_lists.FOOD101_CLASSES}
  if config.data.name in fixed:
    return fixed[config.data.name]
  if config.data.num_classes <= 0:
    raise ValueError(f"Set --streamed_config.data.num_classes for {config.data.name}.")
  return config.data.num_classes


def measure_streamed_steps(config: ml_collections.ConfigDict, method: Method, phase: Phase,
                           num_steps: int, repeats: int) -> dict[str, Any]:
  """Images/s of the streamed loop's jitted step of `phase` (`streamed.make_train_step`) on
  synthetic uint8 batches of the config's shapes, sharded over the devices, with its compile time
  and XLA's FLOP count. A phase with meta batches takes them as the loop does by default: from a
  meta set in device memory (`data.meta_in_memory`)."""
  mesh = make_mesh()
  num_classes = _streamed_num_classes(config)
  size = config.data.image_size
  sharded = NamedSharding(mesh, P("data"))
  rng = np.random.default_rng(0)

  def batch(i):
    return jax.device_put(
        {"image": rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8),
         "label": rng.integers(0, num_classes, config.batch_size).astype(np.int32),
         "index": np.arange(i * config.batch_size, (i + 1) * config.batch_size, dtype=np.int32)},
        sharded)

  batches = [batch(i) for i in range(2)]  # used in turn
  num_meta = 4 * config.batch_size
  meta_images = replicate(mesh, rng.integers(0, 256, (num_meta, size, size, 3), np.uint8))
  meta_labels = replicate(mesh, rng.integers(0, num_classes, num_meta).astype(np.int32))
  meta_order = replicate(mesh, rng.integers(0, num_meta, (2, config.batch_size)).astype(np.int32))
  meta_flips = replicate(mesh, rng.random((2, config.batch_size)) < 0.5)
  state = replicate(mesh, _phase_state(config, method, phase, (size, size, 3), num_classes,
                                       2 * config.batch_size, jax.random.PRNGKey(0)))
  step_fn = streamed.make_train_step(phase, mesh, meta_in_memory=True)
  if phase.uses_meta:
    args = lambda i: (batches[i % 2], meta_images, meta_labels, meta_order, meta_flips, i % 2)
  else:
    args = lambda i: (batches[i % 2],)
  start = time.perf_counter()
  compiled = step_fn.lower(state, *args(0)).compile()
  compile_s = time.perf_counter() - start
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  state, metrics = compiled(state, *args(0))  # warm-up call
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for i in range(num_steps):
      state, metrics = compiled(state, *args(i))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  steady = statistics.median(times)
  return {"images_per_s": num_steps * config.batch_size / steady, "epoch_s": steady,
          "compile_and_first_epoch_overhead_s": compile_s,
          "flops_per_step": (analysis or {}).get("flops")}


def measure_cifar10_epochs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """End-to-end phase-1 and phase-2 epoch times (training + evaluation) on the real pack, and the
  protocol's wall time projected from them (data loading, noise generation and the per-epoch
  checkpoint saves not included)."""
  short = config.copy_and_resolve_references()
  short.num_epochs, short.warmup_epochs = 4, 2
  with tempfile.TemporaryDirectory() as workdir:
    history = experiment.train_and_evaluate(short, workdir)["history"]
  # Epochs 0 and 2 include compilation; 1 and 3 are steady state.
  phase1, phase2 = history[1]["epoch_time_s"], history[3]["epoch_time_s"]
  compile_s = (history[0]["epoch_time_s"] - phase1) + (history[2]["epoch_time_s"] - phase2)
  phase2_epochs = config.num_epochs - config.warmup_epochs
  return {"phase1_epoch_s": phase1, "phase2_epoch_s": phase2, "compile_s": compile_s,
          "projected_protocol_s": (config.warmup_epochs * phase1 + phase2_epochs * phase2
                                   + compile_s)}


def _add_utilisation(row: dict[str, Any], flops: float | None) -> None:
  """GFLOP per image and the achieved TFLOP/s: how far a step is from the device's peak."""
  if flops:
    row["gflop_per_image"] = flops / row["batch_size"] / 1e9
    row["achieved_tflop_per_s"] = row["gflop_per_image"] * row["images_per_s"] / 1e3


def _record(report: dict[str, Any], row: dict[str, Any],
            on_progress: Callable[[dict[str, Any]], None] | None) -> None:
  report["measurements"].append(row)
  logging.info("%s", row)
  if on_progress is not None:
    on_progress(report)


def run_benchmark(batch_sizes: Sequence[int], num_steps: int, repeats: int,
                  meta_gradients: Sequence[str], model: str = "cifar_cnn", data_dir: str = "",
                  concurrent_runs: int = 0, compute_dtype: str = "float32",
                  streamed_config: ml_collections.ConfigDict | None = None,
                  on_progress: Callable[[dict[str, Any]], None] | None = None,
                  method_spec: str = "both") -> dict[str, Any]:
  """CIFAR-10's steps (or, with `streamed_config`, that config's) of the methods `method_spec`
  names (default cross-entropy and MetaLabelNet) on the current device.

  `on_progress(report)` is called after every measurement, so that a job stopped at a time limit
  keeps what it measured.
  """
  base = config_lib.default_config()
  base.model.name = model
  base.compute_dtype = compute_dtype
  report: dict[str, Any] = {
      "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
      "backend": jax.default_backend(), "jax_version": jax.__version__,
      "compute_dtype": compute_dtype,
      "commit": git_commit(), "date": datetime.date.today().isoformat(),
      "steps_per_epoch": num_steps, "measurements": [],
  }
  if streamed_config is not None:
    return _run_streamed_benchmark(report, streamed_config, batch_sizes, num_steps, repeats,
                                   meta_gradients, compute_dtype, on_progress, method_spec)
  report["targets_h100_batch128"] = TARGETS
  for batch_size in batch_sizes:
    config = base.copy_and_resolve_references()
    config.batch_size = batch_size
    for name, case_config, method, phase in _cases(config, meta_gradients, method_spec):
      row = {"kind": name, "batch_size": batch_size,
             **measure_epoch(case_config, method, phase, num_steps, repeats)}
      _add_utilisation(row, step_flops(case_config, method, phase))
      _record(report, row, on_progress)
  if concurrent_runs:
    config = base.copy_and_resolve_references()
    config.batch_size = batch_sizes[0]
    for name, case_config, method, phase in _cases(config, meta_gradients[:1], method_spec):
      row = {"kind": f"{name} x{concurrent_runs} runs", "batch_size": config.batch_size,
             **measure_epoch(case_config, method, phase, num_steps, repeats, concurrent_runs)}
      _record(report, row, on_progress)
  report["peak_memory_bytes"] = _peak_memory_bytes()
  if data_dir:
    config = base.copy_and_resolve_references()
    config.data.data_dir = data_dir
    report["cifar10_epochs"] = measure_cifar10_epochs(config)
  return report


def _run_streamed_benchmark(report: dict[str, Any], streamed_config: ml_collections.ConfigDict,
                            batch_sizes: Sequence[int], num_steps: int, repeats: int,
                            meta_gradients: Sequence[str], compute_dtype: str,
                            on_progress: Callable[[dict[str, Any]], None] | None,
                            method_spec: str) -> dict[str, Any]:
  report.update(protocol=streamed_config.data.name, model=streamed_config.model.name,
                image_size=streamed_config.data.image_size,
                num_classes=_streamed_num_classes(streamed_config))
  for batch_size in batch_sizes or [streamed_config.batch_size]:
    config = streamed_config.copy_and_resolve_references()
    config.batch_size, config.compute_dtype = batch_size, compute_dtype
    for name, case_config, method, phase in _cases(config, meta_gradients, method_spec):
      row = {"kind": name, "batch_size": batch_size,
             **measure_streamed_steps(case_config, method, phase, num_steps, repeats)}
      _add_utilisation(row, row.pop("flops_per_step"))
      _record(report, row, on_progress)
  report["peak_memory_bytes"] = _peak_memory_bytes()
  return report


def format_report(report: dict[str, Any]) -> str:
  protocol = (f", {report['protocol']} steps ({report['model']}, {report['image_size']}px, "
              f"synthetic inputs)" if "protocol" in report else "")
  lines = [f"{report['device']} ({report['backend']}), JAX {report['jax_version']}, "
           f"{report['compute_dtype']}, commit {report['commit']}{protocol}",
           f"{'step':<40}{'batch':>6}{'images/s':>12}{'epoch s':>10}{'compile s':>11}"
           f"{'GFLOP/img':>11}{'TFLOP/s':>9}"]
  for row in report["measurements"]:
    lines.append(f"{row['kind']:<40}{row['batch_size']:>6}{row['images_per_s']:>12.0f}"
                 f"{row['epoch_s']:>10.3f}{row['compile_and_first_epoch_overhead_s']:>11.2f}"
                 f"{row.get('gflop_per_image', float('nan')):>11.2f}"
                 f"{row.get('achieved_tflop_per_s', float('nan')):>9.2f}")
  if "targets_h100_batch128" in report:
    lines.append(f"targets (H100, batch 128): meta step >= "
                 f"{TARGETS['meta_step_images_per_s']} images/s, warm-up step >= "
                 f"{TARGETS['warmup_step_images_per_s']} images/s, protocol <= "
                 f"{TARGETS['full_protocol_wall_s']} s")
  if "cifar10_epochs" in report:
    lines.append(f"CIFAR-10 epochs with evaluation: {report['cifar10_epochs']}")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  batch_sizes = [int(b) for b in FLAGS.batch_sizes]
  if FLAGS.streamed_config is not None and not FLAGS["batch_sizes"].present:
    batch_sizes = []  # the config's own
  def write(report: dict[str, Any], complete: bool = False) -> None:
    if FLAGS.out:
      write_json_atomically(FLAGS.out, {**report, "complete": complete})

  if FLAGS.vs_torch:
    repeats = FLAGS.repeats if FLAGS["repeats"].present else 10
    report = bench_vs_torch.compare_with_torch(repeats, FLAGS.meta_gradients)
    print(bench_vs_torch.format_comparison(report))
    write(report, complete=True)
    return

  report = run_benchmark(batch_sizes, FLAGS.steps, FLAGS.repeats, FLAGS.meta_gradients,
                         FLAGS.model, FLAGS.data_dir, FLAGS.concurrent_runs, FLAGS.compute_dtype,
                         FLAGS.streamed_config, on_progress=write, method_spec=FLAGS.methods)
  print(format_report(report))
  write(report, complete=True)


if __name__ == "__main__":
  app.run(main)
