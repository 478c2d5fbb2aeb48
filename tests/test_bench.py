"""The benchmark runs end to end on a CPU (numbers from CPU runs are not GPU results)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from mln_jax import bench, config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_reports_every_measurement():
  seen = []  # what a job stopped at a time limit would have kept
  report = bench.run_benchmark([8], num_steps=2, repeats=1, meta_gradients=["autodiff", "jvp"],
                               model="mlp", concurrent_runs=2,
                               on_progress=lambda r: seen.append(len(r["measurements"])))
  assert seen == [1, 2, 3, 4, 5]
  kinds = [row["kind"] for row in report["measurements"]]
  # Every registered method's phase steps, each once (MetaLabelNet's warm-up is cross-entropy's).
  assert kinds == ["cross_entropy/cross-entropy", "metalabelnet/metalabelnet/autodiff",
                   "metalabelnet/metalabelnet/jvp", "cross_entropy/cross-entropy x2 runs",
                   "metalabelnet/metalabelnet/autodiff x2 runs"]
  for row in report["measurements"]:
    assert row["images_per_s"] > 0 and row["epoch_s"] > 0
  # A meta step costs several forward-backward passes: more FLOPs per image than a warm-up step.
  warmup, meta = report["measurements"][0], report["measurements"][1]
  assert meta["gflop_per_image"] > 2 * warmup["gflop_per_image"] > 0
  text = bench.format_report(report)
  assert "metalabelnet/metalabelnet/jvp" in text and "targets" in text
  json.dumps(report)  # serialisable as written by --out


@pytest.mark.slow
def test_benchmark_cli_writes_json(tmp_path):
  out = tmp_path / "bench.json"
  completed = subprocess.run(
      [sys.executable, "-m", "mln_jax.bench", "--batch_sizes=8", "--steps=2", "--repeats=1",
       "--meta_gradients=jvp", "--model=mlp", "--concurrent_runs=0", f"--out={out}"],
      capture_output=True, text=True, timeout=300, env={**os.environ, "XLA_FLAGS": ""})
  assert completed.returncode == 0, completed.stderr[-2000:]
  report = json.loads(out.read_text())
  assert report["backend"] == "cpu" and len(report["measurements"]) == 2
  assert report["complete"]


def test_streamed_benchmark_times_the_configs_steps_on_synthetic_inputs():
  config = config_lib.streamed_config()
  config.data.name, config.data.num_classes = "webvision", 7
  config.data.resize_size, config.data.image_size = 20, 16
  config.model.name, config.model.hidden = "mlp", (16,)
  config.batch_size = 8
  report = bench.run_benchmark([], num_steps=2, repeats=1, meta_gradients=["autodiff"],
                               streamed_config=config)
  assert (report["protocol"], report["image_size"], report["num_classes"]) == ("webvision", 16, 7)
  assert [(r["kind"], r["batch_size"]) for r in report["measurements"]] == [
      ("cross_entropy/cross-entropy", 8), ("metalabelnet/metalabelnet/autodiff", 8)]
  warmup, meta = report["measurements"]
  assert meta["gflop_per_image"] > 2 * warmup["gflop_per_image"] > 0
  assert "webvision steps (mlp, 16px, synthetic inputs)" in bench.format_report(report)
  assert "targets" not in bench.format_report(report)  # CIFAR-10's targets do not apply


@pytest.mark.slow
def test_streamed_benchmark_cli_reads_a_config_file(tmp_path):
  out = tmp_path / "bench.json"
  completed = subprocess.run(
      [sys.executable, "-m", "mln_jax.bench", "--streamed_config=configs/clothing1m.py",
       "--streamed_config.model.name=mlp", "--streamed_config.model.hidden=(8,)",
       "--streamed_config.data.image_size=8", "--streamed_config.data.resize_size=8",
       "--steps=2", "--repeats=1", "--meta_gradients=jvp", f"--out={out}"],
      capture_output=True, text=True, timeout=300, cwd=REPO,
      env={**os.environ, "XLA_FLAGS": ""})
  assert completed.returncode == 0, completed.stderr[-2000:]
  report = json.loads(out.read_text())
  assert report["num_classes"] == 14 and report["measurements"][0]["batch_size"] == 32
