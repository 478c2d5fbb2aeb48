"""The ablation runner (plan and assemble) and the figures it writes."""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

from mln_jax import figures

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "tests"))
from test_table1 import fake_history  # noqa: E402

spec = importlib.util.spec_from_file_location("ablations", ROOT / "experiments" / "ablations.py")
ablations = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablations)


def test_plan_has_one_command_per_value_for_the_gpu_or_locally():
  commands = ablations.plan("warmup", seeds=3)
  assert commands == [
      f"bash experiments/gpu/run.sh ablation_warmup_{w} configs/cifar10.py "
      f"--config.noise.kind=feature_dependent --config.noise.rate=0.4 "
      f"--config.warmup_epochs={w} --config.num_runs=3" for w in (20, 30, 44, 60)]
  local = ablations.plan("unlabelled", seeds=2, config="configs/digits.py", values=[100, 600],
                         local="/tmp/abl", data_dir="/data/c10")
  assert local[1] == ("python -m mln_jax.main --config=configs/digits.py "
                      "--workdir=/tmp/abl/ablation_unlabelled_600 --config.data_dir=/data/c10 "
                      "--config.noise.kind="
                      "feature_dependent --config.noise.rate=0.4 --config.data.num_unlabelled=600 "
                      "--config.num_runs=2")


def _fake_run(folder, method, num_meta, seed, last):
  folder.mkdir(parents=True)
  config = {"num_epochs": 6, "warmup_epochs": 2, "batch_size": 32, "model": {"name": "conv_bn"},
            "noise": {"kind": "feature_dependent", "rate": 0.4}, "data": {"num_meta": num_meta}}
  (folder / "config.json").write_text(json.dumps(config))
  (folder / "results.json").write_text(json.dumps({
      "method": method, "seed": seed, "dataset": "digits", "best": {"test_accuracy": last + 0.01},
      "last": {"test_accuracy": last}, "history": fake_history(method, last), "wall_time_s": 30.0,
      "device": "cpu x1", "jax_version": "0", "commit": "abc1234"}))


def test_assemble_groups_runs_by_the_ablated_value_and_writes_figures(tmp_path):
  for num_meta, accuracy in ((50, 0.8), (200, 0.9)):
    for seed in (0, 1):
      for method in ("cross_entropy", "metalabelnet"):
        _fake_run(tmp_path / "runs" / f"m{num_meta}" / method / f"run_{seed}", method, num_meta,
                  seed, accuracy + 0.02 * seed - (0.1 if method == "cross_entropy" else 0))
  path = ablations.assemble("meta_size", [tmp_path / "runs"], "test", out=tmp_path / "out")
  text = path.read_text()
  assert "| meta-data size | metalabelnet | cross_entropy | seeds | wall time (s) |" in text
  assert "- the other settings: 6 epochs, 2 warm-up, batch 32, model conv_bn" in text
  assert "| 50 | 82.00 ± 1.41 / 81.00 ± 1.41 | 72.00 ± 1.41 / 71.00 ± 1.41 | [0, 1] | 30 |" in text
  report = json.loads((tmp_path / "out" / "ablation_meta_size.json").read_text())
  assert report["cells"]["metalabelnet/200"]["last"] == pytest.approx([0.9, 0.92])
  written = sorted(p.name for p in (tmp_path / "out" / "ablation_meta_size_figures").iterdir())
  assert written == ["200_accuracy.png", "200_soft_labels.png", "50_accuracy.png",
                     "50_soft_labels.png"]
  with Image.open(tmp_path / "out" / "ablation_meta_size.png") as image:
    assert image.size[0] > 300 and np.asarray(image).std() > 0  # a drawn plot, not a blank file


def test_figures_average_runs_per_epoch_and_find_the_warmup(tmp_path):
  runs = [{"history": fake_history("metalabelnet", last)} for last in (0.6, 0.8)]
  epochs, mean, std = figures.per_epoch(runs, "test_accuracy")
  np.testing.assert_array_equal(epochs, np.arange(1, 7))
  np.testing.assert_allclose(mean[-1], 0.7)
  np.testing.assert_allclose(std[-1], 0.1)
  # Phase-2 statistics exist from epoch 3 (changed fraction from epoch 4).
  assert figures.per_epoch(runs, "soft_labels/changed_fraction")[0].tolist() == [4, 5, 6]
  assert figures.warmup_epochs_of(runs) == 2
  assert figures.warmup_epochs_of([{"history": fake_history("cross_entropy", 0.5)}]) is None
  assert figures.warmup_epochs_of([]) is None
  figures.accuracy_curves({"metalabelnet": runs}, 2, tmp_path / "a.png", "test")
  assert (tmp_path / "a.png").stat().st_size > 1000
