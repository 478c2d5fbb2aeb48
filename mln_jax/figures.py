"""Figures from finished runs (matplotlib, written as PNG).

Over several runs (experiments/record.py, table1.py, ablations.py):
- `accuracy_curves`: test accuracy per epoch, mean ± std over seeds, one line per method, the end of
  the warm-up marked (the paper's Figure 3);
- `soft_label_stability`: per phase-2 epoch, the share of training samples whose argmax soft label
  changed since the previous epoch, and the agreement of argmax soft labels with the clean and the
  given labels (the idea of the paper's Figure 4);
- `ablation_curve`: test accuracy (best-by-meta and last epoch) against an ablated setting.

Of one run (`mln_jax.report`, into its workdir's figures/):
- `run_accuracy`: train, meta and test accuracy per epoch, the warm-up's end and the best-by-meta
  epoch marked;
- `run_soft_labels`: per epoch, agreement of argmax soft labels with the given (and the clean)
  labels and the share that changed;
- `label_confusion`: given vs corrected label, and beside it the realised noise transition matrix;
- `noise_transition`: the realised noise transition matrix alone (from results.json's counts);
- `image_gallery`: images with a caption above each.
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import numpy as np
# Figures drawn without pyplot: importing mln_jax leaves a user's backend (a notebook's) alone.
from matplotlib.figure import Figure

from mln_jax import noise as noise_lib

Results = dict[str, Any]


def per_epoch(runs: Sequence[Results], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Epochs (1-based) where every run has `key`, and its mean and std over the runs."""
  epochs = sorted(set.intersection(*[{r["epoch"] for r in run["history"] if key in r}
                                     for run in runs]))
  values = np.array([[next(r[key] for r in run["history"] if r["epoch"] == e) for e in epochs]
                     for run in runs])
  return np.array(epochs), values.mean(0), values.std(0)


def _band(axis: Any, x: np.ndarray, mean: np.ndarray, std: np.ndarray, label: str) -> None:
  line, = axis.plot(x, 100 * mean, label=label)
  axis.fill_between(x, 100 * (mean - std), 100 * (mean + std), color=line.get_color(), alpha=0.2)


def warmup_epochs_of(runs: Sequence[Results]) -> int | None:
  """How many epochs the first phase of the runs' method had (MetaLabelNet's warm-up); None for a
  method of one phase, runs that disagree, or no runs."""
  def first_phase_length(run: Results) -> int | None:
    phases = [r["phase"] for r in run["history"]]
    changes = [i for i, phase in enumerate(phases) if phase != phases[0]]
    return changes[0] if changes else None

  counts = {first_phase_length(run) for run in runs}
  return counts.pop() if len(counts) == 1 else None


def has_soft_labels(runs: Sequence[Results]) -> bool:
  """Whether the runs recorded soft-label statistics per epoch (a method with soft labels)."""
  return bool(runs) and all(any("soft_labels/clean_agreement" in r for r in run["history"])
                            for run in runs)


def accuracy_curves(runs_by_method: dict[str, Sequence[Results]], warmup_epochs: int | None,
                    path: pathlib.Path, title: str) -> pathlib.Path:
  """Figure 3: test accuracy per epoch for each method (mean ± std over its runs), the end of the
  warm-up marked (where there was one)."""
  figure, axis = _subplots(figsize=(6, 4))
  for method, runs in runs_by_method.items():
    epochs, mean, std = per_epoch(runs, "test_accuracy")
    _band(axis, epochs, mean, std, f"{method} (n={len(runs)})")
  if warmup_epochs:
    axis.axvline(warmup_epochs + 0.5, color="grey", linestyle="--", label="end of warm-up")
  axis.set(xlabel="epoch", ylabel="test accuracy (%)", title=title)
  axis.grid(alpha=0.3)
  axis.legend()
  return _save(figure, path)


def soft_label_stability(runs: Sequence[Results], path: pathlib.Path, title: str) -> pathlib.Path:
  """Figure 4's idea: how often argmax soft labels change between epochs, and whom they agree
  with."""
  figure, (changes, agreement) = _subplots(1, 2, figsize=(10, 4))
  epochs, mean, std = per_epoch(runs, "soft_labels/changed_fraction")
  _band(changes, epochs, mean, std, "changed since the previous epoch")
  changes.set(xlabel="epoch", ylabel="training samples (%)", title="argmax soft label changed")
  for key, label in (("soft_labels/clean_agreement", "= clean label"),
                     ("soft_labels/given_agreement", "= given (noisy) label")):
    epochs, mean, std = per_epoch(runs, key)
    _band(agreement, epochs, mean, std, label)
  agreement.set(xlabel="epoch", ylabel="training samples (%)", title="argmax soft label")
  for axis in (changes, agreement):
    axis.grid(alpha=0.3)
    axis.legend()
  figure.suptitle(f"{title} (n={len(runs)})")
  return _save(figure, path)


def setting_figures(runs_by_method: dict[str, Sequence[Results]], folder: pathlib.Path, name: str,
                    title: str) -> None:
  """The per-setting figures: `<name>_accuracy.png` (all methods, the first method of several
  phases marks its first phase's end) and, for each method with soft labels,
  `<name>_soft_labels.png` (`<name>_<method>_soft_labels.png` where several methods have them)."""
  warmups = [w for w in map(warmup_epochs_of, runs_by_method.values()) if w is not None]
  accuracy_curves(runs_by_method, warmups[0] if warmups else None,
                  folder / f"{name}_accuracy.png", title)
  with_soft_labels = [m for m, runs in runs_by_method.items() if has_soft_labels(runs)]
  for method in with_soft_labels:
    file = (f"{name}_soft_labels.png" if len(with_soft_labels) == 1
            else f"{name}_{method}_soft_labels.png")
    soft_label_stability(runs_by_method[method], folder / file, f"{title}, {method}")


def ablation_curve(values: Sequence[float], best: Sequence[Sequence[float]],
                   last: Sequence[Sequence[float]], xlabel: str, path: pathlib.Path, title: str
                   ) -> pathlib.Path:
  """Test accuracy (mean ± std over seeds) at each value of an ablated setting."""
  figure, axis = _subplots(figsize=(6, 4))
  for label, accuracies in (("best meta epoch", best), ("last epoch", last)):
    mean = np.array([np.mean(a) for a in accuracies])
    std = np.array([np.std(a) for a in accuracies])
    axis.errorbar(values, 100 * mean, yerr=100 * std, marker="o", capsize=3, label=label)
  axis.set(xlabel=xlabel, ylabel="test accuracy (%)", title=title)
  axis.grid(alpha=0.3)
  axis.legend()
  return _save(figure, path)


def run_accuracy(results: Results, path: pathlib.Path) -> pathlib.Path:
  """One run's accuracy per epoch: train (against the given labels; against the soft labels where
  the method trains on those), meta and test; the first phase's end and the best meta epoch
  marked."""
  history = results["history"]
  figure, axis = _subplots(figsize=(7, 4.2))
  for key, label, style in (("train/accuracy", "train (given labels)", "-"),
                            ("train/accuracy_vs_soft_labels", "train (soft labels)", ":"),
                            ("meta_accuracy", "meta (clean)", "-"),
                            ("test_accuracy", "test", "-")):
    points = [(r["epoch"], 100 * r[key]) for r in history if key in r]
    if points:
      axis.plot(*zip(*points), style, label=label)
  warmup = warmup_epochs_of([results])
  if warmup:
    axis.axvline(warmup + 0.5, color="grey", linestyle="--",
                 label=f"end of {history[0]['phase']}")
  best = results.get("best")
  if best:
    axis.axvline(best["epoch"], color="black", linestyle=":", alpha=0.6)
    axis.plot([best["epoch"]], [100 * best["test_accuracy"]], "k*", markersize=11,
              label=f"best meta epoch {best['epoch']}: test {100 * best['test_accuracy']:.2f}%")
  axis.set(xlabel="epoch", ylabel="accuracy (%)",
           title=f"{results['method']} on {results['dataset']}")
  axis.grid(alpha=0.3)
  axis.legend(fontsize=8)
  return _save(figure, path)


def run_soft_labels(results: Results, path: pathlib.Path, clean_known: bool) -> pathlib.Path:
  """One run's soft labels per epoch: the share of training samples whose argmax soft label
  equals the given label and (where the clean labels are known) the clean label, and the share
  that changed since the previous epoch."""
  history = results["history"]
  figure, axis = _subplots(figsize=(7, 4.2))
  keys = [("soft_labels/given_agreement", "= given label"),
          ("soft_labels/changed_fraction", "changed since the previous epoch")]
  if clean_known:
    keys.insert(1, ("soft_labels/clean_agreement", "= clean label"))
  for key, label in keys:
    points = [(r["epoch"], 100 * r[key]) for r in history if key in r]
    if points:
      axis.plot(*zip(*points), marker=".", label=label)
  axis.set(xlabel="epoch", ylabel="training samples (%)", ylim=(0, 100),
           title=f"argmax soft label, {results['method']} on {results['dataset']}")
  axis.grid(alpha=0.3)
  axis.legend(fontsize=8)
  return _save(figure, path)


def _matrix(axis: Any, counts: np.ndarray, class_names: Sequence[str], xlabel: str, ylabel: str,
            title: str) -> Any:
  """Row-normalised `counts` as an image; the numbers written in where classes are few."""
  rows = counts / np.maximum(counts.sum(1, keepdims=True), 1)
  image = axis.imshow(rows, cmap="viridis", vmin=0, vmax=1)
  num_classes = len(counts)
  if num_classes <= 20:
    ticks = np.arange(num_classes)
    long_names = num_classes > 10 or max(map(len, class_names), default=0) > 6
    axis.set_xticks(ticks, class_names, rotation=90 if long_names else 0, fontsize=7)
    axis.set_yticks(ticks, class_names, fontsize=7)
  if num_classes <= 12:
    for i in range(num_classes):
      for j in range(num_classes):
        axis.text(j, i, f"{rows[i, j]:.2f}", ha="center", va="center", fontsize=6,
                  color="black" if rows[i, j] > 0.5 else "white")
  axis.set(xlabel=xlabel, ylabel=ylabel, title=title)
  return image


def label_confusion(given: np.ndarray, corrected: np.ndarray, clean: np.ndarray | None,
                    class_names: Sequence[str], path: pathlib.Path, title: str) -> pathlib.Path:
  """Given label (rows) vs corrected label (columns) over the labelled samples, row-normalised;
  where `clean` labels are known, beside it the realised noise transition matrix
  P(given = j | clean = i)."""
  num_classes = len(class_names)
  pairs = lambda rows, columns: noise_lib.transition_counts(rows, columns, num_classes)
  labelled = given >= 0
  panels = [(pairs(given[labelled], corrected[labelled]), "corrected label", "given label",
             "given → corrected")]
  if clean is not None:
    known = labelled & (clean >= 0)
    panels.append((pairs(clean[known], given[known]), "given label", "clean label",
                   "noise transition P(given | clean)"))
  size = min(4 + 0.25 * num_classes, 12)
  figure, axes = _subplots(1, len(panels), figsize=(size * len(panels) + 1, size * 0.8),
                              squeeze=False)
  for axis, (counts, xlabel, ylabel, name) in zip(axes[0], panels):
    image = _matrix(axis, counts, class_names, xlabel, ylabel, name)
  figure.colorbar(image, ax=list(axes[0]), shrink=0.8, label="share of the row")
  figure.suptitle(title)
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=120, bbox_inches="tight")
  return path


def noise_transition(counts: np.ndarray, class_names: Sequence[str], path: pathlib.Path,
                     title: str) -> pathlib.Path:
  """The realised noise transition matrix P(given = j | clean = i) from its (C, C) counts, as the
  right panel of `label_confusion` draws it."""
  counts = np.asarray(counts)
  size = min(4 + 0.25 * len(counts), 12)
  figure, axis = _subplots(figsize=(size + 1, size * 0.8))
  image = _matrix(axis, counts, class_names, "given label", "clean label",
                  "noise transition P(given | clean)")
  figure.colorbar(image, ax=axis, shrink=0.8, label="share of the row")
  figure.suptitle(title)
  return _save(figure, path)


def _tile(image: np.ndarray, size: int) -> np.ndarray:
  """`image` (H, W[, C] uint8, grey or RGB) as an RGB float tile of `size`², centred on white."""
  image = np.asarray(image, np.float32) / 255.0
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, -1)
  tile = np.ones((size, size, 3), np.float32)
  top, left = (size - image.shape[0]) // 2, (size - image.shape[1]) // 2
  tile[top:top + image.shape[0], left:left + image.shape[1]] = image[..., :3]
  return tile


def image_gallery(images: Sequence[np.ndarray], captions: Sequence[str], path: pathlib.Path,
                  title: str, highlight: Sequence[bool | None] | None = None,
                  columns: int = 8) -> pathlib.Path:
  """`images` (H, W, C uint8) in a grid, each with its caption above it; a caption is green where
  `highlight` is True, red where False, black where None. One mosaic image (fast to draw for any
  number of images)."""
  columns = max(1, min(columns, len(images)))
  rows = max(1, -(-len(images) // columns))
  size = max([max(np.shape(i)[:2]) for i in images] or [1])
  caption_height, gap = int(np.ceil(0.5 * size)), max(1, size // 12)
  cell_w, cell_h = size + gap, size + caption_height
  canvas = np.ones((rows * cell_h, columns * cell_w - gap, 3), np.float32)
  figure, axis = _subplots(figsize=(1.7 * columns, 1.95 * rows + 0.5))
  colours = {True: "green", False: "red", None: "black"}
  for index, image in enumerate(images):
    row, column = divmod(index, columns)
    top, left = row * cell_h + caption_height, column * cell_w
    canvas[top:top + size, left:left + size] = _tile(image, size)
    mark = None if highlight is None else highlight[index]
    axis.text(left + size / 2, top - caption_height * 0.08, captions[index], ha="center",
              va="bottom", fontsize=7, color=colours[mark])
  axis.imshow(canvas, interpolation="nearest")
  axis.axis("off")
  figure.suptitle(title, fontsize=9)
  return _save(figure, path)


def _subplots(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Any, Any]:
  """pyplot.subplots' result, on a figure that no pyplot state holds."""
  figsize = kwargs.pop("figsize", None)
  figure = Figure(figsize=figsize)
  return figure, figure.subplots(nrows, ncols, **kwargs)


def _save(figure: Any, path: pathlib.Path) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  return path
