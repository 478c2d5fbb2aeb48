"""CIFAR-10N's route through the command line, on the real CIFAR-10 pack with a fabricated
`CIFAR-10_human.pt` (the real label file is not available to this project).

  python experiments/human_noise_cli.py [--data_dir=../shared/data/cifar10] [--epochs=2] \
      [--out=experiments/results/human_noise_cli.md]

The file is made exactly as CIFAR-N distributes it: a `torch.save`d dict of numpy int arrays in
the python training order, `clean_label` (the pack's labels) and `aggre_label`, `random_label1..3`,
`worse_label` with CIFAR-10N's published noise rates (9.03%, 17.23%, 18.12%, 17.64%, 40.21%), each
wrong label a random other class. Then
1. `configs/cifar10n.py` (worse labels) with the file: a short run of the CPU-sized CNN of
   configs/cifar10_cpu.py, whose results.json must give the fabricated rate exactly;
2. the same file with its entries shuffled: refused before training (exit 2, "different orders").
The report lands in `--out`, the run's noise figure beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
# CIFAR-10N's noise rates (Wei et al., 2022, Table 1) and the file's keys.
RATES = {"aggre_label": 0.0903, "random_label1": 0.1723, "random_label2": 0.1812,
         "random_label3": 0.1764, "worse_label": 0.4021}
CPU_MODEL = ["--config.model.name=conv_bn", "--config.model.blocks=((32,), (64,), (128,))",
             "--config.model.feature_dim=128"]


def fabricate(clean: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
  """CIFAR-10N's dict: each label set with round(rate * N) labels moved to another class."""
  rng = np.random.default_rng(seed)
  sets = {"clean_label": clean.astype(np.int64)}
  for key, rate in RATES.items():
    labels = sets["clean_label"].copy()
    wrong = rng.choice(len(clean), round(rate * len(clean)), replace=False)
    labels[wrong] = (labels[wrong] + rng.integers(1, 10, len(wrong))) % 10
    sets[key] = labels
  return sets


def cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
  start = time.time()
  completed = subprocess.run([sys.executable, "-m", "mln_jax.main", *args], capture_output=True,
                             text=True, cwd=REPO)
  return completed, time.time() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", default=str(REPO.parent / "shared/data/cifar10"))
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--out", default=str(REPO / "experiments/results/human_noise_cli.md"))
  args = parser.parse_args()
  import torch  # the file is made as CIFAR-N made it; reading it needs no torch

  work = pathlib.Path(tempfile.mkdtemp(prefix="human_noise_cli_"))
  with np.load(pathlib.Path(args.data_dir) / "cifar10_jpeg.npz") as pack:
    clean = pack["train_label"]
  sets = fabricate(clean)
  good, shuffled = work / "CIFAR-10_human.pt", work / "shuffled" / "CIFAR-10_human.pt"
  torch.save(sets, good)
  order = np.random.default_rng(1).permutation(len(clean))
  shuffled.parent.mkdir()
  torch.save({k: v[order] for k, v in sets.items()}, shuffled)

  common = [f"--config={REPO / 'configs/cifar10n.py'}", f"--config.data_dir={args.data_dir}",
            *CPU_MODEL, f"--config.num_epochs={args.epochs}", "--config.warmup_epochs=1",
            "--config.optim.lr_boundaries=()"]
  # --config comes before its overrides.
  run, run_s = cli(*common, f"--workdir={work / 'run'}", f"--config.noise.labels_path={good}")
  if run.returncode:
    sys.exit(f"the run failed:\n{run.stderr[-3000:]}")
  refused, refused_s = cli(*common, f"--workdir={work / 'refused'}",
                           f"--config.noise.labels_path={shuffled}")
  results = json.loads((work / "run/results.json").read_text())
  noise = results["noise"]
  counts = np.asarray(noise["transition_counts"])
  expected = round(RATES["worse_label"] * len(clean)) / len(clean)
  error_line = next((line for line in refused.stderr.splitlines() if line.startswith("error:")),
                    refused.stderr.strip().splitlines()[-1] if refused.stderr.strip() else "")

  out = pathlib.Path(args.out)
  figures = out.with_name(out.stem + "_figures")
  figures.mkdir(parents=True, exist_ok=True)
  shutil.copy(work / "run/figures/noise_transition.png", figures / "noise_transition.png")
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=REPO).stdout.strip()
  shown = " ".join(a.replace(str(work), "$TMP").replace(str(REPO) + "/", "") for a in common)
  rows = "\n".join(f"| {name} | {100 * counts[i, i] / counts[i].sum():.2f}% |"
                   for i, name in enumerate(results["class_names"]))
  out.write_text(f"""# CIFAR-10N through the command line, with a fabricated label file

- date: {datetime.date.today()}
- device: {results.get('device', platform.processor() or 'cpu')}, JAX {results.get('jax_version')}
- commit: {commit}
- command: `python experiments/human_noise_cli.py --epochs={args.epochs}` \
({run_s + refused_s:.0f} s)
- the runs it makes: `python -m mln_jax.main {shown} --workdir=$TMP/run \
--config.noise.labels_path=$TMP/CIFAR-10_human.pt`, and the same with the shuffled file

The label file is fabricated (the real one is not available here) exactly in CIFAR-N's format: a
`torch.save`d dict of numpy int64 arrays, `clean_label` = the pack's 50,000 training labels in the
python order, and five label sets at CIFAR-10N's published rates. mln_jax read it without torch
(its unpickler builds numpy arrays only).

## 1. The run on `worse` labels ({run_s:.0f} s, {args.epochs} epochs of the CPU-sized CNN)

- exit code {run.returncode}; `results.json` noise: kind `{noise['kind']}`, human_label
  `{noise['human_label']}`, realised rate **{100 * noise['realised_rate']:.4f}%** over
  {noise['measured_on']} samples (fabricated: {round(RATES['worse_label'] * len(clean))} of
  {len(clean)} = {100 * expected:.4f}%; equal: {noise['realised_rate'] == expected})
- test accuracy at the best meta epoch: {100 * results['best']['test_accuracy']:.2f}% (a
  {args.epochs}-epoch run: it shows the route works, not what CIFAR-10N reaches)
- the transition matrix, `noise.transition_matrix` in results.json, drawn in
  `figures/noise_transition.png` ([copy]({figures.name}/noise_transition.png)); its diagonal, the
  share of each class's labels left right:

| clean class | P(given = clean) |
|---|---|
{rows}

## 2. The same file, its entries shuffled ({refused_s:.0f} s)

- exit code {refused.returncode}, no traceback: {'Traceback' not in refused.stderr}; nothing
  trained (no checkpoints: {not (work / 'refused/checkpoints').exists()})
- what it printed:

```
{error_line}
```
""")
  print(out.read_text())


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
