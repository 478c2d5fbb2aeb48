"""Table I of the paper on CIFAR-10: cross-entropy and MetaLabelNet, uniform and feature-dependent noise
at 20/40/60/80%, the paper's protocol (configs/cifar10.py), 3 seeds per cell.

Two sub-commands:

  python experiments/table1.py plan [--seeds=3]
      prints one training command per (method, noise kind, rate) cell; each trains the cell's seeds
      together (`--config.num_runs`), meant to fit one device call (600 s; not yet timed on a GPU:
      run the benchmark first, and lower --seeds if its projection says otherwise);
  python experiments/table1.py assemble --results=DIR [--results=DIR ...] --command="..."
      reads every results.json under the given folders and writes experiments/results/table1.md and
      table1.json: mean ± std of test accuracy at the best meta epoch and at the last epoch, the
      realised noise rate, and the paper's number beside each cell; missing cells are marked.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import figures  # noqa: E402
from record import mean_std  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
RATES = (0.2, 0.4, 0.6, 0.8)
KINDS = ("uniform", "feature_dependent")
METHODS = ("cross_entropy", "metalabelnet")
# Table I of the paper (SPEC): mean ± std test accuracy (%).
PAPER = {
    ("cross_entropy", "uniform"): ("82.55±0.80", "76.31±0.75", "65.94±0.44", "38.19±0.81"),
    ("cross_entropy", "feature_dependent"): ("81.75±0.39", "71.86±0.69", "69.78±0.71",
                                             "23.18±0.55"),
    ("metalabelnet", "uniform"): ("83.35±0.17", "79.03±0.26", "70.60±0.86", "50.02±0.44"),
    ("metalabelnet", "feature_dependent"): ("83.00±0.41", "80.42±0.51", "78.42±0.36",
                                            "76.57±0.33"),
}
CONFIGS = {"cross_entropy": "configs/cifar10_cross_entropy.py", "metalabelnet": "configs/cifar10.py"}


def cell_name(method: str, kind: str, rate: float) -> str:
  return f"{method}_{kind}_{round(100 * rate)}"


def plan(seeds: int) -> list[str]:
  """One command per cell, for the lent GPU (experiments/gpu/run.sh) or any machine."""
  return [f"bash experiments/gpu/run.sh {cell_name(method, kind, rate)} {CONFIGS[method]} "
          f"--config.noise.kind={kind} --config.noise.rate={rate} --config.num_runs={seeds}"
          for method in METHODS for kind in KINDS for rate in RATES]


def collect(folders: list[pathlib.Path]) -> dict[tuple[str, str, float], list[dict[str, Any]]]:
  """(method, noise kind, rate) -> the finished runs found under `folders`."""
  cells: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
  for folder in folders:
    for path in sorted(folder.rglob("results.json")):
      result = json.loads(path.read_text())
      key = (result["method"], result["noise"]["kind"], round(result["noise"]["rate"], 4))
      cells.setdefault(key, []).append(result)
  return cells


def assemble(folders: list[pathlib.Path], command: str, out: pathlib.Path = RESULTS
             ) -> pathlib.Path:
  cells = collect(folders)
  if not cells:
    raise FileNotFoundError(f"No results.json under {[str(f) for f in folders]}.")
  some = next(iter(cells.values()))[0]
  lines = [
      "# Table I — CIFAR-10 test accuracy (%), mean ± std over seeds", "",
      f"- assembled: {datetime.date.today().isoformat()}",
      f"- device: {some['device']} (JAX {some['jax_version']}, {some.get('compute_dtype', 'float32')})",
      f"- commits: {', '.join(sorted({r['commit'] for runs in cells.values() for r in runs}))}",
      f"- command: `{command}`", "",
      "Each cell: ours at the best meta epoch / ours at the last epoch (paper), then seeds and the "
      "realised noise rate.", "",
      "| method | noise | " + " | ".join(f"{round(100 * r)}%" for r in RATES) + " |",
      "|---|---|" + "---|" * len(RATES),
  ]
  table: dict[str, Any] = {}
  for method in METHODS:
    for kind in KINDS:
      row = []
      for rate, paper in zip(RATES, PAPER[(method, kind)]):
        runs = cells.get((method, kind, round(rate, 4)), [])
        if not runs:
          row.append(f"not run ({paper})")
          continue
        best = mean_std([r["best"]["test_accuracy"] for r in runs], separator="±")
        last = mean_std([r["last"]["test_accuracy"] for r in runs], separator="±")
        realised = statistics.mean(r["noise"]["realised_rate"] for r in runs)
        row.append(f"{best} / {last} ({paper}); n={len(runs)}, realised {realised:.3f}")
        table[cell_name(method, kind, rate)] = {
            "best": [r["best"]["test_accuracy"] for r in runs],
            "last": [r["last"]["test_accuracy"] for r in runs],
            "seeds": [r.get("seed") for r in runs], "realised_noise_rate": realised,
            "paper": paper, "wall_time_s": [r["wall_time_s"] for r in runs]}
      lines.append(f"| {method} | {kind} | " + " | ".join(row) + " |")
  out.mkdir(parents=True, exist_ok=True)
  lines += ["", "Figures per noise setting in `table1_figures/`: test accuracy per epoch of both "
            "methods with the end of the warm-up marked (`*_accuracy.png`, the paper's Figure 3) and "
            "MetaLabelNet's soft-label stability (`*_soft_labels.png`, Figure 4's idea)."]
  for kind in KINDS:
    for rate in RATES:
      by_method = {m: cells[(m, kind, round(rate, 4))] for m in METHODS
                   if (m, kind, round(rate, 4)) in cells}
      if not by_method:
        continue
      figures.setting_figures(by_method, out / "table1_figures", f"{kind}_{round(100 * rate)}",
                              f"CIFAR-10, {kind} noise {round(100 * rate)}%")
  (out / "table1.json").write_text(json.dumps(table, indent=2))
  path = out / "table1.md"
  path.write_text("\n".join(lines) + "\n")
  return path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command_name", required=True)
  plan_parser = commands.add_parser("plan", help="print one command per cell")
  plan_parser.add_argument("--seeds", type=int, default=3)
  assemble_parser = commands.add_parser("assemble", help="write experiments/results/table1.md")
  assemble_parser.add_argument("--results", type=pathlib.Path, action="append", required=True)
  assemble_parser.add_argument("--command", required=True, help="how the runs were made")
  assemble_parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  args = parser.parse_args()
  if args.command_name == "plan":
    print("\n".join(plan(args.seeds)))
  else:
    print(assemble(args.results, args.command, args.out))


if __name__ == "__main__":
  main()
