"""Writes runs' results as a record under experiments/results/: device, date, commit and the exact
command beside every number; with several workdirs (e.g. seeds), also mean ± std per method.

A workdir holds `results.json` (one method) or `<method>/results.json` sub-folders (`method=both`).

  python experiments/record.py --name=digits --command="..." --workdir=/tmp/a --workdir=/tmp/b
"""

import argparse
import datetime
import json
import pathlib
import statistics

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def load_runs(workdir: pathlib.Path) -> dict[str, dict]:
  """Method name -> results.json contents for one workdir."""
  if (workdir / "results.json").exists():
    results = json.loads((workdir / "results.json").read_text())
    return {results["method"]: results}
  runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(workdir.glob("*/results.json"))}
  if not runs:
    raise FileNotFoundError(f"No results.json in {workdir} or its sub-folders: has the run finished?")
  return runs


def _mean_std(values: list[float]) -> str:
  values = [100 * v for v in values]
  spread = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def record(workdirs: list[pathlib.Path], name: str, command: str, note: str) -> pathlib.Path:
  runs = {str(w): load_runs(w) for w in workdirs}
  first = next(iter(next(iter(runs.values())).values()))
  lines = [
      f"# {name}", "",
      f"- date: {datetime.date.today().isoformat()}",
      f"- device: {first['device']} (JAX {first['jax_version']})",
      f"- commit: {first['commit']}",
      f"- command: `{command}`",
      f"- noise: {first['noise']['kind']} {first['noise']['rate']}", "",
      "| run | method | realised noise | test acc at best meta epoch | best epoch | last-epoch test acc "
      "| train time (s) | wall time (s) |",
      "|---|---|---|---|---|---|---|---|",
  ]
  by_method: dict[str, list[dict]] = {}
  for workdir, methods in runs.items():
    for method, r in methods.items():
      by_method.setdefault(method, []).append(r)
      lines.append(f"| {workdir} | {method} | {r['noise']['realised_rate']:.4f} "
                   f"| {100 * r['best']['test_accuracy']:.2f} | {r['best']['epoch']} "
                   f"| {100 * r['last']['test_accuracy']:.2f} | {r['train_time_s']:.1f} "
                   f"| {r['wall_time_s']:.1f} |")
  issues = [(w, r["label_issues"]) for w, methods in runs.items() for r in methods.values()
            if r.get("label_issues")]
  if issues:
    lines += ["", "Label errors flagged by MetaLabelNet's soft labels, against the clean labels:", "",
              "| run | wrong labels | top-k precision = recall | argmax-flag precision | "
              "argmax-flag recall |", "|---|---|---|---|---|"]
    for workdir, i in issues:
      lines.append(f"| {workdir} | {i['wrong_labels']} of {i['labelled']} "
                   f"| {100 * i.get('top_k_precision', 0.0):.2f} "
                   f"| {100 * i['argmax_precision']:.2f} | {100 * i['argmax_recall']:.2f} |")
  if len(workdirs) > 1:
    lines += ["", "| method | runs | best-by-meta test acc (mean ± std) | last-epoch test acc |",
              "|---|---|---|---|"]
    for method, results in by_method.items():
      lines.append(f"| {method} | {len(results)} "
                   f"| {_mean_std([r['best']['test_accuracy'] for r in results])} "
                   f"| {_mean_std([r['last']['test_accuracy'] for r in results])} |")
  if note:
    lines += ["", note]
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / f"{name}.json").write_text(json.dumps(runs, indent=2))
  path = RESULTS / f"{name}.md"
  path.write_text("\n".join(lines) + "\n")
  return path


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, type=pathlib.Path, action="append",
                      help="a finished run's workdir; repeat for several runs")
  parser.add_argument("--name", required=True, help="file name under experiments/results/")
  parser.add_argument("--command", required=True, help="the exact command that made the runs")
  parser.add_argument("--note", default="", help="a closing remark for the record")
  args = parser.parse_args()
  print(record(args.workdir, args.name, args.command, args.note))
