"""Runs that never get stuck: stops at any moment, damaged checkpoints and files, changed data, a
second process, checks before training and the command line's errors."""

import json
import os
import re
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mln_jax import config as config_lib, data as data_lib, experiment, in_memory, loop, noise
from mln_jax import runtime

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import tiny_config  # noqa: E402


def tiny(**overrides):
  return tiny_config.with_overrides(tiny_config.get_config(), **overrides)


def cross_entropy(**overrides):
  return tiny(**{"method": "cross_entropy", "num_epochs": 3, **overrides})


def without_times(results):
  """What must be identical between an interrupted and an uninterrupted run."""
  strip = lambda record: {k: v for k, v in record.items()
                          if not k.endswith("_s") and k != "images_per_s"}
  return {"history": [strip(h) for h in results["history"]], "best": results["best"],
          "last": results["last"], "label_issues": results["label_issues"],
          "noise": results["noise"]}


def final_state(workdir):
  checkpoints = ocp.CheckpointManager(os.path.abspath(workdir / "checkpoints"))
  return checkpoints.restore(checkpoints.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore())).state


def assert_same_state(a, b):
  leaves_a, leaves_b = jax.tree.leaves(final_state(a)), jax.tree.leaves(final_state(b))
  assert len(leaves_a) == len(leaves_b) > 5
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)


def kill_in(monkeypatch, module, name, run):
  """Runs `run()`, stopped (KeyboardInterrupt, as a kill) when `module.name` is first called."""
  def killed(*args, **kwargs):
    raise KeyboardInterrupt(f"killed in {name}")
  with monkeypatch.context() as patch:
    patch.setattr(module, name, killed)
    with pytest.raises(KeyboardInterrupt):
      run()


@pytest.fixture(scope="module")
def reference_cross_entropy(tmp_path_factory):
  """An uninterrupted three-epoch run: what every resumed one must equal."""
  workdir = tmp_path_factory.mktemp("reference")
  return workdir, experiment.train_and_evaluate(cross_entropy(), str(workdir))


@pytest.mark.slow
def test_a_stop_after_the_final_checkpoint_finishes_on_rerun(tmp_path, monkeypatch, caplog):
  config = tiny(num_epochs=3, warmup_epochs=1)
  reference = experiment.train_and_evaluate(config, str(tmp_path / "a"))
  # Killed after the last epoch's checkpoint, before results.json: MetaLabelNet's restored state
  # skips the epoch loop, so its frozen extractor must come from the last phase.
  kill_in(monkeypatch, loop, "_finish",
          lambda: experiment.train_and_evaluate(config, str(tmp_path / "b")))
  assert not (tmp_path / "b" / "results.json").exists()
  with caplog.at_level("INFO"):
    resumed = experiment.train_and_evaluate(config, str(tmp_path / "b"))
  assert without_times(resumed) == without_times(reference)
  assert "Resumed after the last epoch's checkpoint" in caplog.text
  soft = lambda d: np.load(d / "soft_labels.npz")["soft_label"]
  np.testing.assert_array_equal(soft(tmp_path / "a"), soft(tmp_path / "b"))
  # A damaged results.json is written again from the final checkpoint.
  (tmp_path / "b" / "results.json").write_text('{"method": "metalab')
  again = experiment.train_and_evaluate(config, str(tmp_path / "b"))
  assert without_times(again) == without_times(reference)
  assert json.loads((tmp_path / "b" / "results.json").read_text())["method"] == "metalabelnet"


def _truncate_an_array_file(step_dir):
  files = [p for p in step_dir.joinpath("state").rglob("*") if p.is_file()
           and p.stat().st_size > 1000]
  biggest = max(files, key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:100])


DAMAGES = {
    "truncated array file": _truncate_an_array_file,
    "missing _METADATA": lambda step: (step / "state" / "_METADATA").unlink(),
    "truncated progress JSON": lambda step: next((step / "progress").glob("*")).write_text('{"ep'),
    "empty step folder": lambda step: (shutil.rmtree(step), step.mkdir()),
    "zeroed manifest": lambda step: [p.write_bytes(b"\0" * p.stat().st_size)
                                     for p in (step / "state").rglob("manifest.ocdbt")],
}


@pytest.fixture(scope="module")
def killed_in_the_last_epoch(tmp_path_factory):
  """A run stopped at the end of epoch 3 before its checkpoint: epochs 1 and 2 are checkpointed."""
  workdir = tmp_path_factory.mktemp("killed") / "run"
  with pytest.MonkeyPatch.context() as monkeypatch:
    tiny_config.run_killed(monkeypatch, lambda: experiment.train_and_evaluate(
        cross_entropy(), str(workdir)), epoch=2)
  return workdir


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(
    tmp_path, reference_cross_entropy, killed_in_the_last_epoch, damage):
  reference_dir, reference = reference_cross_entropy
  workdir = tmp_path / "run"
  shutil.copytree(killed_in_the_last_epoch, workdir)
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert len(steps) == 2
  DAMAGES[damage](workdir / "checkpoints" / str(steps[-1]))
  resumed = experiment.train_and_evaluate(cross_entropy(), str(workdir))
  assert without_times(resumed) == without_times(reference)
  assert_same_state(workdir, reference_dir)
  assert (workdir / "damaged_checkpoints").is_dir()  # kept aside, not deleted


def test_no_restorable_checkpoint_names_the_folder_to_delete(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  config = cross_entropy(num_epochs=2)
  tiny_config.run_killed(monkeypatch, lambda: experiment.train_and_evaluate(config, str(workdir)),
                         epoch=1)
  for step in (workdir / "checkpoints").iterdir():
    if step.name.isdigit():
      shutil.rmtree(step)
      step.mkdir()
  with pytest.raises(ValueError, match=f"No checkpoint in .*restores.*Delete {workdir}"):
    experiment.train_and_evaluate(config, str(workdir))


def test_damaged_json_files_are_named_with_the_fix(tmp_path):
  for name, fix in [("config.json", "restore it"), ("comparison.json", "writes it again"),
                    ("results.json", "resumes from its last checkpoint")]:
    (tmp_path / name).write_text('{"a": ')
    with pytest.raises(ValueError, match=f"{tmp_path / name} is damaged.*{fix}"):
      runtime.read_json(str(tmp_path / name))
  with pytest.raises(ValueError, match="config.json is damaged"):
    experiment.run(cross_entropy(), str(tmp_path))


def test_labels_changed_between_kill_and_resume_stop_the_run(tmp_path, monkeypatch, caplog):
  clean = data_lib.load_digits_dataset(300, 0).train_labels
  labels_file = tmp_path / "noisy.npy"
  np.save(labels_file, (clean + (np.arange(len(clean)) % 3 == 0)) % 10)
  config = cross_entropy(**{"noise.kind": "given", "noise.labels_path": str(labels_file),
                            "log_every_steps": 20})
  workdir = tmp_path / "run"
  with caplog.at_level("INFO"):
    tiny_config.run_killed(monkeypatch, lambda: experiment.run(config, str(workdir)), epoch=1)
  # CPU epochs run step by step: a progress line every log_every_steps.
  assert re.search(r"\] step 20/46 +\d+ img/s, epoch ETA \d+ s", caplog.text)
  np.save(labels_file, clean)  # the same path, other labels
  with pytest.raises(ValueError, match="data of .* changed since its checkpoint: given training "
                                       "labels differ"):
    experiment.run(config, str(workdir))
  assert not (workdir / "results.json").exists()


def test_teacher_probabilities_are_kept_and_reused(tmp_path, monkeypatch):
  config = cross_entropy(**{"noise.kind": "feature_dependent", "noise.rate": 0.3,
                            "noise.probabilities": "clean_model", "noise.teacher_epochs": 1})
  first = in_memory.prepare_runs([config], cache_dir=str(tmp_path))[0]
  assert list(tmp_path.glob("clean_model_probabilities_seed0.npz"))

  def no_teacher(*args):
    raise AssertionError("the teachers trained again")
  monkeypatch.setattr(in_memory, "clean_model_probabilities", no_teacher)
  again = in_memory.prepare_runs([config], cache_dir=str(tmp_path))[0]
  np.testing.assert_array_equal(first.train.labels, again.train.labels)
  # Other teacher settings do not read the kept probabilities.
  other = tiny_config.with_overrides(config.copy_and_resolve_references(),
                                     **{"noise.teacher_epochs": 2})
  with pytest.raises(AssertionError, match="trained again"):
    in_memory.prepare_runs([other], cache_dir=str(tmp_path))


def test_batch_sizes_are_checked_before_the_teacher_trains(tmp_path, monkeypatch):
  def no_teacher(*args):
    raise AssertionError("the teacher trained before the checks")
  monkeypatch.setattr(in_memory, "clean_model_probabilities", no_teacher)
  config = cross_entropy(**{"noise.kind": "feature_dependent", "noise.probabilities":
                            "clean_model", "batch_size": 752})
  with pytest.raises(ValueError, match="batch_size=752 is larger than the data: .*748 clean-model "
                                       "teacher fold"):
    experiment.run(config, str(tmp_path / "run"))
  assert (tmp_path / "run" / "config.json").exists()  # the workdir is made and checked first


def test_a_diverging_teacher_is_stopped(monkeypatch):
  real = in_memory.make_train_epoch

  def diverging(*args, **kwargs):
    epoch = real(*args, **kwargs)
    def fn(*a):
      state, metrics = epoch(*a)
      return state, {**metrics, "loss": metrics["loss"] * np.nan}
    return fn
  monkeypatch.setattr(in_memory, "make_train_epoch", diverging)
  config = cross_entropy(**{"noise.kind": "feature_dependent", "noise.probabilities":
                            "clean_model", "noise.teacher_epochs": 1})
  with pytest.raises(FloatingPointError, match="clean-model teacher .* diverged in fold 1"):
    in_memory.prepare_runs([config])


@pytest.mark.parametrize("key, value", [
    ("mln.learning_rate", 0.0), ("mln.learning_rate", 1e6), ("optim.learning_rate", 1e6),
    ("optim.learning_rate", -0.1), ("optim.momentum", 2.0), ("optim.lr_decay", 0.0),
    ("augment.pad", -1), ("noise.teacher_epochs", 0), ("seed", -1), ("model.blocks", ((0,),)),
    ("optim.lr_boundaries", (-1,)), ("optim.weight_decay", -1e-4), ("mln.inner_lr", 0.0),
    ("model.feature_dim", 0), ("data.num_meta", -5), ("batch_size", 0),
])
def test_nonsense_values_name_their_key_and_range(key, value):
  with pytest.raises(ValueError, match=f"config.{key}="):
    config_lib.validate_config(tiny(**{key: value}))


def test_damaged_files_and_folders_are_named(tmp_path):
  pack = tmp_path / "pack"
  pack.mkdir()
  np.savez(pack / data_lib.CIFAR10_PACK_FILE, train_jpeg=np.zeros(5000, np.uint8))
  data = bytearray((pack / data_lib.CIFAR10_PACK_FILE).read_bytes())
  data[100:3000] = b"\xff" * 2900  # inside the member: a bad CRC, not a missing archive
  (pack / data_lib.CIFAR10_PACK_FILE).write_bytes(bytes(data))
  with pytest.raises(ValueError, match=f"{pack / data_lib.CIFAR10_PACK_FILE}"):
    data_lib.load_cifar10_pack(pack)
  with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a folder"):
    noise.load_noisy_labels(tmp_path, 10, 10)
  (tmp_path / "labels.npy").write_bytes(np.lib.format.MAGIC_PREFIX + b"\x01\x00garbage")
  with pytest.raises(ValueError, match="labels.npy is damaged"):
    noise.load_noisy_labels(tmp_path / "labels.npy", 10, 10)


def test_a_second_process_on_a_workdir_is_refused(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from mln_jax import runtime\n"
       f"with runtime.workdir_lock({str(tmp_path)!r}):\n  print('held', flush=True); "
       "time.sleep(60)"], stdout=subprocess.PIPE, text=True, cwd=TESTS.parent)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(runtime.WorkdirBusy, match=f"in use by another run \\(process "
                                                  f"{holder.pid} on"):
      experiment.run(cross_entropy(), str(tmp_path))
  finally:
    holder.send_signal(signal.SIGKILL)  # a killed holder leaves no stuck lock
    holder.wait()
  with runtime.workdir_lock(str(tmp_path)):
    with runtime.workdir_lock(str(tmp_path)):  # nested in one process: allowed
      pass


def _cli(*args, timeout=300, **popen):
  return subprocess.run([sys.executable, "-m", "mln_jax.main",
                         f"--config={TESTS / 'tiny_config.py'}", *args],
                        capture_output=True, text=True, cwd=TESTS.parent, timeout=timeout,
                        **popen)


def test_cli_user_errors_print_one_line_and_exit_2(tmp_path):
  completed = _cli(f"--workdir={tmp_path}", "--config.mln.learning_rate=0")
  assert completed.returncode == 2
  assert "error: config.mln.learning_rate=0" in completed.stderr
  assert "Traceback" not in completed.stderr
  assert "cuInit" not in completed.stderr and "libtpu" not in completed.stderr  # start-up noise
  unknown = _cli("--print_config", "--config.optim.nesterov=True")  # refused by the flag parser
  assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
  assert "error: a --config override cannot be applied" in unknown.stderr
  shown = _cli(f"--workdir={tmp_path}", "--config.mln.learning_rate=0", "--verbosity=1")
  assert shown.returncode != 0 and "Traceback" in shown.stderr


def test_print_config_validates_and_prints_without_a_workdir(tmp_path):
  printed = _cli("--print_config", "--config.batch_size=64")
  assert printed.returncode == 0, printed.stderr[-2000:]
  assert "batch_size: 64" in printed.stdout
  assert not list(tmp_path.iterdir())
  refused = _cli("--print_config", "--config.augment.pad=-1")
  assert refused.returncode == 2 and "error: config.augment.pad=-1" in refused.stderr


@pytest.mark.slow
def test_sigterm_stops_with_a_checkpoint_and_the_rerun_is_identical(
    tmp_path, reference_cross_entropy):
  reference_dir, reference = reference_cross_entropy
  workdir = tmp_path / "run"
  args = (f"--workdir={workdir}", "--config.method=cross_entropy", "--config.num_epochs=3")
  process = subprocess.Popen(
      [sys.executable, "-m", "mln_jax.main", f"--config={TESTS / 'tiny_config.py'}", *args],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=TESTS.parent)
  while not (workdir / "checkpoints").is_dir() and process.poll() is None:
    time.sleep(0.05)  # training has begun
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  if process.returncode == 0:
    pytest.skip("the run finished before the signal arrived")
  assert process.returncode == 3, stderr[-3000:]
  assert "stopped: SIGTERM at the end of epoch" in stderr
  assert not (workdir / "results.json").exists()
  rerun = _cli(*args, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  resumed = json.loads((workdir / "results.json").read_text())
  assert without_times(resumed) == without_times(reference)
  assert_same_state(workdir, reference_dir)
