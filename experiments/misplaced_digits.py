"""What a run flags on your own image folders, measured: scikit-learn's digits written as an
image_folder dataset with a known share of the training images in a wrong class folder, trained
through the CLI (configs/image_folder.py with a small CNN), and the report's gallery and
label_issues.csv scored against the known misplacements.

  python experiments/misplaced_digits.py --root=/tmp/misplaced --name=report_image_folder_digits

Writes `<root>/data/{train,meta,test}/<digit>/*.png` (32×32; train: the digits default's 1197
training images, `--misplaced` of them, default 40%, moved to a uniformly drawn other class;
meta: 200 clean, test: 400 clean, as configs/digits.py splits them), `<root>/misplaced.json` (the
truth), trains into `<root>/run`, and records `experiments/results/<name>.md` with the gallery's
and the CSV's top-k precision; the run's figures are copied beside it (`<name>_figures/`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import shlex
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

from mln_jax import data as data_lib, report, runtime

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
ROOT = pathlib.Path(__file__).resolve().parents[1]
# The digits default's model and schedule, streamed from the folders (32×32 grey-as-RGB images).
OVERRIDES = ("--config.data.resize_size=32", "--config.data.image_size=32",
             "--config.model.name=conv_bn", "--config.model.blocks=((32,), (64,))",
             "--config.model.feature_dim=64", "--config.augment.hflip=False",
             "--config.batch_size=32", "--config.eval_batch_size=200", "--config.num_epochs=30",
             "--config.warmup_epochs=12", "--config.optim.learning_rate=0.05",
             "--config.optim.lr_boundaries=(10, 24)", "--config.mln.learning_rate=0.01",
             "--config.log_every_steps=37", "--config.checkpoint_every_steps=0")


def write_layout(folder: pathlib.Path, misplaced: float, seed: int) -> dict[str, int]:
  """The image folders; returns, for each misplaced training file (relative to `folder`), its
  true class."""
  digits = data_lib.load_digits_dataset(num_heldout=600, seed=0)  # configs/digits.py's split
  rng = np.random.default_rng(seed)
  num_train = len(digits.train_labels)
  moved = np.zeros(num_train, bool)
  moved[rng.choice(num_train, int(round(misplaced * num_train)), replace=False)] = True
  folder_labels = digits.train_labels.copy()
  folder_labels[moved] = (digits.train_labels[moved]
                          + rng.integers(1, digits.num_classes, int(moved.sum()))) % 10
  heldout_labels = digits.heldout_labels
  meta = np.concatenate([np.flatnonzero(heldout_labels == c)[:20] for c in range(10)])
  test = np.setdiff1d(np.arange(len(heldout_labels)), meta)
  truth = {}

  def save(image: np.ndarray, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    grey = Image.fromarray(image[..., 0]).resize((32, 32), Image.NEAREST)
    grey.convert("RGB").save(path)

  for index in range(num_train):
    relative = f"train/{folder_labels[index]}/{index:04d}.png"
    save(digits.train_images[index], folder / relative)
    if moved[index]:
      truth[relative] = int(digits.train_labels[index])
  for split, indices in (("meta", meta), ("test", test)):
    for index in indices:
      save(digits.heldout_images[index],
           folder / f"{split}/{heldout_labels[index]}/{index:04d}.png")
  return truth


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", required=True, type=pathlib.Path)
  parser.add_argument("--name", default="report_image_folder_digits")
  parser.add_argument("--misplaced", type=float, default=0.4)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  data_dir, workdir = args.root / "data", args.root / "run"
  if not data_dir.exists():
    truth = write_layout(data_dir, args.misplaced, args.seed)
    (args.root / "misplaced.json").write_text(json.dumps(truth, indent=1))
  truth = json.loads((args.root / "misplaced.json").read_text())
  command = [sys.executable, "-m", "mln_jax.main", "--config=configs/image_folder.py",
             f"--workdir={workdir}", f"--config.data_dir={data_dir}", *OVERRIDES]
  subprocess.run(command, check=True, cwd=ROOT)
  results = runtime.read_json(str(workdir / runtime.RESULTS_FILE))
  issues = report.load_label_issues(workdir)
  relative = [str(pathlib.Path(f).relative_to(data_dir)) for f in issues.image_files]
  wrong = np.array([f in truth for f in relative])
  ranking = issues.ranking()
  gallery_size = 32
  k = int(wrong.sum())
  flagged = issues.suggested != issues.given
  rows = [
      ("the gallery (top 32)", float(wrong[ranking[:gallery_size]].mean())),
      (f"top k = {k} (the number misplaced) of label_issues.csv", float(wrong[ranking[:k]].mean())),
      ("argmax soft label ≠ folder: precision", float(wrong[flagged].mean())),
      ("argmax soft label ≠ folder: recall", float(flagged[wrong].mean())),
  ]
  # The suggested class of the misplaced images against their true class.
  true_class = np.array([truth.get(f, -1) for f in relative])
  recovered = float(np.mean(issues.suggested[wrong] == true_class[wrong]))
  num_test = sum(1 for _ in (data_dir / "test").rglob("*.png"))
  figures_dir = RESULTS / f"{args.name}_figures"
  figures_dir.mkdir(parents=True, exist_ok=True)
  for file in sorted((workdir / report.FIGURES_DIR).glob("*.png")):
    shutil.copy(file, figures_dir / file.name)
  shown = shlex.join(["python", *command[1:]])
  lines = [
      f"# {args.name}", "",
      f"- date: {datetime.date.today().isoformat()}",
      f"- device: {results['device']} (JAX {results['jax_version']})",
      f"- commit: {results['commit']}",
      f"- command: `python experiments/misplaced_digits.py --root={args.root} --name={args.name}`"
      f" (it ran `{shown}`)",
      f"- data: scikit-learn's digits as image folders, {len(relative)} training images of which "
      f"{k} ({100 * k / len(relative):.1f}%) sit in a wrong class folder (uniformly drawn); "
      f"{results['num_meta']} clean meta and {num_test} clean test images", "",
      f"MetaLabelNet, best-by-meta test accuracy {100 * results['best']['test_accuracy']:.2f}% "
      f"(epoch {results['best']['epoch']}), last epoch "
      f"{100 * results['last']['test_accuracy']:.2f}%.",
      "", "Flagged images against the known misplacements (the run itself knows no clean label):",
      "", "| what | share |", "|---|---|",
      *[f"| {what} | {100 * value:.2f}% |" for what, value in rows],
      f"| misplaced images whose suggested class is their true class | {100 * recovered:.2f}% |",
      "", f"The run's figures, as it wrote them into `{workdir}/figures/`: `{args.name}_figures/` "
      "(`label_issues.png` is the gallery: given folder → suggested class above each image).",
  ]
  path = RESULTS / f"{args.name}.md"
  path.write_text("\n".join(lines) + "\n")
  print(path)


if __name__ == "__main__":
  main()
