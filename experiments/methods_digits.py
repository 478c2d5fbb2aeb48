"""Every method of the registry on the embedded digits default, at 40% feature-dependent and 60%
uniform noise, 3 seeds each: one command, one record.

  python experiments/methods_digits.py [--workdir=/tmp/methods_digits] [--methods=all] [--seeds=3]
      [--note=FILE]

Trains (or, where finished, reads) `configs/digits.py` with `--config.method=<methods>` and
`--config.num_runs=<seeds>` for both noise settings under `<workdir>/<setting>/`, then writes
experiments/results/methods_digits.{md,json,png}: per method and setting, test accuracy at the best
meta epoch and at the last epoch (mean ± std over the seeds), the realised noise rate, seconds per
epoch and epochs trained, and XLA's FLOP count of each phase's step (a device-independent measure
of work); the PNG is a bar chart of the same accuracies. Rerunning resumes unfinished runs.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import pathlib
import statistics
import sys
from typing import Any

import jax

from mln_jax import bench, experiment, methods

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from record import mean_std  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
SETTINGS = {"feature_dependent_40": ("feature_dependent", 0.4), "uniform_60": ("uniform", 0.6)}


def digits_config():
  spec = importlib.util.spec_from_file_location("digits_config", ROOT / "configs" / "digits.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def setting_config(kind: str, rate: float, method_spec: str, seeds: int):
  config = digits_config()
  config.method, config.num_runs = method_spec, seeds
  config.noise.kind, config.noise.rate = kind, rate
  return config


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """One method's runs in one setting: accuracies per seed and their summary, times."""
  history = runs[0]["history"]
  return {
      "best_test_accuracy": [r["best"]["test_accuracy"] for r in runs],
      "last_test_accuracy": [r["last"]["test_accuracy"] for r in runs],
      "best_epoch": [r["best"]["epoch"] for r in runs],
      "realised_noise_rate": [r["noise"]["realised_rate"] for r in runs],
      "epochs": len(history),
      # Training and evaluation of the seeds' one (vmapped) program, per epoch, compilation
      # included; the median leaves out the compiling first epochs of each phase.
      "seconds_per_epoch": statistics.median(h["epoch_time_s"] for h in history),
      "label_issues_top_k_precision": [
          (r.get("label_issues") or {}).get("top_k_precision") for r in runs],
  }


def phase_flops(config, image_shape: tuple[int, ...], num_classes: int, num_train: int
                ) -> dict[str, float | None]:
  """XLA's FLOPs of one step of each of the method's phases on these shapes."""
  method = methods.get(config)
  return {phase.name: bench.step_flops(config, method, phase, image_shape, num_classes, num_train)
          for phase in method.phases}


def bar_chart(table: dict[str, dict[str, dict[str, Any]]], names: list[str], path: pathlib.Path
              ) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  figure, axes = plt.subplots(len(table), 1, figsize=(max(8, 0.7 * len(names)), 3.6 * len(table)),
                              squeeze=False)
  x = np.arange(len(names))
  for axis, (setting, rows) in zip(axes[:, 0], table.items()):
    for offset, key, label in ((-0.2, "best_test_accuracy", "at the best meta epoch"),
                               (0.2, "last_test_accuracy", "at the last epoch")):
      values = [100 * np.array(rows[n][key]) for n in names]
      axis.bar(x + offset, [v.mean() for v in values], 0.4, label=label,
               yerr=[v.std(ddof=1) if len(v) > 1 else 0 for v in values], capsize=2)
    # The first method (the registry's first: cross-entropy) as the line to compare against.
    baseline = 100 * np.mean(rows[names[0]]["best_test_accuracy"])
    axis.axhline(baseline, color="grey", lw=0.8, ls="--", label=f"{names[0]} (best)")
    axis.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    axis.set_ylabel("test accuracy (%)")
    low = min(100 * min(min(rows[n]["best_test_accuracy"]), min(rows[n]["last_test_accuracy"]))
              for n in names)
    axis.set_ylim(max(0, low - 5), 100)
    axis.set_title(f"digits, {setting.replace('_', ' ')}% noise, mean ± std over seeds")
    axis.legend(fontsize=7, loc="lower right")
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def main(argv: list[str] | None = None) -> pathlib.Path:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/methods_digits", type=pathlib.Path)
  parser.add_argument("--methods", default="all", help="config.method: names, a list or a group")
  parser.add_argument("--seeds", default=3, type=int)
  parser.add_argument("--name", default="methods_digits", help="file name under results/")
  parser.add_argument("--note", type=pathlib.Path, help="a markdown file appended to the record "
                      "(what the numbers mean, outliers investigated)")
  args = parser.parse_args(argv)
  names = list(methods.resolve(args.methods))
  table: dict[str, dict[str, dict[str, Any]]] = {}
  environment: dict[str, Any] = {}
  flops: dict[str, dict[str, float | None]] = {}
  commits: dict[str, set[str]] = {}
  for setting, (kind, rate) in SETTINGS.items():
    config = setting_config(kind, rate, args.methods, args.seeds)
    results = experiment.run(config, str(args.workdir / setting))
    table[setting] = {name: summarise(results[name]) for name in names}
    first = results[names[0]][0]
    environment = {k: first[k] for k in ("device", "jax_version", "packages")}
    for name in names:  # a resumed record may hold runs of several commits
      commits.setdefault(f"{setting}: {results[name][0]['commit']}", set()).add(name)
    if not flops:
      for name in names:
        flops[name] = phase_flops(methods.with_method(config, name), tuple(first["image_shape"]),
                                  first["num_classes"], first["num_train"])
  command = "python experiments/methods_digits.py " + " ".join(argv or sys.argv[1:])
  lines = [
      f"# {args.name}: every method on digits (configs/digits.py), {args.seeds} seeds", "",
      f"- date: {datetime.date.today().isoformat()}",
      f"- device: {environment['device']} (JAX {environment['jax_version']}, "
      f"{jax.device_count()} device(s))",
      "- commits: " + "; ".join(
          f"{commit} ({'all' if len(trained) == len(names) else ', '.join(sorted(trained))})"
          for commit, trained in commits.items()),
      f"- command: `{command.strip()}`", "",
      "Test accuracy (%) at the epoch of the best meta accuracy and at the last epoch, mean ± std "
      "over the seeds (trained together in one vmapped program per method); seconds per epoch "
      "are the median of that program's epochs (training and evaluation, all seeds); "
      "methods that train twice (an estimator or feature network first) have more epochs.", ""]
  for setting, rows in table.items():
    rate = statistics.mean(rows[names[0]]["realised_noise_rate"])
    lines += [f"## {setting.replace('_', ' ')}% noise (realised rate {rate:.3f})", "",
              "| method | best-meta test acc | last-epoch test acc | best epoch | epochs "
              "| s/epoch | label-issue top-k precision |", "|---|---|---|---|---|---|---|"]
    for name in names:
      row = rows[name]
      precision = [p for p in row["label_issues_top_k_precision"] if p is not None]
      lines.append(
          f"| {name} | {mean_std(row['best_test_accuracy'])} | "
          f"{mean_std(row['last_test_accuracy'])} | "
          f"{', '.join(str(e) for e in row['best_epoch'])} | {row['epochs']} | "
          f"{row['seconds_per_epoch']:.2f} | "
          f"{mean_std(precision) if precision else '–'} |")
    lines.append("")
  lines += ["## Work per step (XLA FLOPs, batch 32, digits shapes)", "",
            "| method | phase: MFLOP per step |", "|---|---|"]
  for name in names:
    lines.append(f"| {name} | " + "; ".join(
        f"{phase}: {value / 1e6:.1f}" if value else f"{phase}: –"
        for phase, value in flops[name].items()) + " |")
  lines += ["", f"![bar chart]({args.name}.png)", ""]
  if args.note:
    lines += [args.note.read_text(encoding="utf-8").strip(), ""]
  RESULTS.mkdir(parents=True, exist_ok=True)
  bar_chart(table, names, RESULTS / f"{args.name}.png")
  (RESULTS / f"{args.name}.json").write_text(json.dumps(
      {"command": command.strip(), **environment,
       "commits": {c: sorted(trained) for c, trained in commits.items()}, "settings": table,
       "flops_per_step": flops},
      indent=2))
  path = RESULTS / f"{args.name}.md"
  path.write_text("\n".join(lines))
  print(path)
  return path


if __name__ == "__main__":
  main()
