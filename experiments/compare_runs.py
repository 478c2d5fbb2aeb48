"""Whether two sets of finished runs computed the same thing: e.g. the same commands before and
after a change of the code.

  python experiments/compare_runs.py --before=/tmp/before_digits0 --after=/tmp/after_digits0 [...]

Pairs every results.json under each `--before` folder with the one at the same relative path under
the matching `--after` folder, and reports, per pair: whether the accuracies of every epoch, the
best and last epochs and the label-issue report are identical, whether soft_labels.npz is bitwise
equal, and, for every other per-epoch number (training metrics, times excluded), the largest
relative difference. Exits non-zero if an accuracy, an epoch choice, a label-issue number or a soft
label differs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np


def _is_exact(key: str) -> bool:
  """Per-epoch keys that must agree exactly: the evaluations that model selection and the reported
  numbers rest on (training metrics are averages whose last bits may move with summation order)."""
  return not key.startswith("train/") and (key.endswith(("accuracy", "top5"))
                                           or key.startswith("soft_labels/"))


def compare(before: pathlib.Path, after: pathlib.Path) -> tuple[bool, dict[str, float]]:
  """(identical where it must be, largest relative difference of each other per-epoch number)."""
  a = json.loads((before / "results.json").read_text())
  b = json.loads((after / "results.json").read_text())
  same = a["best"] == {k: b["best"][k] for k in a["best"]} and a["last"] == {
      k: b["last"][k] for k in a["last"]}
  same &= (a["label_issues"] is None) == (b["label_issues"] is None)
  if a["label_issues"]:
    same &= all(b["label_issues"][k] == v for k, v in a["label_issues"].items())
  largest: dict[str, float] = {}
  for old, new in zip(a["history"], b["history"], strict=True):
    for key, value in old.items():
      if key.endswith("_s") or key == "images_per_s" or not isinstance(value, float):
        continue
      if _is_exact(key):
        same &= new[key] == value
      else:
        difference = abs(new[key] - value) / max(abs(value), 1e-30)
        largest[key] = max(largest.get(key, 0.0), difference)
  soft = before / "soft_labels.npz"
  if soft.exists():
    with np.load(soft) as x, np.load(after / "soft_labels.npz") as y:
      same &= all(np.array_equal(x[k], y[k], equal_nan=True) for k in x.files)
  return same, largest


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--before", type=pathlib.Path, action="append", required=True)
  parser.add_argument("--after", type=pathlib.Path, action="append", required=True)
  args = parser.parse_args()
  if len(args.before) != len(args.after):
    parser.error("give one --after per --before")
  all_same = True
  for before_root, after_root in zip(args.before, args.after):
    for path in sorted(before_root.rglob("results.json")):
      relative = path.parent.relative_to(before_root)
      same, largest = compare(path.parent, after_root / relative)
      all_same &= same
      worst = max(largest.values(), default=0.0)
      print(f"{before_root / relative} vs {after_root / relative}: "
            f"{'identical' if same else 'DIFFERENT'} accuracies, epochs, label issues and soft "
            f"labels; other per-epoch numbers within {worst:.1e} (relative)")
  sys.exit(0 if all_same else 1)


if __name__ == "__main__":
  main()
