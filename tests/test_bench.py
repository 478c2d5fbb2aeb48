"""The benchmark runs end to end on a CPU (numbers from CPU runs are not GPU results)."""

import json
import os
import subprocess
import sys

from mln_jax import bench


def test_benchmark_reports_every_measurement():
  report = bench.run_benchmark([8], num_steps=2, repeats=1, meta_gradients=["autodiff", "jvp"],
                               model="mlp", concurrent_runs=2)
  kinds = [row["kind"] for row in report["measurements"]]
  assert kinds == ["warmup", "meta/autodiff", "meta/jvp", "warmup x2 runs",
                   "meta/autodiff x2 runs"]
  for row in report["measurements"]:
    assert row["images_per_s"] > 0 and row["epoch_s"] > 0
  # A meta step costs several forward-backward passes: more FLOPs per image than a warm-up step.
  warmup, meta = report["measurements"][0], report["measurements"][1]
  assert meta["gflop_per_image"] > 2 * warmup["gflop_per_image"] > 0
  text = bench.format_report(report)
  assert "meta/jvp" in text and "targets" in text
  json.dumps(report)  # serialisable as written by --out


def test_benchmark_cli_writes_json(tmp_path):
  out = tmp_path / "bench.json"
  completed = subprocess.run(
      [sys.executable, "-m", "mln_jax.bench", "--batch_sizes=8", "--steps=2", "--repeats=1",
       "--meta_gradients=jvp", "--model=mlp", "--concurrent_runs=0", f"--out={out}"],
      capture_output=True, text=True, timeout=300, env={**os.environ, "XLA_FLAGS": ""})
  assert completed.returncode == 0, completed.stderr[-2000:]
  report = json.loads(out.read_text())
  assert report["backend"] == "cpu" and len(report["measurements"]) == 2
