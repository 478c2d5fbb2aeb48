"""Out-of-sample soft labels (`config.label_issues.cross_fit`).

A run's soft labels are in-sample: MetaLabelNet's label network reads features of a classifier
warmed up on the very noisy labels it then judges, so a memorised wrong label can look right.
Cross-fitting judges every sample with a run that never saw it: the training set is split in two
halves (by the first run's seed), each half trains a run of the same method and settings (in
`workdir/cross_fit/half_<h>/`, resumable like any run), and each half's samples get the soft labels
of the other half's final model.

Per run, `workdir/cross_fit/` (`cross_fit/run_<i>/` for several seeds) then holds soft_labels.npz
(the export's format, every training sample, out of sample), label_issues.csv, the gallery
figures/label_issues.png and label_issues.json (the out-of-sample label-issue report where clean
labels are known). In-memory datasets, methods whose last phase makes soft labels from images
(MetaLabelNet; not the label tables of PENCIL, Joint Optimization or MSLG).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mln_jax import config as config_lib, dataset as dataset_lib, in_memory
from mln_jax import labels as labels_lib, loop, methods, report, runtime
from mln_jax.dataset import Dataset, Split

REPORT_FILE = "label_issues.json"


def split_halves(num_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Two disjoint halves of the sample indices (sorted), drawn by `seed`; together all of them."""
  order = np.random.default_rng(seed).permutation(num_train)
  return np.sort(order[:num_train // 2]), np.sort(order[num_train // 2:])


def half_dataset(dataset: Dataset, indices: np.ndarray) -> Dataset:
  """`dataset` with only the training samples at `indices` (meta and test splits unchanged)."""
  given, clean = dataset.train.labels[indices], dataset.clean_train_labels[indices]
  return Dataset(
      name=dataset.name, num_classes=dataset.num_classes, class_names=dataset.class_names,
      train=Split(dataset.train.images[indices], given), meta=dataset.meta, tests=dataset.tests,
      clean_train_labels=clean,
      noise=dataset_lib.remeasured_noise(dataset.noise, given, clean, dataset.num_classes))


def can_cross_fit(config: ml_collections.ConfigDict) -> bool:
  """Whether the method `config` names ends in a phase whose soft labels can judge images it never
  trained on (MetaLabelNet's label network; not a per-sample label table)."""
  method = methods.get(config)
  final = method.phase_at(method.total_epochs(config) - 1)
  return final.soft_labels is not None and final.soft_labels_from_images


def run(configs: list[ml_collections.ConfigDict], workdir: str,
        datasets: list[Dataset] | None = None, mesh: Mesh | None = None) -> list[dict[str, Any]]:
  """Cross-fits the one method of `configs` (runs trained together, as
  `experiment.train_and_evaluate_runs` takes them) and writes `workdir/cross_fit/`; returns per
  run what label_issues.json holds. A finished cross-fit returns its saved reports."""
  config = configs[0]
  if config.data.name not in config_lib.IN_MEMORY_DATASETS:
    raise ValueError(f"config.label_issues.cross_fit trains on halves of a dataset held in memory "
                     f"({config_lib.IN_MEMORY_DATASETS}); {config.data.name!r} is streamed.")
  method = methods.get(config)
  final = method.phase_at(method.total_epochs(config) - 1)
  if final.soft_labels is None or not final.soft_labels_from_images:
    raise ValueError(f"config.label_issues.cross_fit judges each half with soft labels made from "
                     f"its images; the last phase of {method.name!r} has none (its soft labels, if "
                     "any, are a table of the samples it trained on).")
  folder = os.path.join(workdir, runtime.CROSS_FIT_DIR)
  out_dirs = runtime.run_dirs(folder, len(configs))
  report_paths = [os.path.join(d, REPORT_FILE) for d in out_dirs]
  if all(os.path.exists(p) for p in report_paths):
    return [runtime.read_json(p) for p in report_paths]
  if datasets is None:
    datasets = in_memory.prepare_runs(configs, cache_dir=workdir)
  num_train, num_classes = len(datasets[0].train), datasets[0].num_classes
  halves = split_halves(num_train, config.seed)
  out_of_sample = [np.zeros((num_train, num_classes), np.float32) for _ in configs]
  for half, indices in enumerate(halves):
    half_dir = os.path.join(folder, f"half_{half}")
    half_datasets = [half_dataset(d, indices) for d in datasets]
    loop.train_and_evaluate(configs, half_dir, in_memory.InMemorySource(configs, half_datasets,
                                                                        mesh), method)
    # A source of its own: the loop's loaded nothing where the half had finished before.
    source = in_memory.InMemorySource(configs, half_datasets, mesh)
    source.load()
    state = loop.restore_latest_state(half_dir, source.init_state(method, fresh=False))
    state = final.enter(state, False)
    other = halves[1 - half]
    with jax.default_matmul_precision(config.matmul_precision):
      scored = source.soft_labels(state, final, datasets[0].train.images[other])
    for run_soft, run_scored in zip(out_of_sample, scored):
      run_soft[other] = run_scored
  reports = []
  lead = jax.process_index() == 0
  for out_dir, dataset, soft, run_config in zip(out_dirs, datasets, out_of_sample, configs):
    given, clean = dataset.train.labels, dataset.clean_train_labels
    known = (clean >= 0) & (given >= 0)
    found = {"halves": [len(h) for h in halves], "split_seed": config.seed,
             "method": method.name, "seed": run_config.seed,
             "label_issues": ({"measured_on": int(known.sum()), **labels_lib.label_issue_report(
                 given[known], soft[known], clean[known])} if known.any() else None)}
    reports.append(found)
    if not lead:
      continue
    os.makedirs(out_dir, exist_ok=True)
    class_names = list(dataset.class_names) or [str(i) for i in range(num_classes)]
    labels_lib.write_soft_labels(os.path.join(out_dir, "soft_labels.npz"), given, soft, clean,
                                 class_names=np.asarray(class_names, str))
    issues = report.load_label_issues(out_dir)
    report.write_label_issues_csv(os.path.join(out_dir, report.CSV_FILE), issues, class_names)
    size = run_config.label_issues.gallery_size
    if size:
      _, top = report.write_gallery(
          pathlib.Path(out_dir, report.FIGURES_DIR, "label_issues.png"), out_dir, issues,
          class_names, size, f"{method.name} on {dataset.name}, cross-fitted: the most "
          "suspicious labels (#sample score, given → suggested)", dataset.train.images)
      found["gallery_precision"] = report.gallery_precision(issues, top)
    runtime.write_json_atomically(os.path.join(out_dir, REPORT_FILE), found)
  return reports
