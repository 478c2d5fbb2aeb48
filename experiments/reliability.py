"""Tries to get a run stuck, as a reliability engineer would, and reports what happened.

  python experiments/reliability.py [--out=experiments/results/reliability.md] [--jobs=2]

On the digits default (configs/digits.py, MetaLabelNet, a shortened schedule) through the
command line: stops at 15 points (SIGKILL inside the process at a named moment, SIGTERM/SIGINT
from outside), each followed by a rerun of the same command; the newest checkpoint damaged five
ways; damaged and deleted results.json; labels changed between a kill and the resume; two
processes on one workdir; and 30+ bad inputs. Each row reads "resumed identical" (the rerun's
results.json without its times, soft labels and final state equal an uninterrupted run's, its
report is there), "clear error" (a non-zero exit, no traceback, a message naming the problem) or
"other" (what went wrong instead).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SHORT = ["--config.method=metalabelnet", "--config.num_epochs=6", "--config.warmup_epochs=3",
         "--config.optim.lr_boundaries=(5,)", "--config.noise.teacher_epochs=3"]
BASE = [f"--config={REPO / 'configs' / 'digits.py'}", *SHORT]
IDENTICAL, CLEAR, OTHER = "resumed identical", "clear error", "other"


# ---- the victim: the command line with a SIGKILL at a named moment ----

def _victim(point: str, argv: list[str]) -> None:
  """Runs `python -m mln_jax.main argv`, killing itself (SIGKILL: no clean-up of any kind) at
  `point`."""
  import orbax.checkpoint as ocp
  from absl import app
  from mln_jax import experiment, in_memory, labels, loop, main, report
  from mln_jax.methods import metalabelnet

  def die():
    os.kill(os.getpid(), signal.SIGKILL)

  def before(owner, name, nth=1, when=lambda *a, **k: True):
    original, calls = getattr(owner, name), [0]

    def patched(*args, **kwargs):
      if when(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
          die()
      return original(*args, **kwargs)
    setattr(owner, name, patched)

  def after(owner, name, nth):
    original, calls = getattr(owner, name), [0]

    def patched(*args, **kwargs):
      result = original(*args, **kwargs)
      calls[0] += 1
      if calls[0] == nth:
        die()
      return result
    setattr(owner, name, patched)

  points: dict[str, Callable[[], None]] = {
      "warm-up epoch 1, before any checkpoint": lambda: before(loop, "check_finite"),
      "right after the first checkpoint": lambda: after(ocp.CheckpointManager, "save", 1),
      "inside a checkpoint save (written, not finalised)":
          lambda: before(ocp.CheckpointManager, "_finalize", 2),
      "teacher fold 2 (clean-model noise)": lambda: before(in_memory, "state_from_config", 2),
      "after the teachers, before training": lambda: before(loop, "train_and_evaluate"),
      "at the phase switch (entering phase 2)": lambda: before(
          metalabelnet, "enter_phase2", when=lambda state, begins: begins),
      "in phase 2 (epoch 5)": lambda: before(
          loop, "check_finite", when=lambda m, epoch, *a: epoch == 4),
      "right after the final checkpoint": lambda: before(loop, "_finish"),
      "writing soft_labels.npz": lambda: before(labels, "write_soft_labels"),
      "after results.json, before the report": lambda: before(report, "write_run_report"),
      "before comparison.json": lambda: before(experiment, "comparison_table"),
  }
  points[point]()
  sys.argv = ["mln_jax.main", *argv]
  app.run(main.main)


# ---- running and judging ----

def _command(workdir: pathlib.Path, *extra: str) -> list[str]:
  return [sys.executable, "-m", "mln_jax.main", *BASE, f"--workdir={workdir}", *extra]


def _run(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
  return subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=timeout)


def _killed_at(point: str, workdir: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
  return _run([sys.executable, __file__, f"--victim={point}", "--",
               *_command(workdir, *extra)[3:]])


def _outputs(workdir: pathlib.Path) -> dict:
  results = json.loads((workdir / "results.json").read_text())
  strip = lambda record: {k: v for k, v in record.items()
                          if not k.endswith("_s") and k != "images_per_s"}
  return {"history": [strip(h) for h in results["history"]], "best": results["best"],
          "last": results["last"], "label_issues": results["label_issues"],
          "noise": results["noise"]}


def _final_state(workdir: pathlib.Path) -> list[np.ndarray]:
  import jax
  import orbax.checkpoint as ocp
  checkpoints = ocp.CheckpointManager(str(workdir / "checkpoints"))
  state = checkpoints.restore(checkpoints.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore())).state
  return [np.asarray(x) for x in jax.tree.leaves(state)]


def _judge_identical(workdir: pathlib.Path, reference: pathlib.Path,
                     rerun: subprocess.CompletedProcess) -> tuple[str, str]:
  if rerun.returncode != 0:
    return OTHER, f"the rerun failed (exit {rerun.returncode}): {rerun.stderr.strip()[-300:]}"
  if not (workdir / "results.json").exists():
    return OTHER, "no results.json after the rerun"
  if _outputs(workdir) != _outputs(reference):
    return OTHER, "results.json differs from the uninterrupted run's"
  soft = lambda d: np.load(d / "soft_labels.npz")["soft_label"]
  if not np.array_equal(soft(workdir), soft(reference)):
    return OTHER, "soft_labels.npz differs"
  if any(not np.array_equal(a, b) for a, b in zip(_final_state(workdir), _final_state(reference))):
    return OTHER, "the final state differs"
  if not (workdir / "summary.md").exists() or not (workdir / "comparison.json").exists():
    return OTHER, "the report or comparison.json is missing"
  return IDENTICAL, "results, soft labels, final state equal; report and comparison written"


def _judge_error(completed: subprocess.CompletedProcess, expected: str) -> tuple[str, str]:
  message = completed.stderr.strip().splitlines()
  last = next((line for line in message if line.startswith(("error:", "FATAL", "stopped:"))),
              message[-1] if message else "")
  if completed.returncode == 0:
    return OTHER, "accepted: exit 0"
  if "Traceback" in completed.stderr:
    return OTHER, f"a traceback (exit {completed.returncode}): {message[-1][:200]}"
  if expected not in completed.stderr:
    return OTHER, f"exit {completed.returncode}, message without {expected!r}: {last[:300]}"
  return CLEAR, f"exit {completed.returncode}: {last[:300]}"


# ---- the scenarios ----

def kill_scenario(point: str, reference: pathlib.Path, root: pathlib.Path) -> tuple[str, str]:
  workdir = root / point.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
  killed = _killed_at(point, workdir)
  if killed.returncode != -signal.SIGKILL:
    return OTHER, f"the kill point was not reached (exit {killed.returncode})"
  return _judge_identical(workdir, reference, _run(_command(workdir)))


def killed_twice(reference: pathlib.Path, root: pathlib.Path) -> tuple[str, str]:
  workdir = root / "killed_twice"
  for point in ("warm-up epoch 1, before any checkpoint", "in phase 2 (epoch 5)"):
    if _killed_at(point, workdir).returncode != -signal.SIGKILL:
      return OTHER, f"kill point {point!r} not reached"
  return _judge_identical(workdir, reference, _run(_command(workdir)))


def signal_scenario(signals: tuple[int, ...], reference: pathlib.Path, root: pathlib.Path
                    ) -> tuple[str, str]:
  """Sends `signals` from outside once epoch 2 ends, then reruns."""
  workdir = root / ("signal_" + "_".join(signal.Signals(s).name for s in signals))
  process = subprocess.Popen(_command(workdir), stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=REPO)
  lines = []
  for line in process.stderr:
    lines.append(line)
    if "epoch   2/" in line:
      for signum in signals:
        process.send_signal(signum)
        time.sleep(0.05)
      break
  _, rest = process.communicate(timeout=900)
  stderr = "".join(lines) + rest
  expected = 130 if len(signals) > 1 else 3
  if process.returncode != expected:
    return OTHER, f"exit {process.returncode}, expected {expected}: {stderr.strip()[-300:]}"
  if "Traceback" in stderr:
    return OTHER, "a traceback on the stop"
  status, detail = _judge_identical(workdir, reference, _run(_command(workdir)))
  stop_line = next((line for line in stderr.splitlines()
                    if line.startswith(("stopped:", "interrupted:"))), "")
  return status, f"exit {process.returncode} ({stop_line.strip()[:120]}); then {detail}"


def _truncate_array(step: pathlib.Path) -> None:
  big = max((p for p in (step / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  big.write_bytes(big.read_bytes()[:64])


def _zero_manifests(step: pathlib.Path) -> None:
  for manifest in (step / "state").rglob("manifest.ocdbt"):
    manifest.write_bytes(bytes(manifest.stat().st_size))


def _empty(step: pathlib.Path) -> None:
  shutil.rmtree(step)
  step.mkdir()


DAMAGES = {
    "an array file truncated": _truncate_array,
    "state/_METADATA missing": lambda step: (step / "state" / "_METADATA").unlink(),
    "the progress JSON truncated": lambda step: (step / "progress" / "metadata").write_text("{"),
    "the step folder empty": _empty,
    "the OCDBT manifests zeroed": _zero_manifests,
}


def damage_scenario(name: str, killed: pathlib.Path, reference: pathlib.Path, root: pathlib.Path
                    ) -> tuple[str, str]:
  workdir = root / f"damaged_{name.replace(' ', '_').replace('/', '_')}"
  shutil.copytree(killed, workdir)
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  DAMAGES[name](workdir / "checkpoints" / str(steps[-1]))
  rerun = _run(_command(workdir))
  status, detail = _judge_identical(workdir, reference, rerun)
  fell_back = "does not restore" in rerun.stderr
  return status, detail + ("; fell back to the older checkpoint" if fell_back else "")


def results_scenario(how: str, reference: pathlib.Path, root: pathlib.Path) -> tuple[str, str]:
  workdir = root / f"results_{how}"
  shutil.copytree(reference, workdir)
  if how == "deleted":
    (workdir / "results.json").unlink()
  else:
    (workdir / "results.json").write_text('{"method": "metala')
  return _judge_identical(workdir, reference, _run(_command(workdir)))


def labels_changed(root: pathlib.Path) -> tuple[str, str]:
  from mln_jax import data
  clean = data.load_digits_dataset(600, 0).train_labels
  labels_file = root / "changing_labels.npy"
  np.save(labels_file, np.where(np.arange(len(clean)) % 3 == 0, (clean + 1) % 10, clean))
  workdir = root / "labels_changed"
  extra = ("--config.noise.kind=given", f"--config.noise.labels_path={labels_file}")
  if _killed_at("in phase 2 (epoch 5)", workdir, *extra).returncode != -signal.SIGKILL:
    return OTHER, "kill point not reached"
  np.save(labels_file, clean)
  return _judge_error(_run(_command(workdir, *extra)), "changed since its checkpoint")


def two_processes(reference: pathlib.Path, root: pathlib.Path) -> list[tuple[str, str, str]]:
  workdir = root / "two_processes"
  first = subprocess.Popen(_command(workdir), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, cwd=REPO)
  while not (workdir / "checkpoints").exists() and first.poll() is None:
    time.sleep(0.1)
  second = _run(_command(workdir))
  first.wait(timeout=900)
  rows = [("a second process on a running workdir",
           *_judge_error(second, f"in use by another run (process {first.pid}"))]
  status, detail = _judge_identical(workdir, reference, subprocess.CompletedProcess(
      first.args, first.returncode, "", ""))
  rows.append(("the first process, after the refused second", status, detail))
  return rows


def bad_inputs(root: pathlib.Path) -> list[tuple[str, list[str], str]]:
  """(what, command-line arguments after the base ones, the words the error must contain)."""
  folder = root / "inputs"
  folder.mkdir(parents=True, exist_ok=True)
  np.save(folder / "short.npy", np.zeros(10, np.int64))
  np.save(folder / "out_of_range.npy", np.full(1197, 12))
  (folder / "damaged.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
  (folder / "pack").mkdir(exist_ok=True)
  (folder / "pack" / "cifar10_jpeg.npz").write_bytes(b"PK\x03\x04" + bytes(5000))
  (folder / "empty_layout").mkdir(exist_ok=True)
  layout = folder / "broken_test_image"
  for split in ("train", "meta", "test"):
    for name in ("a", "b"):
      (layout / split / name).mkdir(parents=True, exist_ok=True)
      from PIL import Image
      for i in range(4):
        Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(layout / split / name / f"{i}.jpg")
  (layout / "test" / "b" / "3.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
  changed = root / "changed_config"
  image_folder = [f"--config={REPO / 'configs' / 'image_folder.py'}", "--config.model.name=mlp",
                  "--config.model.hidden=(8,)", "--config.batch_size=4",
                  "--config.data.resize_size=32", "--config.data.image_size=32"]
  return [
      ("optim.learning_rate=1e6", ["--config.optim.learning_rate=1e6"], "optim.learning_rate"),
      ("optim.learning_rate=-0.1", ["--config.optim.learning_rate=-0.1"], "optim.learning_rate"),
      ("optim.momentum=2", ["--config.optim.momentum=2.0"], "optim.momentum"),
      ("optim.lr_decay=0", ["--config.optim.lr_decay=0.0"], "optim.lr_decay"),
      ("optim.lr_boundaries=abc", ["--config.optim.lr_boundaries=abc"], "lr_boundaries"),
      ("optim.lr_boundaries=(30, 10)", ["--config.optim.lr_boundaries=(30, 10)"],
       "lr_boundaries"),
      ("mln.learning_rate=0", ["--config.mln.learning_rate=0.0"], "mln.learning_rate"),
      ("mln.learning_rate=1e6", ["--config.mln.learning_rate=1e6"], "mln.learning_rate"),
      ("mln.inner_lr=-1", ["--config.mln.inner_lr=-1.0"], "mln.inner_lr"),
      ("augment.pad=-1", ["--config.augment.pad=-1"], "augment.pad"),
      ("noise.teacher_epochs=0", ["--config.noise.teacher_epochs=0"], "noise.teacher_epochs"),
      ("seed=-1", ["--config.seed=-1"], "config.seed"),
      ("model.blocks=((0,),)", ["--config.model.blocks=((0,),)"], "model.blocks"),
      ("batch_size=599 (larger than a teacher fold)", ["--config.batch_size=599"],
       "batch_size=599 is larger than the data"),
      ("batch_size=0", ["--config.batch_size=0"], "batch_size"),
      ("eval_batch_size=0", ["--config.eval_batch_size=0"], "eval_batch_size"),
      ("num_epochs=0", ["--config.num_epochs=0"], "num_epochs"),
      ("warmup_epochs=99", ["--config.warmup_epochs=99"], "warmup_epochs"),
      ("noise.kind=gaussian", ["--config.noise.kind=gaussian"], "noise.kind"),
      ("noise.rate=1.5", ["--config.noise.rate=1.5"], "noise.rate"),
      ("method=mixup", ["--config.method=mixup"], "mixup"),
      ("an unknown key", ["--config.optim.nesterov=True"], "nesterov"),
      ("data.name=imagenet", ["--config.data.name=imagenet"], "data.name"),
      ("compute_dtype=float16", ["--config.compute_dtype=float16"], "compute_dtype"),
      ("epoch_loop=gpu", ["--config.epoch_loop=gpu"], "epoch_loop"),
      ("label_issues.gallery_size=-1", ["--config.label_issues.gallery_size=-1"],
       "gallery_size"),
      ("data.num_unlabelled larger than the data", ["--config.data.num_unlabelled=5000"],
       "num_unlabelled"),
      ("model.pretrained on a CNN", ["--config.model.pretrained=/x.pth"], "model.pretrained"),
      ("noise.probabilities a missing file", ["--config.noise.probabilities=/nonexistent.npy"],
       "/nonexistent.npy"),
      ("given noise without a labels file", ["--config.noise.kind=given"], "labels_path"),
      ("a labels path that is a folder", ["--config.noise.kind=given",
                                          f"--config.noise.labels_path={folder}"], "is a folder"),
      ("a labels file of the wrong length", ["--config.noise.kind=given",
                                             f"--config.noise.labels_path={folder}/short.npy"],
       "10 noisy labels for a training set of 1197"),
      ("labels outside the classes", ["--config.noise.kind=given",
                                      f"--config.noise.labels_path={folder}/out_of_range.npy"],
       "12"),
      ("a damaged labels file", ["--config.noise.kind=given",
                                 f"--config.noise.labels_path={folder}/damaged.npy"],
       "damaged.npy is damaged"),
      ("cifar10 from a missing folder", ["--config.data.name=cifar10",
                                         "--config.data_dir=/nonexistent/cifar"],
       "/nonexistent/cifar"),
      ("a damaged CIFAR-10 pack", ["--config.data.name=cifar10",
                                   f"--config.data_dir={folder}/pack"], "cifar10_jpeg.npz"),
      ("image_folder on an empty folder", [*image_folder,
                                           f"--config.data_dir={folder}/empty_layout"],
       "meta does not exist"),
      ("image_folder with a corrupt test image", [*image_folder, f"--config.data_dir={layout}"],
       "3.jpg"),
      ("a missing config file", ["--config=/nonexistent/config.py"], "config.py"),
      ("the workdir of another config", [f"--workdir={changed}", "--config.noise.rate=0.2"],
       "different config"),
  ]


def _bad_input_row(what: str, args: list[str], expected: str, root: pathlib.Path
                   ) -> tuple[str, str, str]:
  workdir = root / "bad" / what.replace(" ", "_").replace("/", "_")
  has_workdir = any(a.startswith("--workdir=") for a in args)
  own_config = any(a.startswith("--config=") for a in args)  # instead of the digits default
  command = [sys.executable, "-m", "mln_jax.main", *([] if own_config else BASE), *args]
  if not has_workdir:
    command.append(f"--workdir={workdir}")
  return (what, *_judge_error(_run(command, timeout=600), expected))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "reliability.md"))
  parser.add_argument("--jobs", type=int, default=2, help="scenarios run side by side")
  parser.add_argument("--only", action="append", help="rerun the rows whose name contains this "
                      "(repeatable) and replace them in --out, which keeps the others")
  parser.add_argument("--victim", help=argparse.SUPPRESS)
  args, rest = parser.parse_known_args()
  if args.victim:
    _victim(args.victim, [a for a in rest if a != "--"])
    return
  start = time.time()
  root = pathlib.Path(tempfile.mkdtemp(prefix="mln_reliability_"))
  reference = root / "reference"
  print(f"reference run in {reference} ...", flush=True)
  completed = _run(_command(reference))
  if completed.returncode != 0:
    sys.exit(f"the reference run failed: {completed.stderr[-3000:]}")
  # A workdir whose config the bad inputs change; a run killed in phase 2 the damages start from.
  shutil.copytree(reference, root / "changed_config")
  killed = root / "killed_in_phase_2"
  _killed_at("in phase 2 (epoch 5)", killed)

  tasks: dict[tuple[str, str], Callable[[], object]] = {}
  for point in ("warm-up epoch 1, before any checkpoint", "right after the first checkpoint",
                "inside a checkpoint save (written, not finalised)",
                "teacher fold 2 (clean-model noise)", "after the teachers, before training",
                "at the phase switch (entering phase 2)", "in phase 2 (epoch 5)",
                "right after the final checkpoint", "writing soft_labels.npz",
                "after results.json, before the report", "before comparison.json"):
    tasks[("kill", f"SIGKILL {point}")] = lambda p=point: kill_scenario(p, reference, root)
  tasks[("kill", "SIGKILL twice (warm-up, then phase 2)")] = lambda: killed_twice(reference, root)
  for signals in ((signal.SIGTERM,), (signal.SIGINT,), (signal.SIGINT, signal.SIGINT)):
    name = " then ".join(signal.Signals(s).name for s in signals)
    tasks[("kill", f"{name} after epoch 2")] = lambda s=signals: signal_scenario(s, reference,
                                                                                 root)
  for name in DAMAGES:
    tasks[("damage", f"newest checkpoint: {name}")] = lambda n=name: damage_scenario(
        n, killed, reference, root)
  for how in ("deleted", "truncated"):
    tasks[("damage", f"results.json {how}")] = lambda h=how: results_scenario(h, reference, root)
  tasks[("data", "labels file changed between kill and resume")] = lambda: labels_changed(root)
  tasks[("processes", "two processes")] = lambda: two_processes(reference, root)
  for what, extra, expected in bad_inputs(root):
    tasks[("input", what)] = lambda w=what, e=extra, x=expected: _bad_input_row(w, e, x, root)[1:]

  rows: dict[str, list[tuple[str, str, str]]] = {}
  if args.only:
    rows = _read_rows(pathlib.Path(args.out))
    tasks_run = {key: fn for key, fn in tasks.items() if any(o in key[1] for o in args.only)}
    for section, what in tasks_run:
      rows[section] = [row for row in rows.get(section, []) if row[0] != what]
  else:
    tasks_run = tasks
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    futures = {pool.submit(fn): key for key, fn in tasks_run.items()}
    for future in concurrent.futures.as_completed(futures):
      section, what = futures[future]
      try:
        outcome = future.result()
      except Exception as e:  # noqa: BLE001 (a scenario's own failure is a row too)
        outcome = (OTHER, f"the scenario raised {type(e).__name__}: {e}")
      new = outcome if isinstance(outcome, list) else [(what, *outcome)]
      rows.setdefault(section, []).extend(new)
      for row in new:
        print(f"[{section}] {row[0]}: {row[1]} — {row[2][:160]}", flush=True)
  _write(pathlib.Path(args.out), rows, time.time() - start, tasks, args.only)
  shutil.rmtree(root, ignore_errors=True)


TITLES = {"kill": "Stops at any moment, then the same command again",
          "damage": "Damaged files, then the same command again",
          "data": "Data changed under the same path",
          "processes": "Two processes on one workdir",
          "input": "Bad inputs"}


def _read_rows(path: pathlib.Path) -> dict[str, list[tuple[str, str, str]]]:
  """The rows of an earlier report (for --only), by section."""
  sections = {f"## {title}": key for key, title in TITLES.items()}
  rows: dict[str, list[tuple[str, str, str]]] = {}
  section = None
  for line in path.read_text().splitlines():
    if line in sections:
      section = sections[line]
    elif section and line.startswith("| ") and not line.startswith("| what |"):
      what, status, detail = (cell.strip() for cell in line[2:-2].split(" | ", 2))
      rows.setdefault(section, []).append((what, status, detail.replace("\\|", "|")))
  return rows


def _write(path: pathlib.Path, rows: dict[str, list[tuple[str, str, str]]], seconds: float,
           tasks: dict, only: list[str] | None) -> None:
  from mln_jax import runtime
  titles = TITLES
  earlier = [line for line in path.read_text().splitlines()
             if line.startswith("- Rows rerun")] if only else []
  order = {key[1]: index for index, key in enumerate(tasks)}
  every = [row for section in rows.values() for row in section]
  counts = {status: sum(row[1] == status for row in every) for status in (IDENTICAL, CLEAR, OTHER)}
  lines = [
      "# Reliability: stops, damage, changed data, two processes, bad inputs",
      "",
      f"- Command: `python experiments/reliability.py` ({seconds / 60:.0f} min)" if not only else
      _first_line(path, "- Command:"),
      (f"- Date: {datetime.date.today()}; commit {runtime.git_commit()}; device: "
       f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores (CPU only)")
      if not only else _first_line(path, "- Date:"),
      f"- Run: `python -m mln_jax.main {' '.join(a.replace(str(REPO) + '/', '') for a in BASE)}`"
      " (the digits default, MetaLabelNet, its schedule shortened to 6 epochs, 3 of warm-up)",
      "- Identical: the rerun's results.json without its times, its soft_labels.npz and its final "
      "checkpoint's arrays equal those of an uninterrupted run of the same command; its report "
      "(summary.md) and comparison.json exist. Clear error: a non-zero exit without a traceback, "
      "the message naming the problem.",
      f"- **{len(every)} rows: {counts[IDENTICAL]} resumed identical, {counts[CLEAR]} clear "
      f"error, {counts[OTHER]} other.**",
      *earlier,
  ]
  if only:
    flags = " ".join(f'--only="{o}"' for o in only)
    lines.append(f"- Rows rerun with `python experiments/reliability.py {flags}` on "
                 f"{datetime.date.today()} at commit {runtime.git_commit()} "
                 f"({seconds / 60:.0f} min); the other rows are from the command above.")
  for section, title in titles.items():
    lines += ["", f"## {title}", "", "| what | outcome | detail |", "|---|---|---|"]
    for what, status, detail in sorted(rows.get(section, []), key=lambda r: order.get(r[0], 0)):
      detail = detail.replace("|", "\\|").replace("\n", " ")
      lines.append(f"| {what} | {status} | {detail} |")
  path.write_text("\n".join(lines) + "\n")
  print(f"wrote {path}: {counts}")


def _first_line(path: pathlib.Path, prefix: str) -> str:
  return next(line for line in path.read_text().splitlines() if line.startswith(prefix))


if __name__ == "__main__":
  main()
