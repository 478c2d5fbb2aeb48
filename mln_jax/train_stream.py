"""The two-phase loop for datasets streamed from disk (Clothing1M, WebVision, your own image folders).

The same algorithm as `train` (warm-up on labelled images, freeze the extractor, phase 2 over labelled
and unlabelled images, evaluation after every epoch, model selection by meta accuracy), with batches
coming from tf.data (`input_pipeline`) instead of device memory. Steps are jitted with the state
donated and the batch sharded over all devices of a `Mesh`; with several processes (hosts), each reads
its part of every batch, and only process 0 writes metrics and results (orbax coordinates the
checkpoint among processes). Checkpoints are written every `checkpoint_every_steps` steps and at the
end of each epoch; a resumed run skips the steps it has taken and gives the same result as an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mln_jax import augment, config as config_lib, file_lists, labels as labels_lib, steps, train
from mln_jax import writers
from mln_jax.train_state import TrainState, begin_phase2, freeze_extractor, set_learning_rate

if TYPE_CHECKING:
  from mln_jax import input_pipeline

# tf.data (TensorFlow) is imported where files are read, so that the steps (`make_steps`) and the
# benchmark run where TensorFlow is absent.
StepFn = Callable[..., tuple[TrainState, dict[str, jax.Array]]]


def _normalised(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return {"image": augment.normalise_imagenet(batch["image"]), "label": batch["label"]}


class Steps(NamedTuple):
  """The streamed loop's jitted steps on uint8 batches (normalised on the device)."""
  warmup: StepFn            # (state, batch) -> (state, metrics); donates the state
  meta: StepFn              # (state, batch, meta_batch) -> (state, metrics); donates the state
  meta_from_memory: StepFn  # (state, batch, meta_images, meta_labels, order, flips, step) -> ...
  evaluate: Callable[..., dict[str, jax.Array]]  # (state, batch) -> hit counts


def make_steps(num_classes: int, mesh: Mesh | None = None) -> Steps:
  """Jitted steps; `meta_from_memory` takes its meta batch from a meta set kept in device memory
  (uint8), gathered and flipped on the device and sharded over `mesh` like a streamed batch."""
  warmup = jax.jit(lambda state, batch: steps.warmup_step(state, _normalised(batch)),
                   donate_argnums=0)
  meta = jax.jit(lambda state, batch, meta_batch: steps.meta_step(
      state, _normalised(batch), _normalised(meta_batch)), donate_argnums=0)
  shard = ((lambda x: x) if mesh is None else
           (lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("data")))))

  @functools.partial(jax.jit, donate_argnums=0)
  def meta_from_memory(state, batch, meta_images, meta_labels, order, flips, step):
    indices, flip = order[step], flips[step]
    images = meta_images[indices]
    images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
    meta_batch = {"image": shard(images), "label": shard(meta_labels[indices])}
    return steps.meta_step(state, _normalised(batch), _normalised(meta_batch))

  top_k = min(5, num_classes)

  @jax.jit
  def evaluate(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Counts of top-1 and top-5 hits over the batch's valid (not padding) images."""
    logits = steps.predict(state, augment.normalise_imagenet(batch["image"]))
    _, best = jax.lax.top_k(logits, top_k)
    hits = best == batch["label"][:, None]
    valid = batch["valid"]
    return {"top1": jnp.sum(hits[:, 0] & valid), "top5": jnp.sum(hits.any(-1) & valid),
            "count": jnp.sum(valid)}

  return Steps(warmup, meta, meta_from_memory, evaluate)


def soft_labels_of_list(state: TrainState, images: file_lists.ImageList, mesh: Mesh,
                        batch_size: int, prep: input_pipeline.Preprocessing) -> np.ndarray:
  """MetaLabelNet's soft labels for every image of a list, in list order (no augmentation)."""
  from jax.experimental import multihost_utils
  from mln_jax import input_pipeline
  predict = jax.jit(lambda s, x: steps.predict_soft_labels(s, augment.normalise_imagenet(x)))
  outputs = []
  for batch in input_pipeline.device_batches(input_pipeline.eval_batches(images, batch_size, prep),
                                             mesh):
    # Every process gets the whole batch's rows (its own part is all a process holds).
    outputs.append(multihost_utils.process_allgather(predict(state, batch["image"]), tiled=True))
  return np.concatenate(outputs)[:len(images)]


def evaluate_list(evaluate: Callable[..., dict[str, jax.Array]], state: TrainState,
                  images: file_lists.ImageList, mesh: Mesh, batch_size: int,
                  prep: input_pipeline.Preprocessing) -> dict[str, float]:
  """Top-1 and top-5 accuracy of the classifier over a whole image list."""
  from mln_jax import input_pipeline
  totals = None
  stream = input_pipeline.eval_batches(images, batch_size, prep)
  for batch in input_pipeline.device_batches(stream, mesh):
    counts = evaluate(state, batch)  # summed on the device: no host sync per batch
    totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
  totals = {name: int(value) for name, value in totals.items()}
  if totals["count"] != len(images):
    raise RuntimeError(f"Evaluated {totals['count']} of {len(images)} images.")
  return {"top1": totals["top1"] / totals["count"], "top5": totals["top5"] / totals["count"]}


def _load_pretrained(config: ml_collections.ConfigDict, state: TrainState) -> TrainState:
  """The classifier's (and the extractor's) weights from `config.model.pretrained`, a torchvision
  ResNet state dict; a head of another class count stays as initialised."""
  from mln_jax import pretrained  # torch is only needed for .pth files
  variables, skipped = pretrained.load_pretrained_resnet(config.model.pretrained, state.variables)
  logging.info("Loaded %s%s.", config.model.pretrained,
               f" (kept this model's own {', '.join(skipped)})" if skipped else "")
  # The extractor starts as a copy of the classifier, as create_train_state makes it; it is frozen
  # (and marked so) only when the warm-up ends.
  return freeze_extractor(state.replace(params=variables["params"],
                                        batch_stats=variables["batch_stats"],
                                        opt_state=state.tx.init(variables["params"]))
                          ).replace(extractor_frozen=False)


class Preempted(RuntimeError):
  """The job was told it will be preempted; a checkpoint was written and the run can resume."""


def _check_finite(metrics: dict[str, np.ndarray], epoch: int, step: int) -> None:
  for name, value in metrics.items():
    if not np.all(np.isfinite(value)):
      raise FloatingPointError(
          f"Non-finite {name} in epoch {epoch + 1} by step {step}: training diverged. Lower the "
          f"learning rate (--config.optim.learning_rate, --config.mln.learning_rate or "
          f"--config.mln.inner_lr) or check the input data. No results were written.")


def train_and_evaluate_stream(config: ml_collections.ConfigDict, workdir: str,
                              mesh: Mesh | None = None) -> dict[str, Any]:
  """Trains `config.method` on a streamed dataset, resuming from `workdir` if it holds a checkpoint.

  Returns (and, from process 0, writes to `workdir/results.json`) the per-epoch history with top-1
  and top-5 accuracy on the meta data and each test list, the test accuracy at the best meta epoch
  and at the last epoch, wall time and device.
  """
  config_lib.validate_config(config)
  if config.method not in ("metalabelnet", "cross_entropy"):
    raise ValueError(f"train_and_evaluate_stream runs one method; got {config.method!r}.")
  with jax.default_matmul_precision(config.matmul_precision):
    return _train_and_evaluate_stream(config, workdir, mesh or train.make_mesh())


def _train_and_evaluate_stream(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh
                               ) -> dict[str, Any]:
  from mln_jax import input_pipeline
  lead = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  # Every process compares (so that all stop on a mismatch); only process 0 writes.
  train.check_workdir_config(workdir, config, os.path.join(workdir, "checkpoints"), write=lead)
  results_path = os.path.join(workdir, train.RESULTS_FILE)
  if os.path.exists(results_path):
    logging.info("%s is complete; returning its results.", workdir)
    return train.read_json(results_path)
  start_time = time.time()
  dataset = file_lists.load(config.data, config.seed)
  batch_size = config.batch_size
  if batch_size % mesh.size or batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={batch_size} must be divisible by the number of devices "
                     f"({mesh.size}) and processes ({jax.process_count()}).")
  labelled = np.flatnonzero(dataset.train.labels >= 0)
  if batch_size > min(len(labelled), len(dataset.meta)):
    raise ValueError(f"config.batch_size={batch_size} is larger than the data: {len(labelled)} "
                     f"labelled training and {len(dataset.meta)} meta images. Lower "
                     f"--config.batch_size.")
  logging.info("%s: %d training images (%d labelled), %d meta, %s; %d classes.", dataset.name,
               len(dataset.train), len(labelled), len(dataset.meta),
               ", ".join(f"{len(v)} {k}" for k, v in dataset.tests.items()), dataset.num_classes)
  prep = input_pipeline.Preprocessing(config.data.resize_size, config.data.image_size,
                                      config.augment.hflip, config.data.resize_mode)
  meta_prep = dataclasses.replace(prep, hflip=config.augment.hflip and config.augment.meta_batches)
  eval_prep = dataclasses.replace(prep, hflip=False)
  eval_batch_size = -(-config.eval_batch_size // mesh.size) * mesh.size

  model = train.build_model(config, dataset.num_classes)
  image_shape = (config.data.image_size, config.data.image_size, 3)
  state = train.new_state(config, model, image_shape, dataset.num_classes,
                          jax.random.PRNGKey(config.seed))
  step_fns = make_steps(dataset.num_classes, mesh)
  evaluate = step_fns.evaluate

  checkpoints = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                           enable_async_checkpointing=False))
  # Where the run stands: the epoch, steps taken in it, their metric sums, the metrics of a logging
  # window cut short by a preemption, and the history.
  progress = {"epoch": 0, "step": 0, "sums": {}, "window": [], "history": [], "best": None,
              "elapsed_s": 0.0, "epoch_train_s": 0.0}
  if checkpoints.latest_step() is not None:
    restored = checkpoints.restore(checkpoints.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(train.replicate(mesh, state)),
        progress=ocp.args.JsonRestore()))
    state, progress = restored.state, restored.progress
    logging.info("Resumed from the checkpoint at epoch %d, step %d in %s.", progress["epoch"] + 1,
                 progress["step"], workdir)
  else:
    if config.model.pretrained:
      state = _load_pretrained(config, state)
    elif dataset.name == "clothing1m":
      logging.warning("The classifier starts from random weights; the paper's Clothing1M protocol "
                      "starts from ImageNet weights (--config.model.pretrained=<resnet50 .pth>).")
    elif dataset.name == "image_folder" and config.model.name in ("resnet50", "resnet"):
      logging.warning("The ResNet starts from random weights, but the schedule (lr %g, %d "
                      "epochs) is made for fine-tuning: give --config.model.pretrained=<resnet50 "
                      ".pth>, or a longer schedule (--config.num_epochs, warmup_epochs, "
                      "optim.learning_rate, optim.lr_boundaries).", config.optim.learning_rate,
                      config.num_epochs)
    state = train.replicate(mesh, state)

  def save(global_step: int) -> None:
    if not checkpoints.save(global_step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress))):
      raise RuntimeError(f"Orbax did not save step {global_step} in {checkpoints.directory} "
                         f"(steps there: {checkpoints.all_steps()}).")

  writer = writers.create_writer(workdir) if lead else writers.NoSummaryWriter()
  # What `best` and `last` report: the epoch's accuracies on the meta data and every test list.
  selected = ["epoch"] + [f"{name}_{what}" for name in ("meta", *dataset.tests)
                          for what in ("accuracy", "top5")]
  metalabelnet = config.method == "metalabelnet"
  everything = np.arange(len(dataset.train))
  global_step = int(state.step)  # kept on the host: asking the device every step would sync it
  meta_images = meta_labels = None
  while progress["epoch"] < config.num_epochs:
    epoch, start_step = progress["epoch"], progress["step"]
    phase2 = metalabelnet and epoch >= config.warmup_epochs
    phase = "metalabelnet" if phase2 else ("warm-up" if metalabelnet else "cross-entropy")
    if phase2:
      state = begin_phase2(state, at_warmup_end=epoch == config.warmup_epochs and start_step == 0)
    lr = config_lib.learning_rate_at(config, epoch)
    state = state.replace(opt_state=set_learning_rate(state.opt_state, lr))
    indices = everything if phase2 else labelled
    num_steps = len(indices) // batch_size
    batches = input_pipeline.device_batches(input_pipeline.train_batches(
        dataset.train, indices, batch_size, prep, config.seed, epoch, start_step), mesh)
    if phase2 and config.data.meta_in_memory:
      if meta_images is None:
        # Decoded once and kept on every device as uint8: phase 2 then decodes only training images.
        meta_images = train.replicate(mesh, input_pipeline.decode_all(dataset.meta, eval_prep))
        meta_labels = train.replicate(mesh, dataset.meta.labels)
      meta_order, meta_flips = train.replicate(mesh, input_pipeline.meta_schedule(
          len(dataset.meta), num_steps, batch_size, config.seed, epoch, meta_prep.hflip))
    elif phase2:
      meta_stream = input_pipeline.device_batches(input_pipeline.meta_batches(
          dataset.meta, num_steps, batch_size, meta_prep, config.seed, epoch, start_step), mesh)

    # A window interrupted by a preemption continues from its saved per-step metrics.
    window, window_start = ([jax.tree.map(np.float32, m) for m in progress.get("window", [])],
                            time.time())
    preempted = False
    for step in range(start_step, num_steps):
      step_start = time.time()
      batch = next(batches)
      if phase2 and config.data.meta_in_memory:
        state, metrics = step_fns.meta_from_memory(state, batch, meta_images, meta_labels,
                                                   meta_order, meta_flips, step)
      elif phase2:
        state, metrics = step_fns.meta(state, batch, next(meta_stream))
      else:
        state, metrics = step_fns.warmup(state, batch)
      global_step += 1
      window.append(metrics)
      last = step + 1 == num_steps
      # Orbax learns of a coming preemption (TPU maintenance, a cluster's SIGTERM) through JAX's
      # distributed runtime, which needs to be asked at every step; all processes agree on the step.
      preempted = checkpoints.reached_preemption(global_step)
      if (step + 1) % config.log_every_steps == 0 or last:
        # Windows end at multiples of log_every_steps, so a resumed run sums the same windows.
        window_metrics = jax.tree.map(lambda *m: np.asarray(jnp.stack(m)), *window)
        _check_finite(window_metrics, epoch, step + 1)
        for name, values in window_metrics.items():
          progress["sums"][name] = progress["sums"].get(name, 0.0) + float(values.sum())
        logging.info("epoch %d/%d [%s] step %d/%d  loss %.4f  %.0f img/s", epoch + 1,
                     config.num_epochs, phase, step + 1, num_steps, window_metrics["loss"].mean(),
                     len(window) * batch_size / (time.time() - window_start))
        writer.write_scalars(global_step, {f"train/{k}": float(v.mean())
                                           for k, v in window_metrics.items()})
        window, window_start = [], time.time()
      progress.update(step=step + 1, window=[{k: float(v) for k, v in m.items()} for m in window]
                      if preempted else [],
                      # Training time of the epoch so far, also across an interruption.
                      epoch_train_s=progress.get("epoch_train_s", 0.0) + time.time() - step_start)
      if last:
        break  # the epoch-end checkpoint follows the evaluation (also after a preemption notice)
      if preempted or (config.checkpoint_every_steps
                       and (step + 1) % config.checkpoint_every_steps == 0):
        save(global_step)
      if preempted:
        checkpoints.wait_until_finished()
        raise Preempted(f"Preemption notice at step {global_step} (epoch {epoch + 1}, step "
                        f"{step + 1}/{num_steps}): checkpoint written; run the same command "
                        f"again to resume.")
    eval_start = time.time()
    record = {"epoch": epoch + 1, "phase": phase, "learning_rate": lr, "steps": num_steps,
              **{f"train/{k}": v / num_steps for k, v in progress["sums"].items()}}
    meta_accuracy = evaluate_list(evaluate, state, dataset.meta, mesh, eval_batch_size, eval_prep)
    record.update({"meta_accuracy": meta_accuracy["top1"], "meta_top5": meta_accuracy["top5"]})
    for name, images in dataset.tests.items():
      accuracy = evaluate_list(evaluate, state, images, mesh, eval_batch_size, eval_prep)
      record.update({f"{name}_accuracy": accuracy["top1"], f"{name}_top5": accuracy["top5"]})
    # Times of the whole epoch, also when it was interrupted and resumed.
    train_time = progress["epoch_train_s"]
    epoch_time = train_time + time.time() - eval_start
    record.update({"train_time_s": train_time, "epoch_time_s": epoch_time,
                   "images_per_s": num_steps * batch_size / train_time})
    progress["history"].append(record)
    if (phase2 or not metalabelnet) and (
        progress["best"] is None or record["meta_accuracy"] > progress["best"]["meta_accuracy"]):
      progress["best"] = {k: record[k] for k in selected}
    writer.write_scalars(global_step, {k: v for k, v in record.items()
                                           if isinstance(v, float) and k != "epoch"})
    logging.info("epoch %d/%d [%s] lr %.0e  meta acc %.4f  %s  (%.0f s)", epoch + 1,
                 config.num_epochs, phase, lr, record["meta_accuracy"],
                 "  ".join(f"{name} acc {record[f'{name}_accuracy']:.4f} top-5 "
                           f"{record[f'{name}_top5']:.4f}" for name in dataset.tests), epoch_time)
    progress.update(epoch=epoch + 1, step=0, sums={}, epoch_train_s=0.0,
                    elapsed_s=progress["elapsed_s"] + epoch_time)
    save(global_step)
    if preempted:
      checkpoints.wait_until_finished()
      raise Preempted(f"Preemption notice at the end of epoch {epoch + 1} (step {global_step}): "
                      "checkpoint written; run the same command again to resume.")
  checkpoints.wait_until_finished()
  writer.flush()

  history = progress["history"]
  clean = dataset.clean_train_labels
  if clean is None:
    clean = np.full(len(dataset.train), -1, np.int32)
  known = (clean >= 0) & (dataset.train.labels >= 0)
  estimated_rate = (float(np.mean(clean[known] != dataset.train.labels[known])) if known.any()
                    else None)
  label_issues = None
  if metalabelnet and config.export_soft_labels:
    # One inference pass over the training images: the export users of noisy-label tools expect.
    soft = soft_labels_of_list(state, dataset.train, mesh, eval_batch_size, eval_prep)
    if lead:
      labels_lib.write_soft_labels(os.path.join(workdir, "soft_labels.npz"), dataset.train.labels,
                                   soft, clean, image_file=dataset.train.files,
                                   class_names=np.asarray(dataset.class_names, str))
    if known.any():  # Clothing1M: the noisy images that also have a clean label
      label_issues = {"measured_on": int(known.sum()), **labels_lib.label_issue_report(
          dataset.train.labels[known], soft[known], clean[known])}
  results = {
      "method": config.method,
      "dataset": dataset.name,
      "seed": config.seed,
      "num_train": len(dataset.train),
      "class_names": list(dataset.class_names),  # label i's name ([] where the layout has none)
      "num_labelled": int(len(labelled)),
      "num_meta": len(dataset.meta),
      "best": progress["best"],
      "last": {k: history[-1][k] for k in selected},
      "history": history,
      "label_issues": label_issues,
      # Clothing1M's noisy training images partly have a clean label too: their disagreement
      # estimates the real noise rate.
      "noise": {"kind": "real", "realised_rate": estimated_rate,
                "measured_on": int(np.sum(known))},
      "image_shape": list(image_shape),
      "num_classes": dataset.num_classes,
      "checkpoint": {"dir": "checkpoints", "run_index": None, "num_runs": None},
      "epochs_time_s": progress["elapsed_s"],
      "wall_time_s": time.time() - start_time,
      **train.run_environment(config),
  }
  if lead:
    train.write_json_atomically(results_path, results)
  logging.info("%s done: test accuracy %.4f (top-5 %.4f) at the best meta epoch %d, %.4f at the "
               "last epoch.", config.method, results["best"]["test_accuracy"],
               results["best"]["test_top5"], results["best"]["epoch"],
               results["last"]["test_accuracy"])
  return results
