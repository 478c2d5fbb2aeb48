"""Writes runs' results as a record under experiments/results/: device, date, commit and the exact
command beside every number; with several workdirs (e.g. seeds), also mean ± std per method.

Every results.json under each workdir counts (one run, `<method>/` for `method=both`, `run_<i>/` for
`num_runs`), grouped by method.

  python experiments/record.py --name=digits --command="..." --workdir=/tmp/a --workdir=/tmp/b
"""

import argparse
import datetime
import json
import pathlib
import shutil
import statistics

from mln_jax import cross_fit, figures as figures_lib, report, runtime

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def load_runs(workdir: pathlib.Path) -> dict[str, dict]:
  """Every finished run under `workdir` (any layout: one run, `<method>/`, `run_<i>/`, both; found
  as `python -m mln_jax.report` finds them): its path -> its results.json."""
  return {str(run): json.loads((run / "results.json").read_text())
          for run in report.finished_runs(workdir)
          # A cross-fit's half runs are parts of an out-of-sample score, not runs of their own.
          if runtime.CROSS_FIT_DIR not in run.relative_to(workdir).parts}


def mean_std(values: list[float], separator: str = " ± ") -> str:
  """Accuracies (fractions) as 'mean ± std' in percent; a single run has no spread to show."""
  values = [100 * v for v in values]
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{statistics.mean(values):.2f}{separator}{statistics.stdev(values):.2f}"


def cross_fit_reports(workdir: pathlib.Path) -> dict[str, dict]:
  """Every cross-fit under `workdir` (config.label_issues.cross_fit): its folder -> its
  label_issues.json."""
  return {str(p.parent): json.loads(p.read_text())
          for p in sorted(workdir.rglob(f"{runtime.CROSS_FIT_DIR}/**/{cross_fit.REPORT_FILE}"))}


def copy_reports(runs: dict[str, dict], folder: pathlib.Path) -> list[pathlib.Path]:
  """Each run's report (mln_jax.report, written again from its workdir) copied into
  `folder/<i>_<method>/`: its figures and summary.md."""
  copied = []
  for index, path in enumerate(runs):
    report.write_run_report(path)
    target = folder / f"{index}_{runs[path]['method']}"
    target.mkdir(parents=True, exist_ok=True)
    for file in [pathlib.Path(path, report.SUMMARY_FILE),
                 *sorted(pathlib.Path(path, report.FIGURES_DIR).glob("*.png"))]:
      destination = target / file.relative_to(path)
      destination.parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(file, destination)
    copied.append(target)
  return copied


def record(workdirs: list[pathlib.Path], name: str, command: str, note: str,
           figures: bool = False, reports: bool = False) -> pathlib.Path:
  runs = {path: r for w in workdirs for path, r in load_runs(w).items()}
  first = next(iter(runs.values()))
  kind, rate = first["noise"]["kind"], first["noise"].get("rate")
  rate = "" if rate is None else f" {rate}"  # 'given' and 'none' noise have no rate
  lines = [
      f"# {name}", "",
      f"- date: {datetime.date.today().isoformat()}",
      f"- device: {first['device']} (JAX {first['jax_version']})",
      f"- commit: {first['commit']}",
      f"- command: `{command}`",
      f"- noise: {kind}{rate}", "",
      "Times are those of the program a run was part of (runs trained together share one).", "",
      "| run | method | realised noise | test acc at best meta epoch | best epoch "
      "| last-epoch test acc | epochs time (s) | wall time (s) |",
      "|---|---|---|---|---|---|---|---|",
  ]
  by_method: dict[str, list[dict]] = {}
  for path, r in runs.items():
    # Runs with the authors' double BatchNorm update form their own group.
    method = r["method"] + (" (reference_batch_norm)" if r.get("reference_batch_norm") else "")
    by_method.setdefault(method, []).append(r)
    realised = r["noise"].get("realised_rate")  # unknown where no clean training label is
    lines.append(f"| {path} | {method} | {'—' if realised is None else f'{realised:.4f}'} "
                 f"| {100 * r['best']['test_accuracy']:.2f} | {r['best']['epoch']} "
                 f"| {100 * r['last']['test_accuracy']:.2f} | {r['epochs_time_s']:.1f} "
                 f"| {r['wall_time_s']:.1f} |")
  issues = [(path, r["label_issues"]) for path, r in runs.items() if r.get("label_issues")]
  if issues:
    lines += ["", "Label errors flagged by MetaLabelNet's soft labels, against the clean labels:",
              "",
              "| run | wrong labels | top-k precision = recall | argmax-flag precision | "
              "argmax-flag recall |", "|---|---|---|---|---|"]
    for path, i in issues:
      lines.append(f"| {path} | {i['wrong_labels']} of {i['labelled']} "
                   f"| {100 * i.get('top_k_precision', 0.0):.2f} "
                   f"| {100 * i['argmax_precision']:.2f} | {100 * i['argmax_recall']:.2f} |")
  fitted = {path: r for w in workdirs for path, r in cross_fit_reports(w).items()}
  if fitted:
    lines += ["", "Cross-fitted (out-of-sample) soft labels against in-sample ones (the run on all "
              "the data; each half's run on its own half), top-k precision:", "",
              "| cross-fit | method | out of sample | in sample, the run | in sample, the halves "
              "| gallery out of sample |", "|---|---|---|---|---|---|"]
    for path, r in fitted.items():
      # The run whose data was cross-fitted: the same path without cross_fit/.
      run = str(pathlib.Path(*[p for p in pathlib.Path(path).parts
                               if p != runtime.CROSS_FIT_DIR]))
      own = runs.get(run, {}).get("label_issues") or {}
      found = r["label_issues"] or {}
      # The halves' runs: cross_fit/half_<h>/ beside a one-run cross-fit, half_<h>/run_<i>/ else.
      fitted_dir = pathlib.Path(path)
      base, suffix = ((fitted_dir.parent, fitted_dir.name)
                      if fitted_dir.name != runtime.CROSS_FIT_DIR else (fitted_dir, ""))
      halves = [json.loads(p.read_text()).get("label_issues") or {}
                for p in sorted(base.glob(f"half_*/{suffix}/results.json".replace("//", "/")))]
      halves_precision = (mean_std([h.get("top_k_precision", 0.0) for h in halves]) if halves
                          else "—")
      lines.append(f"| {path} | {r['method']} | {100 * found.get('top_k_precision', 0.0):.2f} "
                   f"| {100 * own.get('top_k_precision', 0.0):.2f} | {halves_precision} "
                   f"| {100 * (r.get('gallery_precision') or 0.0):.2f} |")
  if any(len(results) > 1 for results in by_method.values()):
    lines += ["", "| method | runs | best-by-meta test acc (mean ± std) | last-epoch test acc |",
              "|---|---|---|---|"]
    for method, results in by_method.items():
      lines.append(f"| {method} | {len(results)} "
                   f"| {mean_std([r['best']['test_accuracy'] for r in results])} "
                   f"| {mean_std([r['last']['test_accuracy'] for r in results])} |")
  if figures:
    figures_lib.setting_figures(by_method, RESULTS / f"{name}_figures", name,
                                f"{first['dataset']}, {kind} noise{rate}")
    lines += ["", f"Figures in `{name}_figures/`: test accuracy per epoch (`{name}_accuracy.png`, "
              "the end of the warm-up marked) and, for MetaLabelNet, soft-label stability "
              f"(`{name}_soft_labels.png`)."]
  if reports:
    copied = copy_reports(runs, RESULTS / f"{name}_report")
    lines += ["", "Each run's report (figures and summary.md, as `python -m mln_jax.report` "
              f"writes them into its workdir) in `{name}_report/`: "
              + ", ".join(f"`{p.name}/`" for p in copied) + "."]
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
  parser.add_argument("--figures", action="store_true",
                      help="also draw accuracy per epoch and soft-label stability")
  parser.add_argument("--reports", action="store_true",
                      help="also copy each run's report (figures, summary.md) into the record")
  args = parser.parse_args()
  print(record(args.workdir, args.name, args.command, args.note, args.figures, args.reports))
