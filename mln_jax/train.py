"""The two-phase MetaLabelNet loop: warm-up, freeze the extractor, phase 2; evaluate after every epoch.

Whole epochs run on the device: the dataset sits in device memory as uint8, shuffling and augmentation
happen inside one jitted `lax.scan` per epoch, and the host only sees per-step metrics at the end of an
epoch. Batches are sharded over all devices of a `Mesh` (global-batch semantics).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mln_jax import augment, config as config_lib, data as data_lib, labels as labels_lib, models
from mln_jax import noise as noise_lib, steps, writers
from mln_jax.train_state import TrainState, create_train_state, freeze_extractor, set_learning_rate

RESULTS_FILE = "results.json"


@dataclasses.dataclass(frozen=True)
class RunData:
  """Host-side data of one run: noisy training labels (−1 = unlabelled), meta and test splits."""
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray        # noisy labels, −1 where the label was dropped
  clean_train_labels: np.ndarray
  meta_images: np.ndarray
  meta_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  realised_noise_rate: float

  @property
  def labelled_indices(self) -> np.ndarray:
    return np.flatnonzero(self.train_labels >= 0).astype(np.int32)


def make_mesh() -> Mesh:
  """A 1-D mesh over every device; batches are split along its 'data' axis."""
  return Mesh(np.array(jax.devices()), ("data",))


def _augment_fn(config: ml_collections.ConfigDict) -> Callable[[jax.Array, jax.Array], jax.Array]:
  def fn(key, images):
    return augment.normalise(augment.random_crop_flip(
        key, images, pad=config.augment.pad, hflip=config.augment.hflip,
        vflip=config.augment.vflip))
  return fn


def _epoch_order(key: jax.Array, indices: jax.Array, batch_size: int) -> jax.Array:
  """A shuffled pass over `indices` as (steps, batch_size); the last partial batch is dropped."""
  num_steps = indices.shape[0] // batch_size
  return jax.random.permutation(key, indices)[:num_steps * batch_size].reshape(num_steps, batch_size)


def _cycling_order(key: jax.Array, num_items: int, num_steps: int, batch_size: int) -> jax.Array:
  """Meta batches: consecutive shuffled passes over the meta set, as many as `num_steps` batches need.

  As the reference's re-started meta loader, the meta stream cycles independently of the training
  stream.
  """
  passes = -(-num_steps * batch_size // num_items)
  keys = jax.random.split(key, passes)
  order = jnp.concatenate([jax.random.permutation(k, num_items) for k in keys])
  return order[:num_steps * batch_size].reshape(num_steps, batch_size)


def make_train_epoch(config: ml_collections.ConfigDict, mesh: Mesh, kind: str) -> Callable[..., Any]:
  """A whole training epoch with donated state.

  kind 'cross_entropy': `(state, images, labels, indices, key) -> (state, per-step metrics)`;
  kind 'metalabelnet':  `(state, images, labels, indices, meta_images, meta_labels, key) -> ...`.
  The epoch's order and augmentation keys come from `key` alone, so an epoch is reproducible. On
  accelerators the epoch is one jitted `lax.scan`; on CPU, XLA runs convolutions inside a loop body
  some 30x slower than outside one, so there each step is its own jitted call (config.epoch_loop).
  """
  if kind not in ("cross_entropy", "metalabelnet"):
    raise ValueError(f"Unknown epoch kind {kind!r}.")
  batch_size = config.batch_size
  augment_fn = _augment_fn(config)
  sharded = NamedSharding(mesh, P("data"))
  shard = lambda x: jax.lax.with_sharding_constraint(x, sharded)

  def gather(images, labels, idx, key, augmented=True):
    idx = shard(idx)
    pixels = images[idx]
    pixels = augment_fn(key, pixels) if augmented else augment.normalise(pixels)
    return {"image": shard(pixels), "label": shard(labels[idx])}

  def schedule(key, indices, num_meta):
    """Per-step inputs of one epoch: sample indices (and meta indices) and augmentation keys."""
    order_key, augment_key, meta_key = jax.random.split(key, 3)
    order = _epoch_order(order_key, indices, batch_size)
    keys = jax.random.split(augment_key, (order.shape[0], 2))
    if kind == "cross_entropy":
      return order, keys
    return order, keys, _cycling_order(meta_key, num_meta, order.shape[0], batch_size)

  def step(state, data, xs):
    if kind == "cross_entropy":
      images, labels = data
      idx, keys = xs
      return steps.warmup_step(state, gather(images, labels, idx, keys[0]))
    images, labels, meta_images, meta_labels = data
    idx, keys, meta_idx = xs
    meta_batch = gather(meta_images, meta_labels, meta_idx, keys[1],
                        augmented=config.augment.meta_batches)
    return steps.meta_step(state, gather(images, labels, idx, keys[0]), meta_batch)

  loop = config.epoch_loop
  if loop == "auto":
    loop = "host" if jax.default_backend() == "cpu" else "scan"

  if loop == "scan":
    @functools.partial(jax.jit, donate_argnums=0)
    def scanned_epoch(state, data, indices, key):
      xs = schedule(key, indices, data[2].shape[0] if len(data) > 2 else 0)
      return jax.lax.scan(lambda s, x: step(s, data, x), state, xs)
    epoch_fn = scanned_epoch
  else:
    jit_step = jax.jit(step, donate_argnums=0)
    jit_schedule = jax.jit(schedule, static_argnums=2)

    def host_loop_epoch(state, data, indices, key):
      xs = jit_schedule(key, indices, data[2].shape[0] if len(data) > 2 else 0)
      per_step = []
      for i in range(xs[0].shape[0]):
        state, metrics = jit_step(state, data, tuple(x[i] for x in xs))
        per_step.append(metrics)
      return state, jax.tree.map(lambda *m: jnp.stack(m), *per_step)
    epoch_fn = host_loop_epoch

  if kind == "cross_entropy":
    return lambda state, images, labels, indices, key: epoch_fn(
        state, (images, labels), indices, key)
  return lambda state, images, labels, indices, meta_images, meta_labels, key: epoch_fn(
      state, (images, labels, meta_images, meta_labels), indices, key)


def make_predict(mesh: Mesh, eval_batch_size: int, fn: Callable[[TrainState, jax.Array], jax.Array]
                 ) -> Callable[[TrainState, jax.Array], jax.Array]:
  """Jitted `fn(state, normalised images)` over a whole uint8 split, in batches, without augmentation."""
  sharded = NamedSharding(mesh, P("data"))
  batch = -(-eval_batch_size // mesh.size) * mesh.size

  @jax.jit
  def predict_all(state, images):
    count = images.shape[0]
    padded = -(-count // batch) * batch
    images = jnp.pad(images, ((0, padded - count),) + ((0, 0),) * (images.ndim - 1))
    images = images.reshape((padded // batch, batch) + images.shape[1:])
    per_batch = lambda x: fn(state, jax.lax.with_sharding_constraint(augment.normalise(x), sharded))
    outputs = jax.lax.map(per_batch, images)
    return outputs.reshape((padded,) + outputs.shape[2:])[:count]

  return predict_all


def accuracy(logits: jax.Array, labels: np.ndarray) -> float:
  return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == labels))


def _check_finite(metrics: dict[str, np.ndarray], epoch: int, phase: str) -> None:
  for name, values in metrics.items():
    bad = ~np.isfinite(values)
    if bad.any():
      raise FloatingPointError(
          f"Non-finite {name} in epoch {epoch} ({phase}), first at step {int(np.argmax(bad))}: "
          f"training diverged. Lower the learning rate (--config.optim.learning_rate, "
          f"--config.mln.learning_rate or --config.mln.inner_lr) or check the input data. "
          f"No results were written for this run.")


def prepare_data(config: ml_collections.ConfigDict) -> RunData:
  """Loads the dataset, splits meta/test by seed, makes the noisy labels, drops labels if asked."""
  dataset = data_lib.load_dataset(config.data)
  meta_images, meta_labels, test_images, test_labels = data_lib.split_meta_test(
      dataset.heldout_images, dataset.heldout_labels, config.data.num_meta, seed=config.seed)
  clean = dataset.train_labels.astype(np.int32)
  probabilities = None
  if config.noise.kind == "feature_dependent":
    probabilities = noise_probabilities(config, dataset)
  noisy = noise_lib.make_noisy_labels(
      clean, kind=config.noise.kind, rate=config.noise.rate, num_classes=dataset.num_classes,
      seed=config.seed, probs=probabilities, path=config.noise.labels_path or None)
  if config.data.num_unlabelled:
    noisy = noisy.copy()
    noisy[data_lib.choose_unlabelled(len(clean), config.data.num_unlabelled, config.seed)] = -1
  run_data = RunData(
      name=dataset.name, train_images=dataset.train_images, train_labels=noisy,
      clean_train_labels=clean, meta_images=meta_images, meta_labels=meta_labels.astype(np.int32),
      test_images=test_images, test_labels=test_labels.astype(np.int32),
      num_classes=dataset.num_classes,
      realised_noise_rate=noise_lib.realised_noise_rate(clean, noisy))
  smallest = min(len(run_data.labelled_indices), len(meta_labels))
  if config.batch_size > smallest:
    raise ValueError(
        f"config.batch_size={config.batch_size} is larger than the data: "
        f"{len(run_data.labelled_indices)} labelled training and {len(meta_labels)} meta samples. "
        f"Lower --config.batch_size (or raise --config.data.num_meta).")
  return run_data


def noise_probabilities(config: ml_collections.ConfigDict, dataset: data_lib.ImageDataset
                        ) -> np.ndarray:
  """The class probabilities P that feature-dependent noise is made from (config.noise.probabilities)."""
  source = config.noise.probabilities
  if source == "student":
    if dataset.name != "cifar10":
      raise ValueError("config.noise.probabilities='student' exists for CIFAR-10 only; use "
                       "'clean_model' or a path to an (N, C) .npy file.")
    return noise_lib.student_probabilities(os.path.join(config.data.data_dir, "student_probs.npz"))
  if source == "clean_model":
    return clean_model_probabilities(config, dataset)
  if not os.path.exists(source):
    raise FileNotFoundError(
        f"config.noise.probabilities={source!r} is neither 'student', 'clean_model' nor an "
        f"existing .npy file.")
  return np.load(source)


def clean_model_probabilities(config: ml_collections.ConfigDict, dataset: data_lib.ImageDataset
                              ) -> np.ndarray:
  """P from the configured classifier trained on the clean labels, 2-fold cross-fitted.

  Each half's probabilities come from a model trained on the other half, so P reflects how a model
  that never saw a sample would confuse it, not memorised labels.
  """
  mesh = make_mesh()
  model = build_model(config, dataset.num_classes)
  epoch_fn = make_train_epoch(config, mesh, "cross_entropy")
  predict = make_predict(mesh, config.eval_batch_size,
                         lambda s, x: jax.nn.softmax(steps.predict(s, x)))
  replicated = NamedSharding(mesh, P())
  images = jax.device_put(dataset.train_images, replicated)
  labels = jax.device_put(dataset.train_labels.astype(np.int32), replicated)
  folds = [np.sort(fold).astype(np.int32) for fold in
           np.array_split(np.random.default_rng(config.seed).permutation(len(labels)), 2)]
  probabilities = np.zeros((len(labels), dataset.num_classes), np.float32)
  for fold, (held_out, trained_on) in enumerate([(folds[0], folds[1]), (folds[1], folds[0])]):
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1000 + fold)
    state = jax.device_put(new_state(config, model, dataset.train_images.shape[1:],
                                     dataset.num_classes, key), replicated)
    indices = jax.device_put(trained_on, replicated)
    for epoch in range(config.noise.teacher_epochs):
      state, _ = epoch_fn(state, images, labels, indices, jax.random.fold_in(state.rng, epoch))
    probabilities[held_out] = np.asarray(predict(state, images[held_out]))
    logging.info("clean-model probabilities: fold %d trained on %d samples, held-out accuracy %.4f",
                 fold, len(trained_on), np.mean(probabilities[held_out].argmax(1)
                                                == dataset.train_labels[held_out]))
  return probabilities


def build_model(config: ml_collections.ConfigDict, num_classes: int):
  kwargs = {}
  if config.model.name == "conv_bn":
    kwargs = {"blocks": tuple(tuple(b) for b in config.model.blocks),
              "feature_dim": config.model.feature_dim}
  elif config.model.name == "mlp":
    kwargs = {"hidden": tuple(config.model.hidden)}
  return models.create_model(config.model.name, num_classes, **kwargs)


def new_state(config: ml_collections.ConfigDict, model, image_shape: tuple[int, ...],
              num_classes: int, key: jax.Array) -> TrainState:
  return create_train_state(
      key, model, tuple(image_shape), num_classes,
      learning_rate=config.optim.learning_rate, momentum=config.optim.momentum,
      weight_decay=config.optim.weight_decay, mln_learning_rate=config.mln.learning_rate,
      mln_weight_decay=config.mln.weight_decay, inner_lr=config.mln.inner_lr,
      meta_gradient=config.mln.meta_gradient)


def _git_commit() -> str:
  """The code's commit: $MLN_JAX_COMMIT where the tree travels without .git (the GPU machine)."""
  if os.environ.get("MLN_JAX_COMMIT"):
    return os.environ["MLN_JAX_COMMIT"]
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(__file__), check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _write_json_atomically(path: str, payload: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2)
  os.replace(tmp, path)


def _check_workdir_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """A workdir belongs to one config: resuming with another would silently mix two runs."""
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved != current:
      changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
      raise ValueError(f"{workdir} holds a run with a different config (differs in: "
                       f"{', '.join(changed)}). Resume with the same config or use a new --workdir.")
  else:
    _write_json_atomically(path, current)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       run_data: RunData | None = None) -> dict[str, Any]:
  """Runs one method ('metalabelnet' or 'cross_entropy'), resuming from `workdir` if it holds one.

  Returns (and writes to `workdir/results.json`) the per-epoch history (epochs counted from 1), the
  test accuracy at the best meta accuracy and at the last epoch, the realised noise rate, wall time
  and device.
  """
  config_lib.validate_config(config)
  with jax.default_matmul_precision(config.matmul_precision):
    return _train_and_evaluate(config, workdir, run_data)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        run_data: RunData | None) -> dict[str, Any]:
  if config.method not in ("metalabelnet", "cross_entropy"):
    raise ValueError(f"train_and_evaluate runs one method; got {config.method!r} (use run()).")
  os.makedirs(workdir, exist_ok=True)
  _check_workdir_config(workdir, config)
  results_path = os.path.join(workdir, RESULTS_FILE)
  if os.path.exists(results_path):
    logging.info("%s is complete; returning its results.", workdir)
    with open(results_path) as f:
      return json.load(f)

  start_time = time.time()
  run_data = run_data or prepare_data(config)
  logging.info("%s: %d training samples (%d labelled), %d meta, %d test; realised noise rate %.4f",
               run_data.name, len(run_data.train_labels), len(run_data.labelled_indices),
               len(run_data.meta_labels), len(run_data.test_labels), run_data.realised_noise_rate)
  np.savez(os.path.join(workdir, "labels.npz"), noisy=run_data.train_labels,
           clean=run_data.clean_train_labels)

  mesh = make_mesh()
  if config.batch_size % mesh.size:
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the number of "
                     f"devices ({mesh.size}).")
  replicated = NamedSharding(mesh, P())
  put = lambda x: jax.device_put(x, replicated)
  images, labels = put(run_data.train_images), put(run_data.train_labels)
  meta_images, meta_labels = put(run_data.meta_images), put(run_data.meta_labels)
  test_images = put(run_data.test_images)
  labelled, everything = put(run_data.labelled_indices), put(np.arange(len(labels), dtype=np.int32))

  model = build_model(config, run_data.num_classes)
  state = put(new_state(config, model, run_data.train_images.shape[1:], run_data.num_classes,
                        jax.random.PRNGKey(config.seed)))
  cross_entropy_epoch = make_train_epoch(config, mesh, "cross_entropy")
  meta_epoch = make_train_epoch(config, mesh, "metalabelnet")
  predict = make_predict(mesh, config.eval_batch_size, steps.predict)
  predict_soft_labels = make_predict(mesh, config.eval_batch_size, steps.predict_soft_labels)

  checkpoints = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      # Synchronous saves: the state is small next to an epoch, and a checkpoint is then complete
      # before the next epoch starts (a kill never loses a finished epoch).
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                           enable_async_checkpointing=False))
  # `soft_argmax`: the previous phase-2 epoch's argmax soft labels, for their stability.
  progress = {"history": [], "best": None, "elapsed_s": 0.0, "soft_argmax": None}
  start_epoch = 0
  if checkpoints.latest_step() is not None:
    start_epoch = checkpoints.latest_step()
    restored = checkpoints.restore(start_epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), progress=ocp.args.JsonRestore()))
    state, progress = restored.state, restored.progress
    logging.info("Resumed from the checkpoint after epoch %d in %s.", start_epoch, workdir)

  writer = writers.create_writer(workdir)
  if start_epoch == 0:
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()
                          if isinstance(v, (int, float, str, bool))})
  metalabelnet = config.method == "metalabelnet"
  for epoch in range(start_epoch, config.num_epochs):
    phase2 = metalabelnet and epoch >= config.warmup_epochs
    phase = "metalabelnet" if phase2 else ("warm-up" if metalabelnet else "cross-entropy")
    if phase2 and epoch == config.warmup_epochs:
      state = freeze_extractor(state)
    lr = config_lib.learning_rate_at(config, epoch)
    state = state.replace(opt_state=set_learning_rate(state.opt_state, lr))
    epoch_key = jax.random.fold_in(state.rng, epoch)

    epoch_start = time.time()
    if phase2:
      state, step_metrics = meta_epoch(state, images, labels, everything, meta_images, meta_labels,
                                       epoch_key)
    else:
      state, step_metrics = cross_entropy_epoch(state, images, labels, labelled, epoch_key)
    step_metrics = jax.tree.map(np.asarray, step_metrics)  # Waits for the epoch.
    train_time = time.time() - epoch_start
    _check_finite(step_metrics, epoch, phase)
    num_images = next(iter(step_metrics.values())).shape[0] * config.batch_size

    meta_accuracy = accuracy(predict(state, meta_images), run_data.meta_labels)
    test_accuracy = accuracy(predict(state, test_images), run_data.test_labels)
    record = {"epoch": epoch + 1, "phase": phase, "learning_rate": lr,
              **{f"train/{k}": float(v.mean()) for k, v in step_metrics.items()},
              "meta_accuracy": meta_accuracy, "test_accuracy": test_accuracy,
              "train_time_s": train_time, "epoch_time_s": time.time() - epoch_start,
              "images_per_s": num_images / train_time}
    if phase2:
      soft_argmax = np.asarray(jnp.argmax(predict_soft_labels(state, images), -1))
      previous = progress["soft_argmax"]
      record.update(labels_lib.soft_label_agreement(
          soft_argmax, run_data.train_labels, run_data.clean_train_labels,
          None if previous is None else np.asarray(previous)))
      progress["soft_argmax"] = soft_argmax.tolist()
    progress["history"].append(record)
    # Model selection as in the reference: best meta accuracy over the epochs of the method's own
    # training (phase 2 for MetaLabelNet).
    if (phase2 or not metalabelnet) and (progress["best"] is None
                                         or meta_accuracy > progress["best"]["meta_accuracy"]):
      progress["best"] = {"epoch": epoch + 1, "meta_accuracy": meta_accuracy,
                          "test_accuracy": test_accuracy}
    progress["elapsed_s"] += time.time() - epoch_start
    writer.write_scalars(epoch + 1, {k: v for k, v in record.items()
                                     if isinstance(v, float) and k != "epoch"})
    logging.info("epoch %3d/%d [%s] lr %.0e  loss %.4f  meta acc %.4f  test acc %.4f  "
                 "%.0f img/s (%.1f s)", epoch + 1, config.num_epochs, phase, lr,
                 record["train/loss"], meta_accuracy, test_accuracy, record["images_per_s"],
                 record["epoch_time_s"])
    if (epoch + 1) % config.checkpoint_every_epochs == 0 or epoch + 1 == config.num_epochs:
      checkpoints.save(epoch + 1, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)))
  checkpoints.wait_until_finished()
  writer.flush()

  label_issues = None
  if metalabelnet:
    soft_labels = np.asarray(predict_soft_labels(state, images))
    labels_lib.write_soft_labels(os.path.join(workdir, "soft_labels.npz"), run_data.train_labels,
                                 soft_labels, run_data.clean_train_labels)
    label_issues = labels_lib.label_issue_report(run_data.train_labels, soft_labels,
                                                 run_data.clean_train_labels)
    logging.info("Label issues against the clean labels: %s", label_issues)

  history = progress["history"]
  results = {
      "method": config.method,
      "dataset": run_data.name,
      "noise": {"kind": config.noise.kind, "rate": config.noise.rate,
                "realised_rate": run_data.realised_noise_rate},
      "best": progress["best"],
      "last": {"epoch": history[-1]["epoch"], "meta_accuracy": history[-1]["meta_accuracy"],
               "test_accuracy": history[-1]["test_accuracy"]},
      "history": history,
      "label_issues": label_issues,
      "image_shape": list(run_data.train_images.shape[1:]),
      "num_classes": run_data.num_classes,
      "train_time_s": progress["elapsed_s"],
      "wall_time_s": time.time() - start_time,
      "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
      "jax_version": jax.__version__,
      "matmul_precision": config.matmul_precision,
      "commit": _git_commit(),
  }
  _write_json_atomically(results_path, results)
  logging.info("%s done: test accuracy %.4f at the best meta epoch %d, %.4f at the last epoch.",
               config.method, results["best"]["test_accuracy"], results["best"]["epoch"],
               results["last"]["test_accuracy"])
  return results


def load_trained_state(workdir: str) -> tuple[TrainState, ml_collections.ConfigDict]:
  """The final train state of a finished run in `workdir` (classifier, extractor, MetaLabelNet)."""
  results_path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(results_path):
    raise FileNotFoundError(f"{results_path} does not exist: {workdir} holds no finished run.")
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(results_path) as f:
    results = json.load(f)
  model = build_model(config, results["num_classes"])
  abstract = new_state(config, model, tuple(results["image_shape"]), results["num_classes"],
                       jax.random.PRNGKey(0))
  checkpoints = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
  restored = checkpoints.restore(checkpoints.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))
  return restored.state, config


def soft_labels_for(state: TrainState, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
  """MetaLabelNet's soft labels for uint8 NHWC images (new, unlabelled or training images)."""
  mesh = make_mesh()
  replicated = NamedSharding(mesh, P())
  predict = make_predict(mesh, batch_size, steps.predict_soft_labels)
  return np.asarray(predict(jax.device_put(state, replicated), jax.device_put(images, replicated)))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs `config.method`; for 'both', each method in its own sub-folder and a comparison of the two."""
  config_lib.validate_config(config)
  if config.method != "both":
    return train_and_evaluate(config, workdir)
  with jax.default_matmul_precision(config.matmul_precision):
    run_data = prepare_data(config)
  results = {}
  for method in ("cross_entropy", "metalabelnet"):
    method_config = config.copy_and_resolve_references()
    method_config.method = method
    results[method] = train_and_evaluate(method_config, os.path.join(workdir, method), run_data)
  comparison = {method: {"best_test_accuracy": r["best"]["test_accuracy"],
                         "last_test_accuracy": r["last"]["test_accuracy"],
                         "train_time_s": r["train_time_s"]} for method, r in results.items()}
  comparison["realised_noise_rate"] = run_data.realised_noise_rate
  _write_json_atomically(os.path.join(workdir, "comparison.json"), comparison)
  lines = [f"{'method':<15}{'best-by-meta test acc':>24}{'last-epoch test acc':>22}"]
  for method in ("cross_entropy", "metalabelnet"):
    lines.append(f"{method:<15}{comparison[method]['best_test_accuracy']:>24.4f}"
                 f"{comparison[method]['last_test_accuracy']:>22.4f}")
  print(f"\n{config.noise.kind} noise, realised rate {run_data.realised_noise_rate:.3f}:\n"
        + "\n".join(lines))
  return results


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat
