"""The one training loop: a method's phases over the chunks of a data source, with evaluation after
every epoch, model selection by meta accuracy, checkpoints, resume and results.

A source (`in_memory.InMemorySource`, `streamed.StreamedSource`) gives the loop its data as a
`dataset.Dataset` per run, fresh states, the chunks of an epoch (a whole jitted epoch in memory;
logging windows of single steps when streamed) and evaluations. A method (`mln_jax.methods`) gives
it phases: which step to run, on which samples, with or without meta batches. The loop owns the
rest, the same way for both: workdir checks, checkpoints (`orbax`; resumed bitwise, also mid-epoch),
preemption notices, the non-finite check, logging windows, one record per epoch, TensorBoard
summaries (per-epoch records at the epoch number, logging windows at the global step), the exports
and one results schema (`results.json`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable, Iterator, Protocol

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mln_jax import config as config_lib, dataset as dataset_lib, labels as labels_lib, report
from mln_jax import runtime, writers
from mln_jax.dataset import Dataset
from mln_jax.methods import Method, Phase
from mln_jax.train_state import TrainState


@dataclasses.dataclass
class Chunk:
  """Consecutive training steps of one epoch, as a source ran them."""
  state: TrainState
  metrics: dict[str, np.ndarray]  # per step and run: (steps, runs)
  num_steps: int
  seconds: float                  # training time of the chunk
  preempted: bool                 # a preemption notice came at the chunk's last step


class Source(Protocol):
  """What the loop needs of a data source (one per list of runs the loop trains together)."""
  stacked: bool              # the state has a leading run axis
  tracks_soft_labels: bool   # cheap enough to take every training sample's soft labels per epoch
  image_shape: tuple[int, ...]

  def load(self) -> list[Dataset]: ...
  # `fresh`: no checkpoint will be restored onto it (e.g. pretrained weights are loaded then).
  def init_state(self, method: Method, fresh: bool) -> TrainState: ...
  def steps_per_epoch(self, phase: Phase) -> int: ...
  def train_chunks(self, state: TrainState, phase: Phase, epoch: int, start_step: int,
                   preempted: Callable[[int], bool], global_step: int) -> Iterator[Chunk]: ...
  def evaluate(self, state: TrainState, predict: Callable[[TrainState, Any], Any]
               ) -> list[dict[str, dict[str, float]]]: ...
  def soft_labels(self, state: TrainState, phase: Phase) -> list[np.ndarray]: ...
  # `absorb(state, outputs)` of `per_batch` over every training sample (Phase.start_pass/start).
  def training_pass(self, state: TrainState, per_batch: Callable[..., Any],
                    absorb: Callable[[TrainState, Any], TrainState]) -> TrainState: ...
  def export_extras(self, index: int) -> dict[str, np.ndarray]: ...


class Preempted(RuntimeError):
  """The job was told it will be preempted; a checkpoint was written and the run can resume."""


def check_finite(metrics: dict[str, np.ndarray], epoch: int, step: int, phase: str,
                 run_dirs: list[str]) -> None:
  """Stops a diverged run, naming the metric, where it went bad and the settings to lower."""
  for name, values in metrics.items():
    bad = ~np.isfinite(values)
    if bad.any():
      first, run = np.argwhere(bad)[0]  # the earliest step, then the first run there
      raise FloatingPointError(
          f"Non-finite {name} in epoch {epoch + 1} ({phase}) of {run_dirs[run]}, first at step "
          f"{step - values.shape[0] + first + 1}: training diverged. Lower the learning rate "
          f"(--config.optim.learning_rate, or the method's own: for MetaLabelNet "
          f"--config.mln.learning_rate or --config.mln.inner_lr) or check the input data. Runs "
          f"trained with it stopped too; no results were written.")


def _split_names(dataset: Dataset) -> list[str]:
  return ["meta", *dataset.tests]


def _fresh_progress(num_runs: int) -> dict[str, Any]:
  # Where the runs stand: the epoch, steps taken in it, the metrics of a logging window cut short by
  # a preemption, and per run the metric sums of the epoch, the history, the best epoch and the
  # previous epoch's argmax soft labels (their stability).
  return {"num_runs": num_runs, "epoch": 0, "step": 0, "global_step": 0, "window": [],
          "epoch_train_s": 0.0, "elapsed_s": 0.0,
          "runs": [{"sums": {}, "history": [], "best": None, "soft_argmax": None}
                   for _ in range(num_runs)]}


def train_and_evaluate(configs: list[ml_collections.ConfigDict], workdir: str, source: Source,
                       method: Method) -> list[dict[str, Any]]:
  """Trains `method` for every config (runs trained together), resuming from `workdir`.

  Each run gets its folder (`workdir` for one run, `workdir/run_<i>` for several) with config.json,
  labels.npz, TensorBoard files, soft_labels.npz where the method has soft labels, and results.json:
  the per-epoch history (epochs counted from 1), top-1 and top-5 accuracy on the meta split and
  every test split at the best meta epoch and at the last epoch, label-issue precision/recall where
  clean labels are known, times and the environment; then (config.report) its figures/,
  label_issues.csv and summary.md (`mln_jax.report`). The (stacked) state is checkpointed in
  `workdir/checkpoints`. Returns the runs' results.
  """
  lead = jax.process_index() == 0
  with (runtime.workdir_lock(workdir) if lead else contextlib.nullcontext()), \
      _stop_on_signals() as stop, jax.default_matmul_precision(configs[0].matmul_precision):
    return _train_and_evaluate(configs, workdir, source, method, stop)


class _StopRequest:
  """Set by SIGINT or SIGTERM: the loop stops at the next step (streamed) or epoch end (in memory)
  with a checkpoint, as on a preemption notice."""

  def __init__(self):
    self.signal_name: str | None = None

  def __call__(self, signum: int, frame: Any) -> None:
    del frame
    self.signal_name = signal.Signals(signum).name
    signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)
    logging.warning("%s: stopping with a checkpoint at the next step or epoch end (a second %s "
                    "stops at once, losing the steps since the last checkpoint).",
                    self.signal_name, self.signal_name)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_StopRequest]:
  stop = _StopRequest()
  # Only the main thread may set handlers. With several processes a signal reaches each at its own
  # step, and a stop must be agreed on: there orbax's preemption notice (synchronised) stops runs.
  if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
    yield stop
    return
  previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield stop
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def _train_and_evaluate(configs: list[ml_collections.ConfigDict], workdir: str, source: Source,
                        method: Method, stop: _StopRequest) -> list[dict[str, Any]]:
  config, num_runs = configs[0], len(configs)
  lead = jax.process_index() == 0  # process 0 writes; every process checks
  run_dirs = runtime.run_dirs(workdir, num_runs)
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  for run_dir, run_config in zip(run_dirs, configs):
    os.makedirs(run_dir, exist_ok=True)
    runtime.check_workdir_config(run_dir, run_config, checkpoint_dir, write=lead)
  results_paths = [os.path.join(d, runtime.RESULTS_FILE) for d in run_dirs]
  if all(os.path.exists(p) for p in results_paths):
    try:
      finished = [runtime.read_json(path) for path in results_paths]
      logging.info("%s is complete; returning its results.", workdir)
      # A stop between results.json and the end of its report: the report is made now.
      unreported = [i for i, d in enumerate(run_dirs)
                    if not os.path.exists(os.path.join(d, report.SUMMARY_FILE))]
      if lead and unreported:
        _write_reports([run_dirs[i] for i in unreported], [configs[i] for i in unreported],
                       [finished[i] for i in unreported], [None] * len(unreported))
      return finished
    except ValueError as e:  # results.json is made from the final checkpoint: make it again
      logging.warning("%s; writing the results again from the last checkpoint.", e)

  start_time = time.time()
  datasets = source.load()
  for index, (run_dir, dataset) in enumerate(zip(run_dirs, datasets)):
    logging.info("%s in %s: %d training samples (%d labelled), %d meta, %s; %d classes; noise %s",
                 dataset.name, run_dir, len(dataset.train), len(dataset.labelled_indices),
                 len(dataset.meta), ", ".join(f"{len(v)} {k}" for k, v in dataset.tests.items()),
                 dataset.num_classes, dataset_lib.describe_noise(dataset.noise))
    if lead:
      np.savez(os.path.join(run_dir, "labels.npz"), noisy=dataset.train.labels,
               clean=dataset.clean_train_labels, **source.export_extras(index))

  checkpoints = ocp.CheckpointManager(
      os.path.abspath(checkpoint_dir),
      # Synchronous saves: a checkpoint is complete before training goes on, so a kill never loses
      # what was saved; a save cut short leaves a temporary folder, removed here.
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True))
  state = source.init_state(method, fresh=checkpoints.latest_step() is None)
  progress = _fresh_progress(num_runs)
  progress["data"] = [dataset_lib.fingerprint(d) for d in datasets]
  if checkpoints.latest_step() is not None:
    fingerprints = progress["data"]
    state, progress = _restore(checkpoints, state, workdir, num_runs)
    _check_same_data(progress.get("data"), fingerprints, run_dirs)
    progress["data"] = fingerprints
    if progress["epoch"] == method.total_epochs(config):
      logging.info("Resumed after the last epoch's checkpoint in %s: writing the results.",
                   workdir)
    else:
      logging.info("Resumed from the checkpoint at epoch %d, step %d in %s.",
                   progress["epoch"] + 1, progress["step"], workdir)

  def save() -> None:
    if not checkpoints.save(progress["global_step"], args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress))):
      raise RuntimeError(f"Orbax did not save step {progress['global_step']} in "
                         f"{checkpoints.directory} (steps there: {checkpoints.all_steps()}).")

  run_writers = [writers.create_writer(d) if lead else writers.NoSummaryWriter() for d in run_dirs]
  if progress["global_step"] == 0:
    for writer, run_config in zip(run_writers, configs):
      writer.write_hparams({k: v for k, v in config_lib.flatten(run_config.to_dict()).items()
                            if isinstance(v, (int, float, str, bool))})
  split_names = _split_names(datasets[0])
  # What `best` and `last` report: the epoch's accuracies on the meta split and every test split.
  selected = ["epoch"] + [f"{name}_{what}" for name in split_names for what in ("accuracy", "top5")]
  log_every = config.log_every_steps
  num_epochs = method.total_epochs(config)
  while progress["epoch"] < num_epochs:
    epoch, start_step = progress["epoch"], progress["step"]
    phase = method.phase_at(epoch)
    begins = epoch == phase.first_epoch and start_step == 0
    if begins and phase.start is not None:
      state = source.training_pass(state, phase.start_pass, phase.start)
    state = phase.enter(state, begins)
    lr = (phase.learning_rate(epoch) if phase.learning_rate is not None
          else config_lib.learning_rate_at(config, epoch))
    state = method.begin_epoch(state, epoch, lr)
    num_steps = source.steps_per_epoch(phase)
    # A window interrupted by a preemption continues from its saved per-step metrics.
    window = [{k: np.asarray(v, np.float32) for k, v in m.items()} for m in progress["window"]]
    window_start, window_new_steps, preempted = time.time(), 0, False
    step = start_step
    stopping = lambda step: bool(stop.signal_name) or checkpoints.reached_preemption(step)
    for chunk in source.train_chunks(state, phase, epoch, start_step, stopping,
                                     progress["global_step"]):
      state, preempted = chunk.state, chunk.preempted
      step += chunk.num_steps
      window_new_steps += chunk.num_steps
      progress["global_step"] += chunk.num_steps
      window += [{k: v[i] for k, v in chunk.metrics.items()} for i in range(chunk.num_steps)]
      progress["epoch_train_s"] += chunk.seconds
      # Windows end at multiples of log_every_steps (and at the epoch's end), so a resumed run
      # sums the same windows as an uninterrupted one.
      if step % log_every == 0 or step == num_steps:
        window_metrics = {k: np.stack([m[k] for m in window]) for k in window[0]}
        check_finite(window_metrics, epoch, step, phase.name, run_dirs)
        for index, run in enumerate(progress["runs"]):
          for name, values in window_metrics.items():
            run["sums"][name] = run["sums"].get(name, 0.0) + float(values[:, index].sum())
        if len(window) < num_steps:  # an epoch of several windows: a line per window
          logging.info("epoch %d/%d [%s] step %d/%d  loss %s  %.0f img/s", epoch + 1,
                       num_epochs, phase.name, step, num_steps,
                       " ".join(f"{v:.4f}" for v in window_metrics["loss"].mean(0)),
                       window_new_steps * config.batch_size * num_runs
                       / (time.time() - window_start))
          for index, writer in enumerate(run_writers):
            writer.write_scalars(progress["global_step"], {
                f"train_window/{k}": float(v[:, index].mean()) for k, v in window_metrics.items()})
        window, window_start, window_new_steps = [], time.time(), 0
      progress["step"] = step
      progress["window"] = ([{k: np.asarray(v).tolist() for k, v in m.items()} for m in window]
                            if preempted else [])
      if step == num_steps:
        break  # the epoch-end checkpoint follows the evaluation (also after a preemption notice)
      if preempted or (config.checkpoint_every_steps
                       and step % config.checkpoint_every_steps == 0):
        save()
      if preempted:
        checkpoints.wait_until_finished()
        raise Preempted(f"{stop.signal_name or 'Preemption notice'} at step "
                        f"{progress['global_step']} (epoch {epoch + 1}, step {step}/{num_steps}): "
                        "checkpoint written; run the same command again to resume.")

    eval_start = time.time()
    accuracies, chosen = _evaluate(source, state, method)
    soft_argmax = None
    if phase.soft_labels is not None and source.tracks_soft_labels:
      soft_argmax = [soft.argmax(1) for soft in source.soft_labels(state, phase)]
    # Times of the whole epoch, also when it was interrupted and resumed.
    train_time = progress["epoch_train_s"]
    epoch_time = train_time + time.time() - eval_start
    for index, (run, dataset) in enumerate(zip(progress["runs"], datasets)):
      record = {"epoch": epoch + 1, "phase": phase.name, "learning_rate": lr, "steps": num_steps,
                **{f"train/{k}": v / num_steps for k, v in run["sums"].items()}}
      for name in split_names:
        record.update({f"{name}_accuracy": accuracies[index][name]["accuracy"],
                       f"{name}_top5": accuracies[index][name]["top5"]})
      record.update(chosen[index])
      record.update({"train_time_s": train_time, "epoch_time_s": epoch_time,
                     "images_per_s": num_steps * config.batch_size * num_runs / train_time})
      if soft_argmax is not None:
        previous = run["soft_argmax"]
        record.update(labels_lib.soft_label_agreement(
            soft_argmax[index], dataset.train.labels, dataset.clean_train_labels,
            None if previous is None else np.asarray(previous)))
        run["soft_argmax"] = soft_argmax[index].tolist()
      run["history"].append(record)
      if phase.selects_best and (
          run["best"] is None or record["meta_accuracy"] > run["best"]["meta_accuracy"]):
        run["best"] = {k: record[k] for k in selected}
      run["sums"] = {}
      run_writers[index].write_scalars(epoch + 1, {k: v for k, v in record.items()
                                                   if isinstance(v, float) and k != "epoch"})
    per_run = lambda key: " ".join(f"{r['history'][-1][key]:.4f}" for r in progress["runs"])
    logging.info("epoch %3d/%d [%s] lr %.0e  loss %s  %s  %.0f img/s (%.1f s)", epoch + 1,
                 num_epochs, phase.name, lr, per_run("train/loss"),
                 "  ".join(f"{name} acc {per_run(f'{name}_accuracy')} top-5 "
                           f"{per_run(f'{name}_top5')}" for name in split_names),
                 num_steps * config.batch_size * num_runs / train_time, epoch_time)
    progress.update(epoch=epoch + 1, step=0, epoch_train_s=0.0,
                    elapsed_s=progress["elapsed_s"] + epoch_time)
    if (preempted or (epoch + 1) % config.checkpoint_every_epochs == 0
        or epoch + 1 == num_epochs):
      save()
    if preempted:
      checkpoints.wait_until_finished()
      raise Preempted(f"{stop.signal_name or 'Preemption notice'} at the end of epoch "
                      f"{epoch + 1} (step {progress['global_step']}): checkpoint written; run the "
                      "same command again to resume.")
  checkpoints.wait_until_finished()
  for writer in run_writers:
    writer.flush()
  return _finish(configs, workdir, run_dirs, source, method, state, progress, datasets, selected,
                 start_time, lead)


def _restore(checkpoints: ocp.CheckpointManager, template: TrainState, workdir: str,
             num_runs: int) -> tuple[TrainState, dict[str, Any]]:
  """The state and progress of the newest checkpoint that restores.

  A damaged checkpoint (a truncated file, a missing one, an empty step folder) is reported and
  moved to `workdir/damaged_checkpoints/` (its step would be written again) once an older one
  restores: the run goes on from there, to the same result.
  """
  damaged: list[tuple[int, str]] = []

  def note_damage(step: int, error: Exception) -> None:
    damaged.append((step, f"{type(error).__name__}: {str(error)[:300]}"))
    logging.warning("The checkpoint of step %d in %s does not restore (%s); trying an older one.",
                    step, checkpoints.directory, damaged[-1][1])

  for step in sorted(checkpoints.all_steps(), reverse=True):
    try:
      saved = checkpoints.restore(step, args=ocp.args.Composite(
          progress=ocp.args.JsonRestore())).progress
    except Exception as e:  # noqa: BLE001 (orbax and tensorstore raise many kinds)
      note_damage(step, e)
      continue
    if not isinstance(saved, dict) or "global_step" not in saved:
      raise ValueError(f"{workdir} holds a checkpoint of an older mln_jax (before its one training "
                       "loop), which this version cannot resume: finish it with the version that "
                       "started it, or use a new --workdir.")
    if saved.get("num_runs") != num_runs:
      raise ValueError(f"{workdir} holds a checkpoint of {saved.get('num_runs')} runs, not "
                       f"{num_runs}. Resume with the same runs or use a new --workdir.")
    try:
      restored = checkpoints.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(template), progress=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      note_damage(step, e)
      continue
    if damaged:
      aside = os.path.join(workdir, "damaged_checkpoints")
      if jax.process_index() == 0:
        os.makedirs(aside, exist_ok=True)
        for bad_step, _ in damaged:
          shutil.move(os.path.join(str(checkpoints.directory), str(bad_step)),
                      os.path.join(aside, f"{bad_step}.{int(time.time())}"))
      if jax.process_count() > 1:  # every process sees them gone before it saves again
        ocp.multihost.sync_global_processes("mln_jax_damaged_checkpoints_moved")
      checkpoints.reload()
      logging.warning("Resuming from the intact checkpoint of step %d; the damaged ones are in %s "
                      "(delete them when you like).", step, aside)
    return restored.state, restored.progress
  raise ValueError(f"No checkpoint in {checkpoints.directory} restores: "
                   + "; ".join(f"step {s}: {why}" for s, why in damaged)
                   + f". Delete {checkpoints.directory} to start the run over.")


def _check_same_data(saved: list[dict[str, str]] | None, current: list[dict[str, str]],
                     run_dirs: list[str]) -> None:
  """A resumed run must see the data it was trained on so far (labels files can change under the
  same path)."""
  if saved is None:  # checkpoints of versions that kept no fingerprint
    logging.warning("The checkpoint keeps no fingerprint of its data; resuming unchecked.")
    return
  for run_dir, before, now in zip(run_dirs, saved, current):
    changed = [what for what in sorted(set(before) | set(now)) if before.get(what) != now.get(what)]
    if changed:
      raise ValueError(
          f"The data of {run_dir} changed since its checkpoint: {', '.join(changed)} differ (a "
          "labels or data file replaced under the same path?). Resuming would train on other "
          "data than so far; restore the data, or start over with a new --workdir.")


def restore_latest_state(workdir: str, template: TrainState) -> TrainState:
  """The state of the newest checkpoint in `workdir/checkpoints` (a finished run's: its final
  state), restored into the structure and shardings of `template`."""
  checkpoint_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
  checkpoints = ocp.CheckpointManager(checkpoint_dir)
  latest = checkpoints.latest_step()
  if latest is None:
    raise FileNotFoundError(f"No checkpoint in {checkpoint_dir} to restore a state from.")
  return checkpoints.restore(latest, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(template))).state


def _evaluate(source: Source, state: TrainState, method: Method
              ) -> tuple[list[dict[str, dict[str, float]]], list[dict[str, Any]]]:
  """Per run, the accuracies of the model that stands for the epoch, and what the record says
  about the choice: with several `method.models`, the one with the highest meta accuracy (the first
  of equals), its name as `model` and every model's `<name>/<split>_accuracy`."""
  if not method.models:
    accuracies = source.evaluate(state, method.predict)
    return accuracies, [{} for _ in accuracies]
  per_model = {name: source.evaluate(state, predict) for name, predict in method.models}
  names = list(per_model)
  accuracies, chosen = [], []
  for index in range(len(per_model[names[0]])):
    best = max(names, key=lambda n: (per_model[n][index]["meta"]["accuracy"], -names.index(n)))
    accuracies.append(per_model[best][index])
    chosen.append({"model": best, **{f"{n}/{split}_accuracy": values["accuracy"]
                                      for n in names
                                      for split, values in per_model[n][index].items()}})
  return accuracies, chosen


def _finish(configs: list[ml_collections.ConfigDict], workdir: str, run_dirs: list[str],
            source: Source, method: Method, state: TrainState, progress: dict[str, Any],
            datasets: list[Dataset], selected: list[str], start_time: float, lead: bool
            ) -> list[dict[str, Any]]:
  """The exports and every run's results.json."""
  config = configs[0]
  final_phase = method.phase_at(method.total_epochs(config) - 1)
  # As the last phase left it, also where the loop resumed after its last epoch's checkpoint.
  state = final_phase.enter(state, False)
  soft_labels = None
  if final_phase.soft_labels is not None and config.export_soft_labels:
    # One inference pass over the training images: the export users of noisy-label tools expect.
    soft_labels = source.soft_labels(state, final_phase)
  all_results = []
  for index, (run_dir, run, dataset, run_config) in enumerate(
      zip(run_dirs, progress["runs"], datasets, configs)):
    given, clean = dataset.train.labels, dataset.clean_train_labels
    label_issues = None
    if soft_labels is not None:
      if lead:
        labels_lib.write_soft_labels(
            os.path.join(run_dir, "soft_labels.npz"), given, soft_labels[index], clean,
            class_names=np.asarray(dataset.class_names, str), **source.export_extras(index))
      known = (clean >= 0) & (given >= 0)
      if known.any():  # synthetic noise: every sample; Clothing1M: those with a clean label too
        label_issues = {"measured_on": int(known.sum()), **labels_lib.label_issue_report(
            given[known], soft_labels[index][known], clean[known])}
    run_state = jax.tree.map(lambda x: x[index], state) if source.stacked else state
    # Replicated on every device: this process's first copy is the whole array.
    local = lambda values: np.asarray(values.addressable_data(0))
    if method.export is not None and lead:
      for name, values in method.export(run_state).items():
        np.save(os.path.join(run_dir, f"{name}.npy"), local(values))
    if soft_labels is None and method.label_issue_scores is not None:
      scores = local(method.label_issue_scores(run_state))
      if lead:
        np.save(os.path.join(run_dir, "label_issue_scores.npy"), scores)
      known = (clean >= 0) & (given >= 0)
      if known.any():
        label_issues = {"measured_on": int(known.sum()), **labels_lib.score_report(
            given[known], scores[known], clean[known])}
    history = run["history"]
    results = {
        "method": method.name,
        "dataset": dataset.name,
        "seed": run_config.seed,
        "num_train": len(dataset.train),
        "num_labelled": len(dataset.labelled_indices),
        "num_meta": len(dataset.meta),
        "class_names": list(dataset.class_names),  # label i's name ([] where the layout has none)
        "noise": dataset.noise,
        # The authors' second BatchNorm update in fast-weight steps (config.reference_batch_norm).
        "reference_batch_norm": run_config.reference_batch_norm,
        "best": run["best"],
        "last": {k: history[-1][k] for k in selected},
        "history": history,
        "label_issues": label_issues,
        "image_shape": list(source.image_shape),
        "num_classes": dataset.num_classes,
        "checkpoint": {"dir": os.path.relpath(os.path.join(workdir, "checkpoints"), run_dir),
                       "run_index": index if source.stacked else None,
                       "num_runs": len(configs) if source.stacked else None},
        # Training, evaluation and soft-label passes over all epochs (across resumes); for runs
        # trained together, those of the shared program.
        "epochs_time_s": progress["elapsed_s"],
        "wall_time_s": time.time() - start_time,
        "concurrent_runs": len(configs),
        **runtime.run_environment(run_config),
    }
    if lead:
      runtime.write_json_atomically(os.path.join(run_dir, runtime.RESULTS_FILE), results)
    logging.info("%s %s done: test accuracy %.4f (top-5 %.4f) at the best meta epoch %d, %.4f at "
                 "the last epoch; label issues %s.", method.name, run_dir,
                 results["best"]["test_accuracy"], results["best"]["test_top5"],
                 results["best"]["epoch"], results["last"]["test_accuracy"], label_issues)
    all_results.append(results)
  # After every run's results.json: a failed figure must not leave a finished run unfinished.
  if lead:
    _write_reports(run_dirs, configs, all_results,
                   [getattr(d.train, "images", None) for d in datasets])
  return all_results


def _write_reports(run_dirs: list[str], configs: list[ml_collections.ConfigDict],
                   all_results: list[dict[str, Any]], train_images: list[np.ndarray | None]
                   ) -> None:
  """Each run's report (config.report); an error is logged, never fatal to the finished runs."""
  for run_dir, run_config, results, images in zip(run_dirs, configs, all_results, train_images):
    if run_config.report:
      try:
        report.write_run_report(run_dir, results, run_config.label_issues.gallery_size, images)
      except Exception:  # noqa: BLE001 (the results stand; the report can be redone)
        logging.exception("The report of %s failed; its results stand. Redo it with python -m "
                          "mln_jax.report --workdir=%s", run_dir, run_dir)
