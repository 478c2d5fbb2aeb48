"""Data held in device memory (CIFAR-10, digits): the loop's in-memory source and its epochs.

The training images sit on every device as uint8 once, shared by all runs; labels, meta and test
splits are stacked per run (`num_runs` runs train together in one `vmap`ped program). Shuffling and
augmentation happen on the device, and on GPU/TPU a whole epoch is one jitted `lax.scan` (on CPU one
jitted call per step, as XLA runs convolutions inside loop bodies far slower; `config.epoch_loop`).
Batches are sharded over the `Mesh` (global-batch semantics).
"""

from __future__ import annotations

import functools
import json
import os
import time
import zipfile
from typing import Any, Callable, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mln_jax import augment, data as data_lib, dataset as dataset_lib, human_labels
from mln_jax import noise as noise_lib, steps
from mln_jax.dataset import Dataset, Split
from mln_jax.loop import Chunk
from mln_jax.methods import Method, Phase
from mln_jax.runtime import make_mesh, replicate
from mln_jax.train_state import TrainState, state_from_config

# The data one epoch reads: (train images, labels) or, for phases with meta batches, also
# (meta images, meta labels).
EpochData = tuple[jax.Array, ...]


def check_batch_size(config: ml_collections.ConfigDict, sizes: dict[str, int],
                     num_devices: int) -> None:
  """Every epoch needs a whole batch of each kind of samples in `sizes` (labelled training, meta,
  a clean-model teacher's fold), split evenly over the devices: checked before anything trains."""
  small = {what: n for what, n in sizes.items() if n < config.batch_size}
  if small:
    raise ValueError(
        f"config.batch_size={config.batch_size} is larger than the data: "
        + ", ".join(f"{n} {what} samples" for what, n in small.items())
        + ". Lower --config.batch_size (or raise --config.data.num_meta).")
  if config.batch_size % num_devices:
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the number of "
                     f"devices ({num_devices}).")


def prepare_data(config: ml_collections.ConfigDict,
                 image_dataset: data_lib.ImageDataset | None = None,
                 cache_dir: str | None = None) -> Dataset:
  """One run's data: the dataset (loaded unless given), its held-out pool split into meta and test
  by seed, the noisy training labels, and labels dropped if asked. With 'clean_model' noise, the
  teacher's probabilities are kept in (and on a rerun read from) `cache_dir`."""
  image_dataset = image_dataset or data_lib.load_dataset(config.data)
  meta_images, meta_labels, test_images, test_labels = data_lib.split_meta_test(
      image_dataset.heldout_images, image_dataset.heldout_labels, config.data.num_meta,
      seed=config.seed)
  clean = image_dataset.train_labels.astype(np.int32)
  teacher = (config.noise.kind == "feature_dependent"
             and config.noise.probabilities == "clean_model")
  dataset_lib.choose_unlabelled(len(clean), config.data.num_unlabelled, config.seed)  # in range?
  sizes = {"labelled training": len(clean) - config.data.num_unlabelled,
           "meta": len(meta_labels)}
  if teacher:  # trained on every device, on half the training set
    sizes["clean-model teacher fold (half the training set)"] = len(clean) // 2
  check_batch_size(config, sizes, jax.device_count() if teacher else 1)
  about = {}
  if config.noise.kind == "human":
    noisy = human_labels.load(
        config.noise.human_label, config.noise.labels_path, clean, image_dataset.num_classes,
        (image_dataset.name, config.data.data_dir, config.data.download)
        if config.data.source == "tfds" else None)
    about = {"human_label": config.noise.human_label,
             "labels_from": config.noise.labels_path or
             f"tfds {human_labels.TFDS_BUILDERS.get(image_dataset.name)}"}
  else:
    probabilities = None
    if config.noise.kind == "feature_dependent":
      probabilities = noise_probabilities(config, image_dataset, cache_dir)
    noisy = noise_lib.make_noisy_labels(
        clean, kind=config.noise.kind, rate=config.noise.rate,
        num_classes=image_dataset.num_classes, seed=config.seed, probs=probabilities,
        path=config.noise.labels_path or None, pairs=class_flips(config, image_dataset))
  noisy = dataset_lib.drop_labels(noisy, config.data.num_unlabelled, config.seed)
  rate = config.noise.rate if config.noise.kind in noise_lib.RATED_KINDS else None
  return Dataset(
      name=image_dataset.name, num_classes=image_dataset.num_classes,
      class_names=image_dataset.class_names,
      train=Split(image_dataset.train_images, noisy),
      meta=Split(meta_images, meta_labels.astype(np.int32)),
      tests={"test": Split(test_images, test_labels.astype(np.int32))},
      clean_train_labels=clean,
      noise=dataset_lib.noise_summary(config.noise.kind, rate, noisy, clean,
                                      image_dataset.num_classes, about))


def class_flips(config: ml_collections.ConfigDict, image_dataset: data_lib.ImageDataset
                ) -> dict[int, int] | None:
  """The pair flips of class-dependent noise: within CIFAR-100's groups (config.noise.flip_groups),
  else None (CIFAR-10's pairs)."""
  if image_dataset.superclass_of is None:
    return None
  groups = (image_dataset.superclass_of if config.noise.flip_groups == "superclasses"
            else noise_lib.index_block_groups(image_dataset.num_classes))
  return noise_lib.next_in_group_flips(groups)


def prepare_runs(configs: list[ml_collections.ConfigDict], cache_dir: str | None = None
                 ) -> list[Dataset]:
  """`prepare_data` for runs that share one dataset: loaded once, each run's split and noise made
  at the configs' matmul precision ('clean_model' noise trains teachers, kept in `cache_dir`)."""
  with jax.default_matmul_precision(configs[0].matmul_precision):
    image_dataset = data_lib.load_dataset(configs[0].data)
    return [prepare_data(c, image_dataset, cache_dir) for c in configs]


def noise_probabilities(config: ml_collections.ConfigDict, image_dataset: data_lib.ImageDataset,
                        cache_dir: str | None = None) -> np.ndarray:
  """The class probabilities P that feature-dependent noise is made from
  (config.noise.probabilities)."""
  source = config.noise.probabilities
  if source == "student":
    if image_dataset.name != "cifar10":
      raise ValueError("config.noise.probabilities='student' exists for CIFAR-10 only; use "
                       "'clean_model' or a path to an (N, C) .npy file.")
    return noise_lib.student_probabilities(os.path.join(config.data.data_dir, "student_probs.npz"))
  if source == "clean_model":
    return cached_clean_model_probabilities(config, image_dataset, cache_dir)
  if source.endswith(".npz"):  # e.g. the pack's student_probs.npz beside another CIFAR-10 source
    return noise_lib.student_probabilities(source)
  if not os.path.exists(source):
    raise FileNotFoundError(
        f"config.noise.probabilities={source!r} is neither 'student', 'clean_model' nor an "
        f"existing .npy or .npz file.")
  return np.load(source)


# What the teacher's probabilities depend on besides the images and labels.
_TEACHER_KEYS = ("seed", "data", "model", "optim", "augment", "noise", "batch_size", "epoch_loop",
                 "matmul_precision", "compute_dtype")


def cached_clean_model_probabilities(config: ml_collections.ConfigDict,
                                     image_dataset: data_lib.ImageDataset,
                                     cache_dir: str | None) -> np.ndarray:
  """`clean_model_probabilities`, kept in `cache_dir` (a workdir): a resumed or rerun run reads
  them instead of training its teachers again (which costs time, and could come out differently on
  another machine or version). Kept with a digest of the data and the settings they come from; a
  difference trains them anew."""
  if not cache_dir:
    return clean_model_probabilities(config, image_dataset)
  made_from = dataset_lib.digest_of(
      image_dataset.train_images, image_dataset.train_labels.astype(np.int32),
      np.frombuffer(json.dumps({k: config.to_dict()[k] for k in _TEACHER_KEYS},
                               sort_keys=True, default=str).encode(), np.uint8))
  path = os.path.join(cache_dir, f"clean_model_probabilities_seed{config.seed}.npz")
  if os.path.exists(path):
    try:
      with np.load(path) as cached:
        if str(cached["made_from"]) == made_from:
          logging.info("clean-model probabilities read from %s (trained before).", path)
          return cached["probabilities"]
      logging.info("%s was made from other data or settings; training the teachers again.", path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
      logging.warning("%s is unreadable (%s); training the teachers again.", path, e)
  probabilities = clean_model_probabilities(config, image_dataset)
  os.makedirs(cache_dir, exist_ok=True)
  temporary = f"{path}.{os.getpid()}.tmp.npz"
  np.savez(temporary, probabilities=probabilities, made_from=made_from)
  os.replace(temporary, path)
  return probabilities


def clean_model_probabilities(config: ml_collections.ConfigDict,
                              image_dataset: data_lib.ImageDataset) -> np.ndarray:
  """P from the configured classifier trained on the clean labels, 2-fold cross-fitted.

  Each half's probabilities come from a model trained on the other half, so P reflects how a model
  that never saw a sample would confuse it, not memorised labels.
  """
  mesh = make_mesh()
  epoch_fn = make_train_epoch(config, mesh, Phase("teacher", 0, steps.warmup_step))
  predict = make_predict(mesh, config.eval_batch_size,
                         lambda s, batch: jax.nn.softmax(steps.predict(s, batch["image"])))
  images = replicate(mesh, image_dataset.train_images)
  labels = replicate(mesh, image_dataset.train_labels.astype(np.int32))
  folds = [np.sort(fold).astype(np.int32) for fold in
           np.array_split(np.random.default_rng(config.seed).permutation(len(labels)), 2)]
  probabilities = np.zeros((len(labels), image_dataset.num_classes), np.float32)
  for fold, (held_out, trained_on) in enumerate([(folds[0], folds[1]), (folds[1], folds[0])]):
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1000 + fold)
    state = replicate(mesh, state_from_config(config, image_dataset.train_images.shape[1:],
                                              image_dataset.num_classes, key))
    indices = replicate(mesh, trained_on)
    for epoch in range(config.noise.teacher_epochs):
      start = time.time()
      state, metrics = epoch_fn(state, (images, labels), indices,
                                jax.random.fold_in(state.rng, epoch))
      loss = np.asarray(metrics["loss"])
      if not np.isfinite(loss).all():
        raise FloatingPointError(
            f"The clean-model teacher (config.noise.probabilities='clean_model') diverged in fold "
            f"{fold + 1}, epoch {epoch + 1}: non-finite loss. Lower --config.optim.learning_rate "
            f"(now {config.optim.learning_rate}) or check the input data.")
      logging.info("clean-model teacher fold %d/2 epoch %d/%d: loss %.4f, %.0f img/s", fold + 1,
                   epoch + 1, config.noise.teacher_epochs, loss.mean(),
                   loss.size * config.batch_size / (time.time() - start))
    probabilities[held_out] = np.asarray(predict(state, images[held_out]))
    logging.info("clean-model probabilities: fold %d trained on %d samples, held-out accuracy %.4f",
                 fold, len(trained_on), np.mean(probabilities[held_out].argmax(1)
                                                == image_dataset.train_labels[held_out]))
  return probabilities


def _augment_fn(config: ml_collections.ConfigDict) -> Callable[[jax.Array, jax.Array], jax.Array]:
  def fn(key, images):
    return augment.normalise(augment.random_crop_flip(
        key, images, pad=config.augment.pad, hflip=config.augment.hflip,
        vflip=config.augment.vflip))
  return fn


def _epoch_order(key: jax.Array, indices: jax.Array, batch_size: int) -> jax.Array:
  """A shuffled pass over `indices` as (steps, batch_size); the last partial batch is dropped."""
  num_steps = indices.shape[0] // batch_size
  order = jax.random.permutation(key, indices)[:num_steps * batch_size]
  return order.reshape(num_steps, batch_size)


def _cycling_order(key: jax.Array, num_items: int, num_steps: int, batch_size: int) -> jax.Array:
  """Meta batches: consecutive shuffled passes over the meta set, as many as `num_steps` batches
  need.

  As the reference's re-started meta loader, the meta stream cycles independently of the training
  stream.
  """
  passes = -(-num_steps * batch_size // num_items)
  keys = jax.random.split(key, passes)
  order = jnp.concatenate([jax.random.permutation(k, num_items) for k in keys])
  return order[:num_steps * batch_size].reshape(num_steps, batch_size)


def make_train_epoch(config: ml_collections.ConfigDict, mesh: Mesh, phase: Phase,
                     num_runs: int | None = None
                     ) -> Callable[[TrainState, EpochData, jax.Array, jax.Array], Any]:
  """A whole training epoch of `phase.step`, `(state, data, indices, key) -> (state, per-step
  metrics)`, with donated state; `data` is `EpochData`, `indices` the samples the epoch visits.

  With `num_runs`, independent runs go through one program (`vmap`): the state, labels, indices,
  meta data and key have a leading run axis, the training images are shared, and metrics come back
  as (steps, runs). The epoch's order and augmentation keys come from `key` alone, so an epoch is
  reproducible. Every batch carries its samples' ids as `index`.
  """
  batch_size = config.batch_size
  augment_fn = _augment_fn(config)
  sharded = NamedSharding(mesh, P("data"))
  shard = lambda x: jax.lax.with_sharding_constraint(x, sharded)

  def gather(images, labels, idx, key, augmented=True):
    idx = shard(idx)
    pixels = images[idx]
    pixels = augment_fn(key, pixels) if augmented else augment.normalise(pixels)
    return {"image": shard(pixels), "label": shard(labels[idx]), "index": idx}

  def schedule(key, indices, num_meta):
    """Per-step inputs of one epoch: sample indices, augmentation keys (and meta indices)."""
    order_key, augment_key, meta_key = jax.random.split(key, 3)
    order = _epoch_order(order_key, indices, batch_size)
    keys = jax.random.split(augment_key, (order.shape[0], 2))
    if not phase.uses_meta:
      return order, keys
    return order, keys, _cycling_order(meta_key, num_meta, order.shape[0], batch_size)

  def step(state, data, xs):
    batch = gather(data[0], data[1], xs[0], xs[1][0])
    if not phase.uses_meta:
      return phase.step(state, batch)
    meta_batch = gather(data[2], data[3], xs[2], xs[1][1], augmented=config.augment.meta_batches)
    return phase.step(state, batch, meta_batch)

  def epoch_schedule(key, indices, num_meta):
    """The epoch's per-step inputs with the step axis first (then the run axis, if any)."""
    fn = lambda k, i: schedule(k, i, num_meta)
    if num_runs is None:
      return fn(key, indices)
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), jax.vmap(fn)(key, indices))

  run_step = step
  if num_runs is not None:
    data_axes = (None, 0, 0, 0) if phase.uses_meta else (None, 0)
    run_step = jax.vmap(step, in_axes=(0, data_axes, 0))
  num_meta_of = lambda data: data[2].shape[-4] if phase.uses_meta else 0

  loop = config.epoch_loop
  if loop == "auto":
    loop = "host" if jax.default_backend() == "cpu" else "scan"
  if loop == "scan":
    @functools.partial(jax.jit, donate_argnums=0)
    def scanned_epoch(state, data, indices, key):
      xs = epoch_schedule(key, indices, num_meta_of(data))
      return jax.lax.scan(lambda s, x: run_step(s, data, x), state, xs)
    return scanned_epoch

  jit_step = jax.jit(run_step, donate_argnums=0)
  jit_schedule = jax.jit(epoch_schedule, static_argnums=2)

  def host_loop_epoch(state, data, indices, key):
    xs = jit_schedule(key, indices, num_meta_of(data))
    num_steps, per_step, start = xs[0].shape[0], [], time.time()
    for i in range(num_steps):
      state, metrics = jit_step(state, data, tuple(x[i] for x in xs))
      per_step.append(metrics)
      if (i + 1) % config.log_every_steps == 0 and i + 1 < num_steps:  # a CPU epoch takes minutes
        jax.block_until_ready(metrics)
        seconds = time.time() - start
        logging.info("[%s] step %d/%d  %.0f img/s, epoch ETA %.0f s", phase.name, i + 1,
                     num_steps, (i + 1) * batch_size * (num_runs or 1) / seconds,
                     seconds / (i + 1) * (num_steps - i - 1))
    return state, jax.tree.map(lambda *m: jnp.stack(m), *per_step)
  return host_loop_epoch


def make_predict(mesh: Mesh, eval_batch_size: int,
                 fn: Callable[[TrainState, dict[str, jax.Array]], jax.Array],
                 num_runs: int | None = None, shared_images: bool = False,
                 normalise: Callable[[jax.Array], jax.Array] = augment.normalise
                 ) -> Callable[[TrainState, jax.Array], jax.Array]:
  """Jitted `fn(state, batch)` over a whole uint8 split in batches, without augmentation; a batch
  holds the normalised `image`s and their positions in the split as `index`.

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
    positions = jnp.arange(padded, dtype=jnp.int32).reshape(padded // batch, batch)
    per_batch = lambda xs: fn(state, {
        "image": jax.lax.with_sharding_constraint(normalise(xs[0]), sharded), "index": xs[1]})
    outputs = jax.lax.map(per_batch, (images, positions))
    return outputs.reshape((padded,) + outputs.shape[2:])[:count]

  if num_runs is None:
    return jax.jit(predict_all)
  return jax.jit(jax.vmap(predict_all, in_axes=(0, None if shared_images else 0)))


class InMemorySource:
  """The loop's data source for datasets held in device memory: `num_runs` runs trained together,
  one chunk per epoch."""

  stacked = True        # the state has a leading run axis (also for one run)
  tracks_soft_labels = True  # soft labels of every training sample are cheap to get each epoch

  def __init__(self, configs: list[ml_collections.ConfigDict],
               datasets: list[Dataset] | None = None, mesh: Mesh | None = None,
               cache_dir: str | None = None):
    self.configs = configs
    self.cache_dir = cache_dir
    self.config = configs[0]
    self.num_runs = len(configs)
    self.mesh = mesh or make_mesh()
    self.datasets = datasets
    # Jitted programs, made once: per phase, per evaluated model and per soft-label function.
    self._epoch_fns: dict[Phase, Callable[..., Any]] = {}
    self._top_k_fns: dict[Callable[..., Any], Callable[..., Any]] = {}
    self._soft_label_fns: dict[Callable[..., Any], Callable[..., Any]] = {}

  def load(self) -> list[Dataset]:
    """Every run's data (made unless given), checked against the batch size and put on the
    device."""
    if self.datasets is None:
      self.datasets = prepare_runs(self.configs, self.cache_dir)
    first = self.datasets[0]
    check_batch_size(self.config, {"labelled training": len(first.labelled_indices),
                                   "meta": len(first.meta)}, self.mesh.size)
    if len({len(d.labelled_indices) for d in self.datasets}) > 1:
      raise ValueError("Runs trained together need the same number of labelled samples.")
    put = lambda x: replicate(self.mesh, x)
    stacked = lambda get: put(np.stack([get(d) for d in self.datasets]))
    self.images = put(first.train.images)  # shared by all runs: one copy on the device
    self.labels = stacked(lambda d: d.train.labels)
    self.meta = (stacked(lambda d: d.meta.images), stacked(lambda d: d.meta.labels))
    self.tests = {name: stacked(lambda d, name=name: d.tests[name].images) for name in first.tests}
    self.indices = {
        "labelled": stacked(lambda d: d.labelled_indices),
        "all": put(np.tile(np.arange(len(first.train), dtype=np.int32), (self.num_runs, 1)))}
    self.image_shape = first.train.images.shape[1:]
    return self.datasets

  def init_state(self, method: Method, fresh: bool) -> TrainState:
    """The runs' fresh states, stacked (each from its own seed) and replicated."""
    del fresh  # the same either way
    num_classes = self.datasets[0].num_classes
    make = lambda key, labels, clean: method.new_state(self.config, self.image_shape, num_classes,
                                                       labels, clean, key)
    keys = jnp.stack([jax.random.PRNGKey(c.seed) for c in self.configs])
    clean = np.stack([d.clean_train_labels for d in self.datasets])
    return replicate(self.mesh, jax.jit(jax.vmap(make))(keys, self.labels, clean))

  def steps_per_epoch(self, phase: Phase) -> int:
    return self.indices[phase.trains_on].shape[1] // self.config.batch_size

  def train_chunks(self, state: TrainState, phase: Phase, epoch: int, start_step: int,
                   preempted: Callable[[int], bool], global_step: int) -> Iterator[Chunk]:
    """The whole epoch as one chunk (an epoch is one program); preemption is asked at its end."""
    if start_step:
      raise ValueError(f"In-memory epochs run whole, but epoch {epoch + 1} was to resume at step "
                       f"{start_step}: a checkpoint of a streamed run?")
    if phase not in self._epoch_fns:
      self._epoch_fns[phase] = make_train_epoch(self.config, self.mesh, phase, self.num_runs)
    data = (self.images, self.labels) + (self.meta if phase.uses_meta else ())
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.rng, epoch)
    start = time.time()
    state, metrics = self._epoch_fns[phase](state, data, self.indices[phase.trains_on], keys)
    metrics = jax.tree.map(np.asarray, metrics)  # (steps, runs); waits for the epoch
    num_steps = next(iter(metrics.values())).shape[0]
    yield Chunk(state, metrics, num_steps, time.time() - start,
                preempted(global_step + num_steps))

  def evaluate(self, state: TrainState, predict: Callable[[TrainState, jax.Array], jax.Array]
               ) -> list[dict[str, dict[str, float]]]:
    """Per run: top-1 and top-5 accuracy of `predict`'s logits on the meta split and every test
    split."""
    num_classes = self.datasets[0].num_classes
    if predict not in self._top_k_fns:
      top = lambda s, batch: jax.lax.top_k(predict(s, batch["image"]), min(5, num_classes))[1]
      self._top_k_fns[predict] = make_predict(self.mesh, self.config.eval_batch_size, top,
                                              self.num_runs)
    splits = {"meta": (self.meta[0], [d.meta.labels for d in self.datasets])}
    splits.update({name: (images, [d.tests[name].labels for d in self.datasets])
                   for name, images in self.tests.items()})
    per_run: list[dict[str, dict[str, float]]] = [{} for _ in self.datasets]
    for name, (images, labels) in splits.items():
      top = np.asarray(self._top_k_fns[predict](state, images))  # (runs, N, k)
      for index, run_labels in enumerate(labels):
        hits = top[index] == run_labels[:, None]
        per_run[index][name] = {"accuracy": float(np.mean(hits[:, 0])),
                                "top5": float(np.mean(hits.any(-1)))}
    return per_run

  def soft_labels(self, state: TrainState, phase: Phase, images: np.ndarray | None = None
                  ) -> list[np.ndarray]:
    """Per run: `phase.soft_labels` of every training sample, (N, C) in training order; of
    `images` (uint8, shaped as the training images) instead where given."""
    if phase.soft_labels not in self._soft_label_fns:
      self._soft_label_fns[phase.soft_labels] = make_predict(
          self.mesh, self.config.eval_batch_size, phase.soft_labels, self.num_runs,
          shared_images=True)
    images = self.images if images is None else replicate(self.mesh, images)
    return list(np.asarray(self._soft_label_fns[phase.soft_labels](state, images)))

  def training_pass(self, state: TrainState, per_batch: Callable[..., jax.Array],
                    absorb: Callable[[TrainState, jax.Array], TrainState]) -> TrainState:
    """Per run, `absorb(run's state, outputs)` of `per_batch` over every training sample (in
    sample-id order)."""
    outputs = make_predict(self.mesh, self.config.eval_batch_size, per_batch, self.num_runs,
                           shared_images=True)(state, self.images)
    return jax.jit(jax.vmap(absorb))(state, outputs)

  def export_extras(self, index: int) -> dict[str, np.ndarray]:
    del index
    return {}
