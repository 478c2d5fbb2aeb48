"""Writes a run's results (workdir/results.json, or the comparison of a `method=both` run) as a record
under experiments/results/: device, date, commit and the exact command beside every number.

  python experiments/record.py --workdir=/tmp/mln_digits --name=digits \
      --command="python -m mln_jax.main --config=configs/digits.py --workdir=/tmp/mln_digits"
"""

import argparse
import datetime
import json
import pathlib

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _runs(workdir: pathlib.Path) -> dict[str, dict]:
  if (workdir / "results.json").exists():
    results = json.loads((workdir / "results.json").read_text())
    return {results["method"]: results}
  runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(workdir.glob("*/results.json"))}
  if not runs:
    raise FileNotFoundError(f"No results.json in {workdir} or its sub-folders: has the run finished?")
  return runs


def record(workdir: pathlib.Path, name: str, command: str, note: str) -> pathlib.Path:
  runs = _runs(workdir)
  first = next(iter(runs.values()))
  lines = [
      f"# {name}", "",
      f"- date: {datetime.date.today().isoformat()}",
      f"- device: {first['device']} (JAX {first['jax_version']})",
      f"- commit: {first['commit']}",
      f"- command: `{command}`",
      f"- noise: {first['noise']['kind']} {first['noise']['rate']}, realised rate "
      f"{first['noise']['realised_rate']:.4f}", "",
      "| method | test acc at best meta epoch | best epoch | last-epoch test acc | train time (s) "
      "| wall time (s) |",
      "|---|---|---|---|---|---|",
  ]
  for method, r in runs.items():
    lines.append(f"| {method} | {100 * r['best']['test_accuracy']:.2f} | {r['best']['epoch']} "
                 f"| {100 * r['last']['test_accuracy']:.2f} | {r['train_time_s']:.1f} "
                 f"| {r['wall_time_s']:.1f} |")
  if note:
    lines += ["", note]
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / f"{name}.json").write_text(json.dumps(runs, indent=2))
  path = RESULTS / f"{name}.md"
  path.write_text("\n".join(lines) + "\n")
  return path


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, type=pathlib.Path)
  parser.add_argument("--name", required=True, help="file name under experiments/results/")
  parser.add_argument("--command", required=True, help="the exact command that made the run")
  parser.add_argument("--note", default="", help="a closing remark for the record")
  args = parser.parse_args()
  print(record(args.workdir, args.name, args.command, args.note))
