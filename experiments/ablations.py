"""The paper's ablations (Section V) as commands and reports: meta-data size (Figure 5), warm-up
length (Figure 6) and unlabelled data (Figure 7), MetaLabelNet at 40% feature-dependent noise on
CIFAR-10 (configs/cifar10.py), 3 seeds per value trained together.

  python experiments/ablations.py plan --ablation=meta_size [--seeds=3] [--local=/tmp/abl
      [--data_dir=DIR]]
      prints one command per value: for this project's lent GPU (experiments/gpu/run.sh), or with
      --local one `python -m mln_jax.main` command per value writing under that folder;
  python experiments/ablations.py assemble --ablation=meta_size --results=DIR --command="..."
      reads every finished run under DIR (results.json with its config.json) and writes
      experiments/results/ablation_<name>.md, .json and .png: mean ± std of test accuracy at the
      best meta epoch and at the last epoch per value (and per method, where both were run), plus
      the accuracy-per-epoch and soft-label figures of each value.

`--config`, `--values` and `--extra` (more overrides) run the same ablation on another config (e.g.
configs/digits.py on a CPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
from typing import Any, Sequence

from mln_jax import figures, methods as methods_lib
from mln_jax.config import default_config

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from record import mean_std  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
NOISE = ("--config.noise.kind=feature_dependent", "--config.noise.rate=0.4")
# name -> (config key, the paper's values on CIFAR-10, axis label, what the paper shows)
ABLATIONS = {
    "meta_size": ("data.num_meta", (500, 1000, 2000, 5000), "meta-data size",
                  "Figure 5: about 1k meta images (100 a class) suffice"),
    "warmup": ("warmup_epochs", (20, 30, 44, 60), "warm-up epochs",
               "Figure 6: best a few epochs after the first lr decay (index 41)"),
    # 20% to 72% of CIFAR-10's 50k training labels removed.
    "unlabelled": ("data.num_unlabelled", (10000, 20000, 30000, 36000),
                   "unlabelled training images",
                   "Figure 7: top accuracy up to 72% (36k) unlabelled"),
}


def plan(ablation: str, seeds: int, config: str = "configs/cifar10.py",
         values: Sequence[int] | None = None, local: str = "", extra: Sequence[str] = (),
         data_dir: str = "../shared/data/cifar10") -> list[str]:
  key, default_values, _, _ = ABLATIONS[ablation]
  commands = []
  for value in values or default_values:
    name = f"ablation_{ablation}_{value}"
    overrides = " ".join((*NOISE, f"--config.{key}={value}", f"--config.num_runs={seeds}", *extra))
    if local:
      commands.append(f"python -m mln_jax.main --config={config} --workdir={local}/{name} "
                      f"--config.data_dir={data_dir} {overrides}")
    else:
      commands.append(f"bash experiments/gpu/run.sh {name} {config} {overrides}")
  return commands


def _lookup(config: dict[str, Any], dotted: str) -> Any:
  for part in dotted.split("."):
    config = config[part]
  return config


def collect(ablation: str, folders: Sequence[pathlib.Path]
            ) -> dict[tuple[str, Any], list[dict[str, Any]]]:
  """(method, value of the ablated key) -> finished runs (results.json + config.json beside it)."""
  key = ABLATIONS[ablation][0]
  cells: dict[tuple[str, Any], list[dict[str, Any]]] = {}
  for folder in folders:
    for path in sorted(folder.rglob("results.json")):
      config = json.loads((path.parent / "config.json").read_text())
      result = json.loads(path.read_text())
      result["config"] = config
      cells.setdefault((result["method"], _lookup(config, key)), []).append(result)
  return cells


def ordered_methods(present: set[str]) -> list[str]:
  """The methods of the runs, the ablated one (the default config's method) first, then in the
  registry's order."""
  main = default_config().method
  order = list(methods_lib.names())
  rank = lambda m: (m != main, order.index(m) if m in order else len(order), m)
  return sorted(present, key=rank)


def assemble(ablation: str, folders: Sequence[pathlib.Path], command: str,
             out: pathlib.Path = RESULTS) -> pathlib.Path:
  key, _, label, paper = ABLATIONS[ablation]
  cells = collect(ablation, folders)
  if not cells:
    raise FileNotFoundError(f"No results.json under {[str(f) for f in folders]}.")
  runs = [r for rs in cells.values() for r in rs]
  first = runs[0]
  config = first["config"]
  methods = ordered_methods({m for m, _ in cells})
  values = sorted({v for _, v in cells})
  lines = [
      f"# Ablation: {label} ({first['dataset']}, {config['noise']['kind']} noise "
      f"{config['noise']['rate']})", "",
      f"- paper: {paper}",
      f"- assembled: {datetime.date.today().isoformat()}",
      f"- device: {first['device']} (JAX {first['jax_version']}, "
      f"{first.get('compute_dtype', 'float32')})",
      f"- commits: {', '.join(sorted({r['commit'] for r in runs}))}",
      f"- command: `{command}`",
      f"- the other settings: {config['num_epochs']} epochs"
      + ("" if key == "warmup_epochs" else f", {config['warmup_epochs']} warm-up")
      + f", batch {config['batch_size']}, model {config['model']['name']}", "",
      "Test accuracy (%), mean ± std over seeds: at the best meta epoch / at the last epoch. A "
      "method's seeds train together in one program; the last column is its wall time, averaged "
      "over the methods.", "",
      f"| {label} | " + " | ".join(methods) + " | seeds | wall time (s) |",
      "|---|" + "---|" * (len(methods) + 2),
  ]
  report: dict[str, Any] = {"ablation": ablation, "key": key, "cells": {}}
  for value in values:
    row = []
    for method in methods:
      group = cells.get((method, value), [])
      row.append(f"{mean_std([r['best']['test_accuracy'] for r in group])} / "
                 f"{mean_std([r['last']['test_accuracy'] for r in group])}" if group else "—")
      report["cells"][f"{method}/{value}"] = {
          "best": [r["best"]["test_accuracy"] for r in group],
          "last": [r["last"]["test_accuracy"] for r in group],
          "seeds": [r["seed"] for r in group]}
    group = [r for m in methods for r in cells.get((m, value), [])]
    lines.append(f"| {value} | " + " | ".join(row) + f" | {sorted({r['seed'] for r in group})} | "
                 f"{statistics.mean(r['wall_time_s'] for r in group):.0f} |")
  out.mkdir(parents=True, exist_ok=True)
  name = f"ablation_{ablation}"
  figure_dir = out / f"{name}_figures"
  main_method = methods[0]
  with_values = [v for v in values if (main_method, v) in cells]
  figures.ablation_curve(with_values, [[r["best"]["test_accuracy"] for r in cells[(main_method, v)]]
                                       for v in with_values],
                         [[r["last"]["test_accuracy"] for r in cells[(main_method, v)]]
                          for v in with_values], label, out / f"{name}.png",
                         f"{main_method}: {label}")
  lines += ["", f"![{label}]({name}.png)", "", "Per value: test accuracy per epoch "
            "(`*_accuracy.png`) and soft-label stability (`*_soft_labels.png`) in "
            f"`{figure_dir.name}/`."]
  for value in values:
    by_method = {m: cells[(m, value)] for m in methods if (m, value) in cells}
    figures.setting_figures(by_method, figure_dir, str(value), f"{label} = {value}")
  (out / f"{name}.json").write_text(json.dumps(report, indent=2))
  path = out / f"{name}.md"
  path.write_text("\n".join(lines) + "\n")
  return path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command_name", required=True)
  plan_parser = commands.add_parser("plan", help="print one command per value")
  assemble_parser = commands.add_parser("assemble", help="write experiments/results/ablation_*")
  for sub in (plan_parser, assemble_parser):
    sub.add_argument("--ablation", choices=sorted(ABLATIONS), required=True)
  plan_parser.add_argument("--seeds", type=int, default=3)
  plan_parser.add_argument("--config", default="configs/cifar10.py")
  plan_parser.add_argument("--values", type=lambda s: [int(v) for v in s.split(",")])
  plan_parser.add_argument("--local", default="",
                           help="folder for local runs (else the GPU script)")
  plan_parser.add_argument("--data_dir", default="../shared/data/cifar10",
                           help="the CIFAR-10 pack, for --local commands")
  plan_parser.add_argument("--extra", action="append", default=[],
                           help="another override for every command, e.g. --config.method=both")
  assemble_parser.add_argument("--results", type=pathlib.Path, action="append", required=True)
  assemble_parser.add_argument("--command", required=True, help="how the runs were made")
  assemble_parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  args = parser.parse_args()
  if args.command_name == "plan":
    print("\n".join(plan(args.ablation, args.seeds, args.config, args.values, args.local,
                         args.extra, args.data_dir)))
  else:
    print(assemble(args.ablation, args.results, args.command, args.out))


if __name__ == "__main__":
  main()
