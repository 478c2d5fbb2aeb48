"""The two-phase MetaLabelNet loop: warm-up, freeze the extractor, phase 2; evaluate after every epoch.

Whole epochs run on the device: the dataset sits in device memory as uint8, shuffling and augmentation
happen on the device, and on GPU/TPU an epoch is one jitted `lax.scan` (on CPU, one jitted call per
step; see `make_train_epoch`). Batches are sharded over all devices of a `Mesh` (global-batch
semantics).
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
from mln_jax.train_state import TrainState, begin_phase2, create_train_state, set_learning_rate

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


def replicate(mesh: Mesh, tree: Any) -> Any:
  """`tree` (arrays, a train state) put on every device of `mesh` in full.

  With several processes, each builds its devices' copies from its own (identical) host values;
  `device_put` would first gather every process's copy to check that they agree.
  """
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_callback(
      np.shape(x), sharding, lambda index, x=np.asarray(x): x[index]), tree)


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


def make_train_epoch(config: ml_collections.ConfigDict, mesh: Mesh, kind: str,
                     num_runs: int | None = None) -> Callable[..., Any]:
  """A whole training epoch with donated state.

  kind 'cross_entropy': `(state, images, labels, indices, key) -> (state, per-step metrics)`;
  kind 'metalabelnet':  `(state, images, labels, indices, meta_images, meta_labels, key) -> ...`.
  With `num_runs`, independent runs go through one program (`vmap`): the state, labels, indices,
  meta data and key have a leading run axis, the training images are shared, and metrics come back
  as (steps, runs). The epoch's order and augmentation keys come from `key` alone, so an epoch is
  reproducible. On accelerators the epoch is one jitted `lax.scan`; on CPU, XLA runs convolutions
  inside a loop body far slower than outside one (see README), so there each step is its own jitted
  call (config.epoch_loop).
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

  def epoch_schedule(key, indices, num_meta):
    """The epoch's per-step inputs with the step axis first (then the run axis, if any)."""
    fn = lambda k, i: schedule(k, i, num_meta)
    if num_runs is None:
      return fn(key, indices)
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), jax.vmap(fn)(key, indices))

  run_step = step
  if num_runs is not None:
    data_axes = (None, 0) if kind == "cross_entropy" else (None, 0, 0, 0)
    run_step = jax.vmap(step, in_axes=(0, data_axes, 0))
  num_meta_of = lambda data: data[2].shape[-4] if len(data) > 2 else 0

  loop = config.epoch_loop
  if loop == "auto":
    loop = "host" if jax.default_backend() == "cpu" else "scan"

  if loop == "scan":
    @functools.partial(jax.jit, donate_argnums=0)
    def scanned_epoch(state, data, indices, key):
      xs = epoch_schedule(key, indices, num_meta_of(data))
      return jax.lax.scan(lambda s, x: run_step(s, data, x), state, xs)
    epoch_fn = scanned_epoch
  else:
    jit_step = jax.jit(run_step, donate_argnums=0)
    jit_schedule = jax.jit(epoch_schedule, static_argnums=2)

    def host_loop_epoch(state, data, indices, key):
      xs = jit_schedule(key, indices, num_meta_of(data))
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


def make_predict(mesh: Mesh, eval_batch_size: int, fn: Callable[[TrainState, jax.Array], jax.Array],
                 num_runs: int | None = None, shared_images: bool = False,
                 normalise: Callable[[jax.Array], jax.Array] = augment.normalise
                 ) -> Callable[[TrainState, jax.Array], jax.Array]:
  """Jitted `fn(state, normalised images)` over a whole uint8 split, in batches, without augmentation.

  With `num_runs`, the state has a leading run axis, and so do the images unless `shared_images`;
  the runs share `eval_batch_size`, so memory does not grow with their number.
  """
  sharded = NamedSharding(mesh, P("data"))
  per_run = max(eval_batch_size // (num_runs or 1), 1)
  batch = -(-per_run // mesh.size) * mesh.size

  def predict_all(state, images):
    count = images.shape[0]
    padded = -(-count // batch) * batch
    images = jnp.pad(images, ((0, padded - count),) + ((0, 0),) * (images.ndim - 1))
    images = images.reshape((padded // batch, batch) + images.shape[1:])
    per_batch = lambda x: fn(state, jax.lax.with_sharding_constraint(normalise(x), sharded))
    outputs = jax.lax.map(per_batch, images)
    return outputs.reshape((padded,) + outputs.shape[2:])[:count]

  if num_runs is None:
    return jax.jit(predict_all)
  return jax.jit(jax.vmap(predict_all, in_axes=(0, None if shared_images else 0)))


def _check_finite(metrics: dict[str, np.ndarray], epoch: int, phase: str, run: str) -> None:
  for name, values in metrics.items():
    bad = ~np.isfinite(values)
    if bad.any():
      raise FloatingPointError(
          f"Non-finite {name} in epoch {epoch + 1} ({phase}) of {run}, first at step "
          f"{int(np.argmax(bad))}: training diverged. Lower the learning rate "
          f"(--config.optim.learning_rate, --config.mln.learning_rate or --config.mln.inner_lr) or "
          f"check the input data. All runs trained with it stopped too; no results were written.")


def prepare_data(config: ml_collections.ConfigDict,
                 dataset: data_lib.ImageDataset | None = None) -> RunData:
  """Loads the dataset (unless given), splits meta/test by seed, makes the noisy labels, drops labels
  if asked."""
  dataset = dataset or data_lib.load_dataset(config.data)
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
  if source.endswith(".npz"):  # e.g. the pack's student_probs.npz beside another CIFAR-10 source
    return noise_lib.student_probabilities(source)
  if not os.path.exists(source):
    raise FileNotFoundError(
        f"config.noise.probabilities={source!r} is neither 'student', 'clean_model' nor an "
        f"existing .npy or .npz file.")
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
  images = replicate(mesh, dataset.train_images)
  labels = replicate(mesh, dataset.train_labels.astype(np.int32))
  folds = [np.sort(fold).astype(np.int32) for fold in
           np.array_split(np.random.default_rng(config.seed).permutation(len(labels)), 2)]
  probabilities = np.zeros((len(labels), dataset.num_classes), np.float32)
  for fold, (held_out, trained_on) in enumerate([(folds[0], folds[1]), (folds[1], folds[0])]):
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1000 + fold)
    state = replicate(mesh, new_state(config, model, dataset.train_images.shape[1:],
                                      dataset.num_classes, key))
    indices = replicate(mesh, trained_on)
    for epoch in range(config.noise.teacher_epochs):
      state, _ = epoch_fn(state, images, labels, indices, jax.random.fold_in(state.rng, epoch))
    probabilities[held_out] = np.asarray(predict(state, images[held_out]))
    logging.info("clean-model probabilities: fold %d trained on %d samples, held-out accuracy %.4f",
                 fold, len(trained_on), np.mean(probabilities[held_out].argmax(1)
                                                == dataset.train_labels[held_out]))
  return probabilities


def build_model(config: ml_collections.ConfigDict, num_classes: int):
  kwargs = {"dtype": jnp.bfloat16 if config.compute_dtype == "bfloat16" else None}
  if config.model.name == "conv_bn":
    kwargs.update(blocks=tuple(tuple(b) for b in config.model.blocks),
                  feature_dim=config.model.feature_dim)
  elif config.model.name == "mlp":
    kwargs.update(hidden=tuple(config.model.hidden))
  elif config.model.name == "resnet":
    kwargs.update(stage_sizes=tuple(config.model.stage_sizes), num_filters=config.model.num_filters)
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


def write_json_atomically(path: str, payload: Any) -> None:
  """Writes JSON so that a reader never sees a half-written file."""
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2)
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def run_environment(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a result was computed on and with: device, JAX version, precision settings, commit."""
  return {"device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
          "processes": jax.process_count(),
          "jax_version": jax.__version__,
          "matmul_precision": config.matmul_precision,
          "compute_dtype": config.compute_dtype,
          "commit": _git_commit()}


# Settings a resumed run may change: they do not change its numbers (e.g. keeping the meta set in
# device memory or streaming it gives the same batches, and may be switched when memory runs short).
RESUMABLE_CHANGES = ("data.meta_in_memory", "export_soft_labels")


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict, checkpoint_dir: str,
                         write: bool = True) -> None:
  """A workdir belongs to one config: resuming with another would silently mix two runs.

  A workdir whose run stopped before its first checkpoint (say a wrong data_dir or a diverging
  learning rate) holds nothing to resume, so a corrected config replaces the saved one.
  """
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      saved, now = config_lib.flatten(json.load(f)), config_lib.flatten(current)
    changed = sorted(k for k in set(saved) | set(now)
                     if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
    if not changed:
      return
    if (ocp.utils.checkpoint_steps(checkpoint_dir)
        or os.path.exists(os.path.join(workdir, RESULTS_FILE))):
      raise ValueError(f"{workdir} holds a run with a different config (differs in: "
                       f"{', '.join(changed)}). Resume with the same config or use a new --workdir.")
    logging.info("%s: no checkpoint yet, so the new config replaces the saved one (it differed "
                 "in %s).", workdir, ", ".join(changed))
  if write:
    write_json_atomically(path, current)


# Keys in which runs that share one program (one vmapped state) may differ.
_PER_RUN_KEYS = ("seed", "noise")


def _check_runs_compatible(configs: list[ml_collections.ConfigDict]) -> None:
  shared = lambda c: {k: v for k, v in json.loads(c.to_json_best_effort()).items()
                      if k not in _PER_RUN_KEYS}
  first = shared(configs[0])
  for index, config in enumerate(configs[1:], 1):
    settings = shared(config)
    if settings != first:
      differing = sorted(k for k in settings if settings[k] != first.get(k))
      raise ValueError(f"Runs trained together may differ only in {_PER_RUN_KEYS}; run {index} "
                       f"also differs in {differing}.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       run_data: RunData | None = None) -> dict[str, Any]:
  """Runs one method ('metalabelnet' or 'cross_entropy'), resuming from `workdir` if it holds one.

  Returns (and writes to `workdir/results.json`) the per-epoch history (epochs counted from 1), the
  test accuracy at the best meta accuracy and at the last epoch, the realised noise rate, wall time
  and device.
  """
  if config.num_runs != 1:
    raise ValueError(f"train_and_evaluate trains one run; config.num_runs={config.num_runs} "
                     "(use run() or train_and_evaluate_runs()).")
  return train_and_evaluate_runs([config], workdir,
                                 None if run_data is None else [run_data])[0]


def train_and_evaluate_runs(configs: list[ml_collections.ConfigDict], workdir: str,
                            run_datas: list[RunData] | None = None) -> list[dict[str, Any]]:
  """Trains independent runs (differing only in seed and noise settings) in one program.

  The runs share the training images and one jitted, `vmap`ped step; each has its own labels, meta
  and test split, states and random streams, and gets its own folder `workdir/run_<i>` (just
  `workdir` for a single run) with config, labels, TensorBoard files and results.json. The stacked
  state is checkpointed in `workdir/checkpoints`, so all runs resume together.
  """
  for config in configs:
    config_lib.validate_config(config)
  _check_runs_compatible(configs)
  if configs[0].method not in ("metalabelnet", "cross_entropy"):
    raise ValueError(f"train_and_evaluate runs one method; got {configs[0].method!r} (use run()).")
  with jax.default_matmul_precision(configs[0].matmul_precision):
    return _train_and_evaluate_runs(configs, workdir, run_datas)


def _run_dirs(workdir: str, num_runs: int) -> list[str]:
  if num_runs == 1:
    return [workdir]
  return [os.path.join(workdir, f"run_{index}") for index in range(num_runs)]


def _train_and_evaluate_runs(configs: list[ml_collections.ConfigDict], workdir: str,
                             run_datas: list[RunData] | None) -> list[dict[str, Any]]:
  config, num_runs = configs[0], len(configs)
  run_dirs = _run_dirs(workdir, num_runs)
  for run_dir, run_config in zip(run_dirs, configs):
    os.makedirs(run_dir, exist_ok=True)
    check_workdir_config(run_dir, run_config, os.path.join(workdir, "checkpoints"))
  results_paths = [os.path.join(d, RESULTS_FILE) for d in run_dirs]
  if all(os.path.exists(p) for p in results_paths):
    logging.info("%s is complete; returning its results.", workdir)
    return [read_json(path) for path in results_paths]

  start_time = time.time()
  if run_datas is None:
    dataset = data_lib.load_dataset(config.data)
    run_datas = [prepare_data(c, dataset) for c in configs]
  for run_dir, run_data in zip(run_dirs, run_datas):
    logging.info("%s in %s: %d training samples (%d labelled), %d meta, %d test; realised noise "
                 "rate %.4f", run_data.name, run_dir, len(run_data.train_labels), len(run_data.labelled_indices),
                 len(run_data.meta_labels), len(run_data.test_labels), run_data.realised_noise_rate)
    np.savez(os.path.join(run_dir, "labels.npz"), noisy=run_data.train_labels,
             clean=run_data.clean_train_labels)
  first = run_datas[0]
  if len({len(d.labelled_indices) for d in run_datas}) > 1:
    raise ValueError("Runs trained together need the same number of labelled samples.")

  mesh = make_mesh()
  if config.batch_size % mesh.size:
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the number of "
                     f"devices ({mesh.size}).")
  put = lambda x: replicate(mesh, x)
  stacked = lambda field: put(np.stack([getattr(d, field) for d in run_datas]))
  images = put(first.train_images)  # Shared by all runs: one copy on the device.
  labels, meta_images, meta_labels = (stacked("train_labels"), stacked("meta_images"),
                                      stacked("meta_labels"))
  test_images = stacked("test_images")
  labelled = put(np.stack([d.labelled_indices for d in run_datas]))
  everything = put(np.tile(np.arange(len(first.train_labels), dtype=np.int32), (num_runs, 1)))

  model = build_model(config, first.num_classes)
  keys = jnp.stack([jax.random.PRNGKey(c.seed) for c in configs])
  state = put(jax.vmap(lambda key: new_state(config, model, first.train_images.shape[1:],
                                             first.num_classes, key))(keys))
  cross_entropy_epoch = make_train_epoch(config, mesh, "cross_entropy", num_runs)
  meta_epoch = make_train_epoch(config, mesh, "metalabelnet", num_runs)
  predict = make_predict(mesh, config.eval_batch_size, steps.predict, num_runs)
  predict_soft_labels = make_predict(mesh, config.eval_batch_size, steps.predict_soft_labels,
                                     num_runs, shared_images=True)

  checkpoints = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      # Synchronous saves: the state is small next to an epoch, and a checkpoint is then complete
      # before the next epoch starts (a kill never loses a finished epoch).
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                           enable_async_checkpointing=False))
  # Per run: history, best epoch, and the previous phase-2 epoch's argmax soft labels (stability).
  progress = {"num_runs": num_runs, "elapsed_s": 0.0,
              "runs": [{"history": [], "best": None, "soft_argmax": None} for _ in configs]}
  start_epoch = 0
  if checkpoints.latest_step() is not None:
    start_epoch = checkpoints.latest_step()
    saved = checkpoints.restore(start_epoch, args=ocp.args.Composite(
        progress=ocp.args.JsonRestore())).progress
    if saved["num_runs"] != num_runs:
      raise ValueError(f"{workdir} holds a checkpoint of {saved['num_runs']} runs, not "
                       f"{num_runs}. Resume with the same runs or use a new --workdir.")
    restored = checkpoints.restore(start_epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), progress=ocp.args.JsonRestore()))
    state, progress = restored.state, restored.progress
    logging.info("Resumed from the checkpoint after epoch %d in %s.", start_epoch, workdir)

  run_writers = [writers.create_writer(d) for d in run_dirs]
  if start_epoch == 0:
    for writer, run_config in zip(run_writers, configs):
      writer.write_hparams({k: v for k, v in config_lib.flatten(run_config.to_dict()).items()
                            if isinstance(v, (int, float, str, bool))})
  metalabelnet = config.method == "metalabelnet"
  for epoch in range(start_epoch, config.num_epochs):
    phase2 = metalabelnet and epoch >= config.warmup_epochs
    phase = "metalabelnet" if phase2 else ("warm-up" if metalabelnet else "cross-entropy")
    if phase2:
      state = begin_phase2(state, at_warmup_end=epoch == config.warmup_epochs)
    lr = config_lib.learning_rate_at(config, epoch)
    state = state.replace(opt_state=set_learning_rate(state.opt_state, lr))
    epoch_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.rng, epoch)

    epoch_start = time.time()
    if phase2:
      state, step_metrics = meta_epoch(state, images, labels, everything, meta_images, meta_labels,
                                       epoch_keys)
    else:
      state, step_metrics = cross_entropy_epoch(state, images, labels, labelled, epoch_keys)
    step_metrics = jax.tree.map(np.asarray, step_metrics)  # (steps, runs); waits for the epoch.
    train_time = time.time() - epoch_start
    for index, run_dir in enumerate(run_dirs):
      _check_finite({k: v[:, index] for k, v in step_metrics.items()}, epoch, phase, run_dir)
    num_images = next(iter(step_metrics.values())).shape[0] * config.batch_size * num_runs

    meta_predictions = np.asarray(jnp.argmax(predict(state, meta_images), -1))
    test_predictions = np.asarray(jnp.argmax(predict(state, test_images), -1))
    soft_argmax = (np.asarray(jnp.argmax(predict_soft_labels(state, images), -1)) if phase2
                   else None)
    epoch_time = time.time() - epoch_start
    for index, (run, run_data) in enumerate(zip(progress["runs"], run_datas)):
      record = {"epoch": epoch + 1, "phase": phase, "learning_rate": lr,
                **{f"train/{k}": float(v[:, index].mean()) for k, v in step_metrics.items()},
                "meta_accuracy": float(np.mean(meta_predictions[index] == run_data.meta_labels)),
                "test_accuracy": float(np.mean(test_predictions[index] == run_data.test_labels)),
                "train_time_s": train_time, "epoch_time_s": epoch_time,
                "images_per_s": num_images / train_time}
      if phase2:
        previous = run["soft_argmax"]
        record.update(labels_lib.soft_label_agreement(
            soft_argmax[index], run_data.train_labels, run_data.clean_train_labels,
            None if previous is None else np.asarray(previous)))
        run["soft_argmax"] = soft_argmax[index].tolist()
      run["history"].append(record)
      # Model selection as in the reference: best meta accuracy over the epochs of the method's
      # own training (phase 2 for MetaLabelNet).
      if (phase2 or not metalabelnet) and (
          run["best"] is None or record["meta_accuracy"] > run["best"]["meta_accuracy"]):
        run["best"] = {"epoch": epoch + 1, "meta_accuracy": record["meta_accuracy"],
                       "test_accuracy": record["test_accuracy"]}
      run_writers[index].write_scalars(epoch + 1, {k: v for k, v in record.items()
                                                   if isinstance(v, float) and k != "epoch"})
    progress["elapsed_s"] += epoch_time
    accuracies = lambda key: " ".join(f"{r['history'][-1][key]:.4f}" for r in progress["runs"])
    logging.info("epoch %3d/%d [%s] lr %.0e  loss %s  meta acc %s  test acc %s  %.0f img/s "
                 "(%.1f s)", epoch + 1, config.num_epochs, phase, lr,
                 " ".join(f"{v:.4f}" for v in step_metrics["loss"].mean(0)), accuracies(
                     "meta_accuracy"), accuracies("test_accuracy"), num_images / train_time,
                 epoch_time)
    if (epoch + 1) % config.checkpoint_every_epochs == 0 or epoch + 1 == config.num_epochs:
      checkpoints.save(epoch + 1, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)))
  checkpoints.wait_until_finished()
  for writer in run_writers:
    writer.flush()

  final_soft_labels = (np.asarray(predict_soft_labels(state, images)) if metalabelnet else None)
  all_results = []
  for index, (run_dir, run, run_data, run_config) in enumerate(
      zip(run_dirs, progress["runs"], run_datas, configs)):
    label_issues = None
    if metalabelnet:
      labels_lib.write_soft_labels(os.path.join(run_dir, "soft_labels.npz"), run_data.train_labels,
                                   final_soft_labels[index], run_data.clean_train_labels)
      label_issues = labels_lib.label_issue_report(run_data.train_labels, final_soft_labels[index],
                                                   run_data.clean_train_labels)
    history = run["history"]
    results = {
        "method": config.method,
        "dataset": run_data.name,
        "seed": run_config.seed,
        "noise": {"kind": run_config.noise.kind,
                  "rate": (run_config.noise.rate if run_config.noise.kind in noise_lib.RATED_KINDS
                           else None),
                  "realised_rate": run_data.realised_noise_rate},
        "best": run["best"],
        "last": {"epoch": history[-1]["epoch"], "meta_accuracy": history[-1]["meta_accuracy"],
                 "test_accuracy": history[-1]["test_accuracy"]},
        "history": history,
        "label_issues": label_issues,
        "image_shape": list(run_data.train_images.shape[1:]),
        "num_classes": run_data.num_classes,
        "checkpoint": {"dir": os.path.relpath(os.path.join(workdir, "checkpoints"), run_dir),
                       "run_index": index, "num_runs": num_runs},
        # Training, evaluation and soft-label passes over all epochs (across resumes); for runs
        # trained together, those of the shared program.
        "epochs_time_s": progress["elapsed_s"],
        "wall_time_s": time.time() - start_time,
        "concurrent_runs": num_runs,
        **run_environment(config),
    }
    write_json_atomically(os.path.join(run_dir, RESULTS_FILE), results)
    logging.info("%s %s done: test accuracy %.4f at the best meta epoch %d, %.4f at the last "
                 "epoch; label issues %s.", config.method, run_dir, results["best"]["test_accuracy"],
                 results["best"]["epoch"], results["last"]["test_accuracy"], label_issues)
    all_results.append(results)
  return all_results


def load_trained_state(workdir: str) -> tuple[TrainState, ml_collections.ConfigDict]:
  """The final train state of a finished run in `workdir` (classifier, extractor, MetaLabelNet);
  for a run trained together with others, its slice of their common checkpoint."""
  results_path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(results_path):
    raise FileNotFoundError(f"{results_path} does not exist: {workdir} holds no finished run (for "
                            f"runs trained together, name one run's folder, {workdir}/run_<i>).")
  config = ml_collections.ConfigDict(read_json(os.path.join(workdir, "config.json")))
  results = read_json(results_path)
  where = results["checkpoint"]
  model = build_model(config, results["num_classes"])
  make = lambda key: new_state(config, model, tuple(results["image_shape"]),
                               results["num_classes"], key)
  stacked = where["num_runs"] is not None  # runs trained together have a leading run axis
  abstract = (jax.eval_shape(jax.vmap(make), jnp.zeros((where["num_runs"], 2), jnp.uint32))
              if stacked else jax.eval_shape(make, jnp.zeros((2,), jnp.uint32)))
  # Restore onto this process's first device, whatever devices the run was trained on.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          abstract)
  checkpoints = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, where["dir"])))
  state = checkpoints.restore(checkpoints.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract))).state
  state = jax.tree.map(lambda x: x[where["run_index"]], state) if stacked else state
  # A MetaLabelNet run ends in phase 2, with the extractor frozen at the end of its warm-up.
  return state.replace(extractor_frozen=config.method == "metalabelnet"), config


def soft_labels_for(state: TrainState, images: np.ndarray, config: ml_collections.ConfigDict,
                    batch_size: int = 1000) -> np.ndarray:
  """MetaLabelNet's soft labels for uint8 NHWC images (new, unlabelled or training images).

  `state` and `config` are a finished run's, from `load_trained_state`: the config says how images
  are normalised (streamed datasets: ImageNet's statistics; they must already have the run's size,
  which `input_pipeline.decode_all` gives files).
  """
  streamed = config.data.name in config_lib.STREAMED_DATASETS
  mesh = make_mesh()
  predict = make_predict(mesh, batch_size, steps.predict_soft_labels,
                         normalise=augment.normalise_imagenet if streamed else augment.normalise)
  return np.asarray(predict(replicate(mesh, state), replicate(mesh, images)))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, list[dict[str, Any]]]:
  """Runs `config.method` (both methods for 'both', each in its own sub-folder) over
  `config.num_runs` seeds (config.seed, config.seed + 1, ...) trained together; prints and writes
  (`comparison.json`) a summary. Returns method -> the runs' results."""
  config_lib.validate_config(config)
  methods = ("cross_entropy", "metalabelnet") if config.method == "both" else (config.method,)
  configs = []
  for offset in range(config.num_runs):
    run_config = config.copy_and_resolve_references()
    run_config.seed = config.seed + offset
    configs.append(run_config)
  method_dirs = {m: workdir if len(methods) == 1 else os.path.join(workdir, m) for m in methods}
  streamed = config.data.name in config_lib.STREAMED_DATASETS
  if jax.process_count() > 1 and not streamed:
    raise ValueError(f"{config.data.name} is held in device memory and trains in one process; "
                     "multi-process runs (--multihost) are for the streamed datasets.")
  finished = all(os.path.exists(os.path.join(d, RESULTS_FILE))
                 for m in methods for d in _run_dirs(method_dirs[m], len(configs)))
  run_datas = None
  if not finished and not streamed:  # Noise with 'clean_model' trains teachers: not when finished.
    with jax.default_matmul_precision(config.matmul_precision):
      dataset = data_lib.load_dataset(config.data)
      run_datas = [prepare_data(c, dataset) for c in configs]
  results = {}
  for method in methods:
    method_configs = []
    for run_config in configs:
      method_config = run_config.copy_and_resolve_references()
      method_config.method = method
      method_configs.append(method_config)
    if streamed:
      from mln_jax import train_stream  # needs TensorFlow (tf.data)
      results[method] = [train_stream.train_and_evaluate_stream(method_configs[0],
                                                                method_dirs[method])]
    else:
      results[method] = train_and_evaluate_runs(method_configs, method_dirs[method], run_datas)
  summary = {method: {"best_test_accuracy": [r["best"]["test_accuracy"] for r in runs],
                      "last_test_accuracy": [r["last"]["test_accuracy"] for r in runs],
                      "epochs_time_s": runs[0]["epochs_time_s"]}
             for method, runs in results.items()}
  summary["seeds"] = [c.seed for c in configs]
  summary["realised_noise_rate"] = [r["noise"]["realised_rate"] for r in results[methods[0]]]
  if jax.process_index() > 0:  # process 0 writes and prints for all
    return results
  write_json_atomically(os.path.join(workdir, "comparison.json"), summary)
  lines = [f"{'method':<15}{'best-by-meta test acc':>24}{'last-epoch test acc':>22}"]
  for method in methods:
    best, last = summary[method]["best_test_accuracy"], summary[method]["last_test_accuracy"]
    lines.append(f"{method:<15}{_mean_std(best):>24}{_mean_std(last):>22}")
  rates = " ".join("unknown" if r is None else f"{r:.3f}" for r in summary["realised_noise_rate"])
  noise = ("the dataset's own noisy labels" if streamed
           else f"{config.noise.kind} noise {config.noise.rate}"
           if config.noise.kind in noise_lib.RATED_KINDS else f"{config.noise.kind} noise")
  header = f"{config.data.name}, {noise}, seeds {summary['seeds']}, realised noise rates {rates}:"
  print("\n" + header + "\n" + "\n".join(lines))
  return results


def _mean_std(values: list[float]) -> str:
  if len(values) == 1:
    return f"{values[0]:.4f}"
  return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"
