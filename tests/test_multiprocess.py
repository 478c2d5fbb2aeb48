"""Two processes (as two hosts would) train one streamed run together on CPU: each reads its half of
every batch, orbax checkpoints once, process 0 alone writes results, and the numbers are those of
one process holding all four devices."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

pytest.importorskip("tensorflow")

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import fake_layouts  # noqa: E402


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(process_id, num_processes, port, workdir, data_dir):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  return subprocess.Popen(
      [sys.executable, str(TESTS / "multiprocess_driver.py"), str(process_id), str(num_processes),
       str(port), str(workdir), str(data_dir)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=TESTS.parent, env=env)


def _histories(processes):
  """Each process's printed history; every process is stopped, also when one fails (the others
  would wait for it in a collective)."""
  try:
    histories = []
    for process in processes:
      stdout, stderr = process.communicate(timeout=600)
      assert process.returncode == 0, stderr[-3000:]
      line = next(l for l in stdout.splitlines() if l.startswith("HISTORY "))
      histories.append(json.loads(line[len("HISTORY "):]))
    return histories
  finally:
    for process in processes:
      process.kill()


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  fake_layouts.clothing1m(tmp_path / "data")
  port = _free_port()
  two = _histories([_start(i, 2, port, tmp_path / "two", tmp_path / "data") for i in range(2)])
  one, = _histories([_start(0, 1, port, tmp_path / "one", tmp_path / "data")])
  assert [r["process"] for r in two] == [0, 1] and two[0]["devices"] == one["devices"] == 4
  assert len(two[0]["history"]) == len(two[1]["history"]) == len(one["history"]) == 3
  # Both processes see the same run; it matches one process with the same four devices.
  for record_0, record_1, record in zip(two[0]["history"], two[1]["history"], one["history"]):
    for key in ("train/loss", "train/meta_loss", "meta_accuracy", "test_accuracy", "test_top5"):
      if key in record:
        assert record_0[key] == record_1[key]
        assert record_0[key] == pytest.approx(record[key], rel=1e-5, abs=1e-6), key
  # One writer: the results, soft labels, the report, the summary and the workdir lock exist once,
  # from process 0.
  written = sorted(str(p.relative_to(tmp_path / "two")) for p in (tmp_path / "two").rglob("*")
                   if p.is_file() and "checkpoints" not in p.parts)
  summaries = [name for name in written if name.startswith("events.out.tfevents")]
  assert len(summaries) == 1  # TensorBoard, from process 0
  assert sorted(set(written) - set(summaries)) == [
      ".lock", "comparison.json", "config.json", "figures/accuracy.png", "figures/confusion.png",
      "figures/label_issues.png", "figures/noise_transition.png", "label_issues.csv", "labels.npz",
      "results.json", "soft_labels.npz", "summary.md"]
  assert not list((tmp_path / "two").rglob("*.tmp"))
