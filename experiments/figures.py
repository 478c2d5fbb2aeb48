"""Figures from finished runs' results.json files (matplotlib, written as PNG).

- `accuracy_curves`: test accuracy per epoch, mean ± std over seeds, one line per method, the end of
  the warm-up marked (the paper's Figure 3);
- `soft_label_stability`: per phase-2 epoch, the share of training samples whose argmax soft label
  changed since the previous epoch, and the agreement of argmax soft labels with the clean and the
  given labels (the idea of the paper's Figure 4);
- `ablation_curve`: test accuracy (best-by-meta and last epoch) against an ablated setting.
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

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
  figure, axis = plt.subplots(figsize=(6, 4))
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
  figure, (changes, agreement) = plt.subplots(1, 2, figsize=(10, 4))
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
  figure, axis = plt.subplots(figsize=(6, 4))
  for label, accuracies in (("best meta epoch", best), ("last epoch", last)):
    mean = np.array([np.mean(a) for a in accuracies])
    std = np.array([np.std(a) for a in accuracies])
    axis.errorbar(values, 100 * mean, yerr=100 * std, marker="o", capsize=3, label=label)
  axis.set(xlabel=xlabel, ylabel="test accuracy (%)", title=title)
  axis.grid(alpha=0.3)
  axis.legend()
  return _save(figure, path)


def _save(figure: Any, path: pathlib.Path) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
  return path
