"""Table I of the paper on CIFAR-10: its twelve rows (cross-entropy, the ten baselines and
MetaLabelNet: the registry's group 'table1', `mln_jax.methods`), uniform and feature-dependent
noise at 20/40/60/80%, the paper's protocol (configs/cifar10.py), 3 seeds per cell.

Two sub-commands:

  python experiments/table1.py plan [--seeds=3] [--methods=table1] [--local=/tmp/table1
                                    [--data_dir=DIR]]
      prints one training command per (method, noise kind, rate) cell (--methods: any names or
      groups, e.g. 'references' for the reference-code variants); each trains the cell's seeds
      together (`--config.num_runs`). Without --local the commands are for this project's lent GPU
      (experiments/gpu/run.sh; meant to fit one 600 s device call, not yet timed there); with
      --local they are plain `python -m mln_jax.main` commands writing under that folder, for any
      machine with an accelerator;
  python experiments/table1.py assemble --results=DIR [--results=DIR ...] --command="..."
      reads every finished run under the given folders (results.json with its config.json) and
      writes experiments/results/table1.md and table1.json: mean ± std of test accuracy at the best
      meta epoch and at the last epoch, the realised noise rate, and the paper's number beside each
      cell (a reference variant's beside its method's); missing cells are marked; the rows are
      Table I's, then any other method found. Runs of another dataset or protocol (other epochs,
      model, schedule, meta-data size, ...) are skipped and named, so they cannot pass for Table I.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
from typing import Any

from mln_jax import figures, methods
from mln_jax.config import default_config, flatten

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from record import mean_std  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
RATES = (0.2, 0.4, 0.6, 0.8)
KINDS = ("uniform", "feature_dependent")
# Table I of the paper (SPEC), per method and noise kind: mean ± std test accuracy (%) per rate.
PAPER = json.loads((pathlib.Path(__file__).resolve().parent / "table1_paper.json").read_text(
    encoding="utf-8"))["methods"]
CONFIG = "configs/cifar10.py"  # every method, with --config.method
# Settings a Table I run may choose; all others must be the paper's protocol (configs/cifar10.py).
FREE_KEYS = ("seed", "num_runs", "method", "noise.kind", "noise.rate", "data_dir", "data.data_dir",
             "data.source", "epoch_loop", "checkpoint_every_epochs", "checkpoint_every_steps",
             "log_every_steps", "export_soft_labels", "compute_dtype", "matmul_precision")


def cell_name(method: str, kind: str, rate: float) -> str:
  return f"{method}_{kind}_{round(100 * rate)}"


def paper_row(method: str) -> dict[str, list[str]]:
  """The paper's numbers for `method`'s row; a reference variant has its published method's."""
  base = method.replace("_reference", "").replace("_oracle", "")
  return PAPER.get(method, PAPER.get(base, {}))


def plan(seeds: int, local: str = "", data_dir: str = "../shared/data/cifar10",
         method_spec: str = "table1") -> list[str]:
  """One command per cell: for the lent GPU (experiments/gpu/run.sh), or with `local` a plain
  command writing under that folder."""
  commands = []
  for method in methods.resolve(method_spec):
    for kind in KINDS:
      for rate in RATES:
        name = cell_name(method, kind, rate)
        overrides = (f"--config.method={method} --config.noise.kind={kind} "
                     f"--config.noise.rate={rate} --config.num_runs={seeds}")
        commands.append(
            f"python -m mln_jax.main --config={CONFIG} --workdir={local}/{name} "
            f"--config.data_dir={data_dir} {overrides}" if local else
            f"bash experiments/gpu/run.sh {name} {CONFIG} {overrides}")
  return commands


def protocol_differences(config: dict[str, Any]) -> list[str]:
  """The keys of a run's saved config (config.json) that depart from the paper's CIFAR-10
  protocol."""
  paper = flatten(json.loads(default_config().to_json_best_effort()))
  # A key the run's (older) schema lacks had its default then.
  return sorted(key for key, value in flatten(config).items()
                if key not in FREE_KEYS and (key not in paper or paper[key] != value))


def collect(folders: list[pathlib.Path]) -> dict[tuple[str, str, float], list[dict[str, Any]]]:
  """(method, noise kind, rate) -> the finished Table I runs under `folders`; others are named on
  stderr and left out."""
  cells: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
  for folder in folders:
    for path in sorted(folder.rglob("results.json")):
      config = json.loads((path.parent / "config.json").read_text())
      differences = protocol_differences(config)
      if config["noise"]["kind"] not in KINDS:
        differences.append(f"noise.kind={config['noise']['kind']!r}")
      if differences:
        print(f"skipped {path.parent}: not the paper's CIFAR-10 protocol (differs in "
              f"{', '.join(differences)})", file=sys.stderr)
        continue
      result = json.loads(path.read_text())
      key = (result["method"], result["noise"]["kind"], round(result["noise"]["rate"], 4))
      cells.setdefault(key, []).append(result)
  return cells


def assemble(folders: list[pathlib.Path], command: str, out: pathlib.Path = RESULTS
             ) -> pathlib.Path:
  cells = collect(folders)
  if not cells:
    raise FileNotFoundError(f"No Table I run (results.json of the paper's CIFAR-10 protocol) under "
                            f"{[str(f) for f in folders]}.")
  some = next(iter(cells.values()))[0]
  dtypes = sorted({r.get("compute_dtype", "float32") for runs in cells.values() for r in runs})
  lines = [
      "# Table I — CIFAR-10 test accuracy (%), mean ± std over seeds", "",
      f"- assembled: {datetime.date.today().isoformat()}",
      f"- device: {some['device']} (JAX {some['jax_version']}, {' and '.join(dtypes)})",
      f"- commits: {', '.join(sorted({r['commit'] for runs in cells.values() for r in runs}))}",
      f"- command: `{command}`", "",
      "Each cell: ours at the best meta epoch / ours at the last epoch (paper), then seeds and the "
      "realised noise rate.", "",
      "| method | noise | " + " | ".join(f"{round(100 * r)}%" for r in RATES) + " |",
      "|---|---|" + "---|" * len(RATES),
  ]
  table: dict[str, Any] = {}
  rows = list(methods.resolve("table1"))
  rows += [m for m in methods.names() if m not in rows and any(k[0] == m for k in cells)]
  for method in rows:
    for kind in KINDS:
      row = []
      for rate, paper in zip(RATES, paper_row(method).get(kind, ["n/a"] * len(RATES))):
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
  lines += ["", "Figures per noise setting in `table1_figures/`: test accuracy per epoch of every "
            "method with the end of a warm-up marked (`*_accuracy.png`, the paper's Figure 3) and "
            "soft-label stability of the methods with soft labels (`*_soft_labels.png`, Figure 4's "
            "idea)."]
  for kind in KINDS:
    for rate in RATES:
      by_method = {m: cells[(m, kind, round(rate, 4))] for m in rows
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
  plan_parser.add_argument("--methods", default="table1",
                           help="config.method names or groups (default: Table I's rows)")
  plan_parser.add_argument("--local", default="",
                           help="folder for local runs (else the GPU script)")
  plan_parser.add_argument("--data_dir", default="../shared/data/cifar10",
                           help="the CIFAR-10 pack, for --local commands")
  assemble_parser = commands.add_parser("assemble", help="write experiments/results/table1.md")
  assemble_parser.add_argument("--results", type=pathlib.Path, action="append", required=True)
  assemble_parser.add_argument("--command", required=True, help="how the runs were made")
  assemble_parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  args = parser.parse_args()
  if args.command_name == "plan":
    print("\n".join(plan(args.seeds, args.local, args.data_dir, args.methods)))
  else:
    print(assemble(args.results, args.command, args.out))


if __name__ == "__main__":
  main()
