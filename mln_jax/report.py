"""What a finished run found, written into its folder: figures, the label-issue table, a gallery of
the flagged images and a summary.

Every finished run writes these itself (`config.report`, on by default); for any finished workdir
(every method, in memory or streamed, one run, several seeds or several methods):

  python -m mln_jax.report --workdir=W [--gallery_size=32]

Per run folder (the one with results.json):
- `figures/accuracy.png`: train, meta and test accuracy per epoch, the first phase's end (the
  warm-up) and the best-by-meta epoch marked;
- `figures/soft_labels.png` (methods that generate labels, in-memory datasets, where they are
  tracked per epoch): agreement of the argmax soft labels with the given labels (and the clean
  labels where known) and the share that changed;
- `figures/confusion.png` (methods that generate labels): given vs corrected label, and beside it,
  where clean labels are known, the realised noise transition matrix;
- `label_issues.csv` (methods with soft labels or label-issue scores): a row per training sample,
  most suspicious first: its index, image file (streamed runs), given label, suggested label
  (argmax soft label), score, and the clean label where known;
- `figures/label_issues.png`: the top-k flagged images, given → suggested class above each (green:
  the given label is truly wrong, red: it was right, where clean labels are known);
- `summary.md`, which ties them together.

The label-issue score is 1 − ŷ[given] (soft labels) or the method's own score (sample weights,
selections); ties keep sample order, unlabelled samples come last.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import sys
from typing import Any, Callable, Sequence

from absl import app, flags
import ml_collections
import numpy as np

from mln_jax import config as config_lib, data as data_lib, figures, runtime

FIGURES_DIR = "figures"
CSV_FILE = "label_issues.csv"
SUMMARY_FILE = "summary.md"
SOFT_LABELS_FILE = "soft_labels.npz"
SCORES_FILE = "label_issue_scores.npy"
LABELS_FILE = "labels.npz"
# Gallery thumbnails of streamed images: the longer side, in pixels.
THUMBNAIL_SIZE = 160


@dataclasses.dataclass(frozen=True, eq=False)
class LabelIssues:
  """A run's per-sample verdict on its training labels, in sample order.

  Attributes:
    given: the given (noisy) labels, −1 where unlabelled.
    clean: the true labels, −1 where unknown.
    scores: the label-issue scores (higher: more likely wrong), NaN where unlabelled.
    suggested: the argmax soft labels; None for a method that scores samples without labels.
    soft_labels: the soft labels (N, C) or None, as `suggested`.
    image_files: each sample's image file (streamed datasets), else None.
  """
  given: np.ndarray
  clean: np.ndarray
  scores: np.ndarray
  suggested: np.ndarray | None
  soft_labels: np.ndarray | None
  image_files: np.ndarray | None

  @property
  def clean_known(self) -> bool:
    return bool(np.any(self.clean >= 0))

  def ranking(self) -> np.ndarray:
    """Sample indices by decreasing score (ties in sample order), unscored samples last."""
    scored = np.flatnonzero(~np.isnan(self.scores))
    order = scored[np.argsort(-self.scores[scored], kind="stable")]
    return np.concatenate([order, np.flatnonzero(np.isnan(self.scores))])


def _load_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    with np.load(path) as arrays:
      return dict(arrays)
  except (OSError, ValueError) as error:
    raise ValueError(f"{path} cannot be read ({error}); rerun the run's command to rewrite it, or "
                     "delete its results.json to redo the final pass.") from error


def load_label_issues(run_dir: str | os.PathLike[str]) -> LabelIssues | None:
  """The run's label issues from soft_labels.npz (methods with soft labels) or
  label_issue_scores.npy with labels.npz (methods that score samples); None for a method with
  neither (e.g. cross-entropy)."""
  run_dir = pathlib.Path(run_dir)
  if (run_dir / SOFT_LABELS_FILE).exists():
    arrays = _load_npz(run_dir / SOFT_LABELS_FILE)
    return LabelIssues(given=arrays["given_label"], clean=arrays["clean_label"],
                       scores=arrays["label_issue_score"].astype(np.float64),
                       suggested=arrays["soft_argmax"], soft_labels=arrays["soft_label"],
                       image_files=arrays.get("image_file"))
  if (run_dir / SCORES_FILE).exists():
    labels = _load_npz(run_dir / LABELS_FILE)
    scores = np.load(run_dir / SCORES_FILE).astype(np.float64)
    given = labels["noisy"]
    if len(scores) != len(given):
      raise ValueError(f"{run_dir / SCORES_FILE} has {len(scores)} scores for {len(given)} "
                       f"training samples in {run_dir / LABELS_FILE}: files of different runs?")
    scores[given < 0] = np.nan
    return LabelIssues(given=given, clean=labels["clean"], scores=scores, suggested=None,
                       soft_labels=None, image_files=labels.get("image_file"))
  return None


def _class_name(class_names: Sequence[str], label: int) -> str:
  if label < 0:
    return ""
  return class_names[label] if label < len(class_names) else str(label)


def write_label_issues_csv(path: str | os.PathLike[str], issues: LabelIssues,
                           class_names: Sequence[str]) -> pathlib.Path:
  """`label_issues.csv`: a row per training sample, most suspicious first (see the module
  docstring); empty cells where a value does not exist (no suggestion, unknown clean label)."""
  path = pathlib.Path(path)
  columns = ["rank", "sample_index"] + (["image_file"] if issues.image_files is not None else [])
  columns += ["given_label", "given_class", "suggested_label", "suggested_class",
              "label_issue_score"]
  if issues.clean_known:
    columns += ["clean_label", "clean_class", "given_label_is_wrong"]
  with open(path, "w", newline="") as file:
    writer = csv.writer(file)
    writer.writerow(columns)
    for rank, index in enumerate(issues.ranking(), 1):
      given = int(issues.given[index])
      row: list[Any] = [rank, int(index)]
      if issues.image_files is not None:
        row.append(str(issues.image_files[index]))
      row += [given if given >= 0 else "", _class_name(class_names, given)]
      if issues.suggested is None:
        row += ["", ""]
      else:
        suggested = int(issues.suggested[index])
        row += [suggested, _class_name(class_names, suggested)]
      score = issues.scores[index]
      row.append("" if np.isnan(score) else f"{score:.6f}")
      if issues.clean_known:
        clean = int(issues.clean[index])
        known = clean >= 0 and given >= 0
        row += [clean if clean >= 0 else "", _class_name(class_names, clean),
                int(given != clean) if known else ""]
      writer.writerow(row)
  return path


def _read_image(file: str) -> np.ndarray:
  from PIL import Image  # only where a gallery of files is drawn
  try:
    with Image.open(file) as image:
      image = image.convert("RGB")
      image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
      return np.asarray(image)
  except OSError as error:
    raise ValueError(f"Gallery image {file} cannot be read: {error}") from error


def gallery_images(run_dir: str | os.PathLike[str], issues: LabelIssues, indices: np.ndarray,
                   train_images: np.ndarray | None = None) -> list[np.ndarray]:
  """The training images at `indices`: from `train_images` where given (the loop passes its own),
  from the image files of a streamed run, or by loading the in-memory dataset the run's
  config.json names."""
  if train_images is not None:
    return [train_images[i] for i in indices]
  if issues.image_files is not None:
    return [_read_image(str(issues.image_files[i])) for i in indices]
  config = ml_collections.ConfigDict(runtime.read_json(os.path.join(run_dir, "config.json")))
  if config.data.name not in config_lib.IN_MEMORY_DATASETS:
    raise ValueError(f"{run_dir}: the run's soft labels name no image files and its dataset "
                     f"{config.data.name!r} is not one held in memory; cannot draw the gallery.")
  images = data_lib.load_dataset(config.data).train_images
  if len(images) != len(issues.given):
    raise ValueError(f"{run_dir}: the dataset its config names now has {len(images)} training "
                     f"images, the run had {len(issues.given)}; has the data changed?")
  return [images[i] for i in indices]


def _short(name: str, width: int = 11) -> str:
  return name if len(name) <= width else name[:width - 1] + "…"


def gallery_precision(issues: LabelIssues, top: np.ndarray) -> float | None:
  """The share of the `top` samples whose given label is truly wrong (None where no clean label
  is known among them)."""
  known = top[issues.clean[top] >= 0]
  if not len(known):
    return None
  return float(np.mean(issues.given[known] != issues.clean[known]))


def write_gallery(path: pathlib.Path, run_dir: str | os.PathLike[str], issues: LabelIssues,
                  class_names: Sequence[str], size: int, title: str,
                  train_images: np.ndarray | None = None) -> tuple[pathlib.Path, np.ndarray]:
  """The `size` highest-scored labelled samples as a captioned grid; returns the file and the
  samples drawn (in rank order)."""
  ranking = issues.ranking()
  top = ranking[:min(size, int(np.sum(~np.isnan(issues.scores))))]
  captions, highlight = [], []
  for index in top:
    given = _short(_class_name(class_names, int(issues.given[index])))
    suggested = ("?" if issues.suggested is None
                 else _short(_class_name(class_names, int(issues.suggested[index]))))
    captions.append(f"#{index} {issues.scores[index]:.2f}\n{given} → {suggested}")
    clean = int(issues.clean[index])
    highlight.append(None if clean < 0 else bool(issues.given[index] != clean))
  images = gallery_images(run_dir, issues, top, train_images)
  return figures.image_gallery(images, captions, path, title, highlight), top


def _percent(value: float | None) -> str:
  return "—" if value is None else f"{100 * value:.2f}%"


def _summary(results: dict[str, Any], issues: LabelIssues | None, files: dict[str, pathlib.Path],
             run_dir: pathlib.Path, class_names: Sequence[str], top: np.ndarray | None
             ) -> str:
  noise = results["noise"]
  rate = "" if noise.get("rate") is None else f" at rate {noise['rate']}"
  realised = ("unknown (no clean training labels)" if noise.get("realised_rate") is None
              else f"{100 * noise['realised_rate']:.2f}% of {noise['measured_on']} samples")
  best, last = results["best"], results["last"]
  lines = [
      f"# {results['method']} on {results['dataset']}", "",
      f"- data: {results['num_train']} training images ({results['num_labelled']} labelled), "
      f"{results['num_meta']} meta, {results['num_classes']} classes; seed {results['seed']}",
      f"- noise: {noise['kind']}{rate}"
      + (f" ({noise['human_label']} labels from {noise.get('labels_from')})"
         if noise.get("human_label") else "") + f"; realised noise {realised}",
      f"- test accuracy at the best meta epoch ({best['epoch']}): "
      f"{_percent(best['test_accuracy'])} (meta {_percent(best['meta_accuracy'])}); at the "
      f"last epoch ({last['epoch']}): {_percent(last['test_accuracy'])}",
      f"- run: {results.get('device', '?')}, JAX {results.get('jax_version', '?')}, commit "
      f"{results.get('commit', '?')}, {results['epochs_time_s']:.0f} s of epochs",
  ]
  found = results.get("label_issues")
  if found:
    lines.append(f"- label issues against the clean labels ({found['measured_on']} samples, "
                 f"{found['wrong_labels']} wrong): top-k precision = recall "
                 f"{_percent(found.get('top_k_precision'))}" +
                 (f"; argmax flags {found['argmax_flagged']}, precision "
                  f"{_percent(found['argmax_precision'])}, recall "
                  f"{_percent(found['argmax_recall'])}" if "argmax_flagged" in found else ""))
  lines += ["", "## Figures", ""]
  for key, caption in (("accuracy", "Accuracy per epoch"),
                       ("noise", "Realised noise transition matrix"),
                       ("soft_labels", "Soft labels per epoch"),
                       ("confusion", "Given vs corrected labels")):
    if key in files:
      lines += [f"![{caption}]({files[key].relative_to(run_dir).as_posix()})", ""]
  if issues is None:
    lines += [f"No label_issues.csv: the run wrote neither {SOFT_LABELS_FILE} nor {SCORES_FILE} "
              "(a method without a per-sample verdict on its labels, or "
              "config.export_soft_labels=False)."]
    return "\n".join(lines) + "\n"
  lines += ["## Label issues", "",
            f"[`{CSV_FILE}`]({CSV_FILE}): every training sample, most suspicious first."]
  if "gallery" in files and top is not None:
    precision = gallery_precision(issues, top)
    lines += ["", f"![The {len(top)} most suspicious labels]"
                  f"({files['gallery'].relative_to(run_dir).as_posix()})", "",
              f"The {len(top)} most suspicious labels" +
              ("" if precision is None else
               f": {_percent(precision)} of them are truly wrong (green)") + "."]
  ranking = issues.ranking()[:10]
  lines += ["", "| rank | sample | given | suggested | score |", "|---|---|---|---|---|"]
  for rank, index in enumerate(ranking, 1):
    if np.isnan(issues.scores[index]):
      break
    suggested = ("" if issues.suggested is None
                 else _class_name(class_names, int(issues.suggested[index])))
    lines.append(f"| {rank} | {index} | {_class_name(class_names, int(issues.given[index]))} "
                 f"| {suggested} | {issues.scores[index]:.4f} |")
  return "\n".join(lines) + "\n"


def write_run_report(run_dir: str | os.PathLike[str], results: dict[str, Any] | None = None,
                     gallery_size: int | None = None, train_images: np.ndarray | None = None
                     ) -> dict[str, pathlib.Path]:
  """Writes one finished run's figures, label_issues.csv, gallery and summary.md into `run_dir`
  (see the module docstring); returns what it wrote by name.

  Args:
    run_dir: the folder with the run's results.json.
    results: its results (read from results.json when not given).
    gallery_size: how many flagged images the gallery shows (default: the run's
      `config.label_issues.gallery_size`; 0: no gallery).
    train_images: the training images in sample order, where the caller holds them (else they are
      read from the image files or the dataset the run's config names).
  """
  run_dir = pathlib.Path(run_dir)
  results_path = run_dir / runtime.RESULTS_FILE
  if results is None:
    if not results_path.exists():
      raise FileNotFoundError(f"No {runtime.RESULTS_FILE} in {run_dir}: has the run finished?")
    results = runtime.read_json(str(results_path))
  if gallery_size is None:
    saved = runtime.read_json(str(run_dir / "config.json"))
    gallery_size = saved.get("label_issues", {}).get("gallery_size", 32)
  issues = load_label_issues(run_dir)
  class_names = list(results.get("class_names") or
                     [str(i) for i in range(results["num_classes"])])
  figure_dir = run_dir / FIGURES_DIR
  files = {"accuracy": figures.run_accuracy(results, figure_dir / "accuracy.png")}
  noise = results["noise"]
  if noise.get("transition_counts"):
    files["noise"] = figures.noise_transition(
        noise["transition_counts"], class_names, figure_dir / "noise_transition.png",
        f"{results['dataset']}, {noise['kind']} noise"
        + (f" ({noise['human_label']})" if noise.get("human_label") else "")
        + f": realised rate {100 * noise['realised_rate']:.2f}%")
  clean_known = noise.get("realised_rate") is not None
  if any("soft_labels/given_agreement" in r for r in results["history"]):
    files["soft_labels"] = figures.run_soft_labels(results, figure_dir / "soft_labels.png",
                                                   clean_known)
  top = None
  if issues is not None:
    if issues.suggested is not None:
      files["confusion"] = figures.label_confusion(
          issues.given, issues.suggested, issues.clean if issues.clean_known else None,
          class_names, figure_dir / "confusion.png",
          f"{results['method']} on {results['dataset']}")
    files["csv"] = write_label_issues_csv(run_dir / CSV_FILE, issues, class_names)
    if gallery_size > 0 and np.any(~np.isnan(issues.scores)):
      files["gallery"], top = write_gallery(
          figure_dir / "label_issues.png", run_dir, issues, class_names, gallery_size,
          f"{results['method']} on {results['dataset']}: the most suspicious labels "
          "(#sample score, given → suggested)", train_images)
  summary = run_dir / SUMMARY_FILE
  # Written last and whole (it marks a complete report: a run stopped before it redoes it).
  partial = summary.with_suffix(".md.tmp")
  partial.write_text(_summary(results, issues, files, run_dir, class_names, top))
  os.replace(partial, summary)
  files["summary"] = summary
  return files


def finished_runs(workdir: str | os.PathLike[str]) -> list[pathlib.Path]:
  """Every finished run folder under `workdir` (itself, `<method>/`, `run_<i>/`, both); not the
  half runs of a cross-fit (they wrote their reports when they finished, and are parts of one
  out-of-sample score, not runs of their own)."""
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise FileNotFoundError(f"--workdir={workdir} is not a folder.")
  runs = sorted(p.parent for p in workdir.rglob(runtime.RESULTS_FILE)
                if runtime.CROSS_FIT_DIR not in p.relative_to(workdir).parts)
  if not runs:
    raise FileNotFoundError(f"No {runtime.RESULTS_FILE} under {workdir}: has the run finished?")
  return runs


def write_report(workdir: str | os.PathLike[str], gallery_size: int | None = None,
                 log: Callable[[str], None] = print) -> dict[pathlib.Path, dict[str, pathlib.Path]]:
  """`write_run_report` for every finished run under `workdir`; run folder -> files written. A run
  whose report fails does not stop the others: its error is logged, and raised (as a ValueError
  naming every failed run) once all were tried."""
  written, failed = {}, []
  for run_dir in finished_runs(workdir):
    try:
      written[run_dir] = write_run_report(run_dir, gallery_size=gallery_size)
    except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError) as error:
      failed.append(f"{run_dir}: {error!r}")
      log(f"{run_dir}: failed: {error}")
      continue
    log(f"{run_dir}: " + ", ".join(str(p.relative_to(run_dir))
                                   for p in written[run_dir].values()))
  if failed:
    raise ValueError(f"{len(failed)} of {len(failed) + len(written)} reports failed: "
                     + "; ".join(failed))
  return written


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    write_report(flags.FLAGS.workdir, flags.FLAGS.gallery_size)
  except (FileNotFoundError, ValueError, json.JSONDecodeError) as error:
    print(f"error: {error}", file=sys.stderr)  # a user's mistake: the message, not a traceback
    sys.exit(2)


if __name__ == "__main__":
  # Defined here, not on import: the training loop imports this module beside main.py's flags.
  flags.DEFINE_string("workdir", None, "a finished run's workdir", required=True)
  flags.DEFINE_integer("gallery_size", None, "flagged images in the gallery (default: each run's "
                       "config.label_issues.gallery_size)")
  app.run(main)
