"""Experiments: every method `config.method` names over `config.num_runs` seeds, then a comparison.

`run(config, workdir)` is what `python -m mln_jax.main` calls: each method trains in its own folder
(`workdir` for one method, `workdir/<method>/` for several), its seeds trained together in one
program where the data sits in device memory; it prints and writes (`comparison.json`) a summary.
`train_and_evaluate` and `train_and_evaluate_runs` are the same for one method and any configs.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mln_jax import config as config_lib, cross_fit, in_memory, loop, methods, noise as noise_lib
from mln_jax import runtime
from mln_jax.dataset import Dataset

# Keys in which runs that share one program (one vmapped state) may differ.
PER_RUN_KEYS = ("seed", "noise")


def _is_streamed(config: ml_collections.ConfigDict) -> bool:
  return config.data.name in config_lib.STREAMED_DATASETS


def _check_runs_compatible(configs: list[ml_collections.ConfigDict]) -> None:
  shared = lambda c: {k: v for k, v in json.loads(c.to_json_best_effort()).items()
                      if k not in PER_RUN_KEYS}
  first = shared(configs[0])
  for index, config in enumerate(configs[1:], 1):
    settings = shared(config)
    if settings != first:
      differing = sorted(k for k in settings if settings[k] != first.get(k))
      raise ValueError(f"Runs trained together may differ only in {PER_RUN_KEYS}; run {index} "
                       f"also differs in {differing}.")


def train_and_evaluate_runs(configs: list[ml_collections.ConfigDict], workdir: str,
                            datasets: list[Dataset] | None = None, mesh: Mesh | None = None
                            ) -> list[dict[str, Any]]:
  """Trains the one method of `configs` (runs differing only in seed and noise settings) in one
  program, resuming from `workdir`; see `loop.train_and_evaluate` for what each run writes.

  In-memory datasets: the runs share the training images and one jitted, `vmap`ped step; each has
  its own labels, meta and test split, states and random streams. `datasets` (from
  `in_memory.prepare_data`) skips loading. Streamed datasets train one run at a time. Batches are
  sharded over `mesh` (default: every device).
  """
  for config in configs:
    config_lib.validate_config(config)
  _check_runs_compatible(configs)
  method = methods.get(configs[0])
  if _is_streamed(configs[0]):
    from mln_jax import streamed  # its pipelines need TensorFlow (tf.data)
    if len(configs) != 1:
      raise ValueError(f"{configs[0].data.name} streams from disk one run at a time; got "
                       f"{len(configs)} configs.")
    source = streamed.StreamedSource(configs[0], mesh)
  else:
    source = in_memory.InMemorySource(configs, datasets, mesh, cache_dir=workdir)
  return loop.train_and_evaluate(configs, workdir, source, method)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dataset: Dataset | None = None, mesh: Mesh | None = None) -> dict[str, Any]:
  """One run of the one method `config.method` names; its results (also in workdir/results.json)."""
  if config.num_runs != 1:
    raise ValueError(f"train_and_evaluate trains one run; config.num_runs={config.num_runs} "
                     "(use run() or train_and_evaluate_runs()).")
  return train_and_evaluate_runs([config], workdir, None if dataset is None else [dataset],
                                 mesh)[0]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, list[dict[str, Any]]]:
  """Runs every method `config.method` names (one name, a comma-separated list, 'both' or 'all'),
  each over `config.num_runs` seeds (config.seed, config.seed + 1, ...) trained together; prints and
  writes (`comparison.json`) a summary. Returns method -> the runs' results."""
  config_lib.validate_config(config)
  method_names = methods.resolve(config.method)
  configs = []
  for offset in range(config.num_runs):
    run_config = config.copy_and_resolve_references()
    run_config.seed = config.seed + offset
    configs.append(run_config)
  method_configs = {}
  for name in method_names:
    method_configs[name] = []
    for run_config in configs:
      method_config = methods.with_method(run_config, name)
      methods.get(method_config)  # every method's settings are checked before any trains
      method_configs[name].append(method_config)
  fitted = []  # the methods to cross-fit: those whose soft labels come from images
  if config.label_issues.cross_fit:
    fitted = [n for n in method_names if cross_fit.can_cross_fit(method_configs[n][0])]
    if not fitted:
      raise ValueError(f"config.label_issues.cross_fit judges samples with soft labels made from "
                       f"images, which none of {method_names} has; use metalabelnet.")
  method_dirs = {m: workdir if len(method_names) == 1 else os.path.join(workdir, m)
                 for m in method_names}
  streamed = _is_streamed(config)
  if jax.process_count() > 1 and not streamed:
    raise ValueError(f"{config.data.name} is held in device memory and trains in one process; "
                     "multi-process runs (--multihost) are for the streamed datasets.")
  lead = jax.process_index() == 0
  with runtime.workdir_lock(workdir) if lead else contextlib.nullcontext():
    # The workdirs are made and checked against their configs before anything trains.
    for name in method_names:
      for run_dir, method_config in zip(runtime.run_dirs(method_dirs[name], len(configs)),
                                        method_configs[name]):
        os.makedirs(run_dir, exist_ok=True)
        runtime.check_workdir_config(run_dir, method_config,
                                     os.path.join(method_dirs[name], "checkpoints"), write=lead)
    return _run_methods(config, configs, method_configs, method_dirs, fitted, workdir)


def _run_methods(config: ml_collections.ConfigDict, configs: list[ml_collections.ConfigDict],
                 method_configs: dict[str, list[ml_collections.ConfigDict]],
                 method_dirs: dict[str, str], fitted: list[str], workdir: str
                 ) -> dict[str, list[dict[str, Any]]]:
  method_names = tuple(method_configs)
  streamed = _is_streamed(config)
  finished = all(os.path.exists(os.path.join(d, runtime.RESULTS_FILE))
                 for m in method_names for d in runtime.run_dirs(method_dirs[m], len(configs)))
  datasets = None
  if not finished and not streamed:
    # Made once for all methods (noise with 'clean_model' trains teachers); not when finished.
    datasets = in_memory.prepare_runs(configs, cache_dir=workdir)
  results = {name: train_and_evaluate_runs(method_configs[name], method_dirs[name], datasets)
             for name in method_names}
  cross_fitted = {n: cross_fit.run(method_configs[n], method_dirs[n], datasets) for n in fitted}
  summary: dict[str, Any] = {
      name: {"best_test_accuracy": [r["best"]["test_accuracy"] for r in runs],
             "last_test_accuracy": [r["last"]["test_accuracy"] for r in runs],
             "epochs_time_s": runs[0]["epochs_time_s"]}
      for name, runs in results.items()}
  for name, reports in cross_fitted.items():  # top-k precision of the out-of-sample soft labels
    summary[name]["cross_fit_top_k_precision"] = [
        (r["label_issues"] or {}).get("top_k_precision") for r in reports]
  summary["seeds"] = [c.seed for c in configs]
  summary["realised_noise_rate"] = [r["noise"]["realised_rate"]
                                    for r in results[method_names[0]]]
  if jax.process_index() > 0:  # process 0 writes and prints for all
    return results
  runtime.write_json_atomically(os.path.join(workdir, "comparison.json"), summary)
  print("\n" + comparison_table(config, summary, method_names))
  return results


def comparison_table(config: ml_collections.ConfigDict, summary: dict[str, Any],
                     method_names: tuple[str, ...]) -> str:
  """The printed summary: each method's test accuracy at the best meta epoch and the last epoch."""
  width = max(15, max(len(name) for name in method_names) + 2)
  lines = [f"{'method':<{width}}{'best-by-meta test acc':>24}{'last-epoch test acc':>22}"]
  for name in method_names:
    best, last = summary[name]["best_test_accuracy"], summary[name]["last_test_accuracy"]
    lines.append(f"{name:<{width}}{_mean_std(best):>24}{_mean_std(last):>22}")
  for name in method_names:
    fitted = summary[name].get("cross_fit_top_k_precision")
    if fitted:
      lines.append(f"{name}: label-issue top-k precision of the cross-fitted soft labels "
                   f"(cross_fit/): " + " ".join("unknown" if p is None else f"{p:.4f}"
                                                for p in fitted))
  rates = " ".join("unknown" if r is None else f"{r:.3f}" for r in summary["realised_noise_rate"])
  noise = ("the dataset's own noisy labels" if _is_streamed(config)
           else f"{config.noise.kind} noise {config.noise.rate}"
           if config.noise.kind in noise_lib.RATED_KINDS
           else f"human noise ({config.noise.human_label})" if config.noise.kind == "human"
           else f"{config.noise.kind} noise")
  header = f"{config.data.name}, {noise}, seeds {summary['seeds']}, realised noise rates {rates}:"
  return header + "\n" + "\n".join(lines)


def _mean_std(values: list[float]) -> str:
  if len(values) == 1:
    return f"{values[0]:.4f}"
  return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"
