"""Datasets streamed from disk (Clothing1M, WebVision, Food-101N, your own image folders): the
loop's streamed source, its jitted steps and list evaluation.

Batches come from tf.data (`input_pipeline`, imported where files are read, so that the steps and
the benchmark run where TensorFlow is absent). Steps are jitted with the state donated and the batch
sharded over all devices of a `Mesh`; with several processes (hosts), each reads its part of every
batch. An epoch's chunks are its logging windows (`log_every_steps`); a preemption notice, asked
after every step, ends a chunk early. The order of every epoch is a function of `(seed, epoch)`, so
a resumed run skips the steps it has taken and ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mln_jax import augment, file_lists, steps
from mln_jax.dataset import Dataset
from mln_jax.loop import Chunk
from mln_jax.methods import Method, Phase
from mln_jax.methods.base import StepFn
from mln_jax.runtime import make_mesh, replicate
from mln_jax.train_state import TrainState, copy_tree, state_from_config

if TYPE_CHECKING:
  from mln_jax import input_pipeline


def _normalised(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return {**batch, "image": augment.normalise_imagenet(batch["image"])}


def make_train_step(phase: Phase, mesh: Mesh | None = None, meta_in_memory: bool = True) -> StepFn:
  """`phase.step` jitted on uint8 batches (normalised on the device), the state donated.

  Phases with meta batches take a streamed meta batch, `(state, batch, meta_batch)`, or, with
  `meta_in_memory`, `(state, batch, meta_images, meta_labels, order, flips, step)`: the meta batch
  gathered and flipped on the device from a meta set kept there as uint8, sharded over `mesh` like a
  streamed batch.
  """
  if not phase.uses_meta:
    return jax.jit(lambda state, batch: phase.step(state, _normalised(batch)), donate_argnums=0)
  if not meta_in_memory:
    return jax.jit(lambda state, batch, meta_batch: phase.step(
        state, _normalised(batch), _normalised(meta_batch)), donate_argnums=0)
  shard = ((lambda x: x) if mesh is None else
           (lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("data")))))

  @functools.partial(jax.jit, donate_argnums=0)
  def step_with_meta_from_memory(state, batch, meta_images, meta_labels, order, flips, step):
    indices, flip = order[step], flips[step]
    images = meta_images[indices]
    images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
    meta_batch = {"image": shard(images), "label": shard(meta_labels[indices]),
                  "index": shard(indices)}
    return phase.step(state, _normalised(batch), _normalised(meta_batch))
  return step_with_meta_from_memory


def make_evaluate(num_classes: int,
                  predict: Callable[[TrainState, jax.Array], jax.Array] = steps.predict
                  ) -> Callable[[TrainState, dict[str, jax.Array]], dict[str, jax.Array]]:
  """Jitted counts of top-1 and top-5 hits of `predict`'s logits over a uint8 batch's valid (not
  padding) images."""
  top_k = min(5, num_classes)

  @jax.jit
  def evaluate(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    logits = predict(state, augment.normalise_imagenet(batch["image"]))
    _, best = jax.lax.top_k(logits, top_k)
    hits = best == batch["label"][:, None]
    valid = batch["valid"]
    return {"top1": jnp.sum(hits[:, 0] & valid), "top5": jnp.sum(hits.any(-1) & valid),
            "count": jnp.sum(valid)}
  return evaluate


def evaluate_list(evaluate: Callable[..., dict[str, jax.Array]], state: TrainState,
                  images: file_lists.ImageList, mesh: Mesh, batch_size: int,
                  prep: input_pipeline.Preprocessing) -> dict[str, float]:
  """Top-1 and top-5 accuracy of the classifier over a whole image list."""
  from mln_jax import input_pipeline
  totals = None
  for batch in input_pipeline.device_batches(input_pipeline.eval_batches(images, batch_size, prep),
                                             mesh):
    counts = evaluate(state, batch)  # summed on the device: no host sync per batch
    totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
  totals = {name: int(value) for name, value in totals.items()}
  if totals["count"] != len(images):
    raise RuntimeError(f"Evaluated {totals['count']} of {len(images)} images.")
  return {"accuracy": totals["top1"] / totals["count"], "top5": totals["top5"] / totals["count"]}


def predict_list(fn: Callable[[TrainState, dict[str, jax.Array]], jax.Array], state: TrainState,
                 images: file_lists.ImageList, mesh: Mesh, batch_size: int,
                 prep: input_pipeline.Preprocessing) -> np.ndarray:
  """`fn(state, batch)` for every image of a list, in list order (no augmentation); a batch holds
  the normalised `image`s and their positions in the list as `index`."""
  from jax.experimental import multihost_utils
  from mln_jax import input_pipeline
  predict = jax.jit(lambda s, batch: fn(s, {"image": augment.normalise_imagenet(batch["image"]),
                                            "index": batch["index"]}))
  outputs = []
  for batch in input_pipeline.device_batches(input_pipeline.eval_batches(images, batch_size, prep),
                                             mesh):
    # Every process gets the whole batch's rows (its own part is all a process holds).
    outputs.append(multihost_utils.process_allgather(predict(state, batch), tiled=True))
  return np.concatenate(outputs)[:len(images)]


def load_pretrained(config: ml_collections.ConfigDict, state: TrainState) -> TrainState:
  """The classifier's weights from `config.model.pretrained`, a torchvision ResNet state dict; a
  head of another class count stays as initialised. The extractor starts as a copy of them, as
  `create_train_state` makes it (a method that freezes it does so later)."""
  from mln_jax import pretrained  # torch is only needed for .pth files
  variables, skipped = pretrained.load_pretrained_resnet(config.model.pretrained, state.variables)
  logging.info("Loaded %s%s.", config.model.pretrained,
               f" (kept this model's own {', '.join(skipped)})" if skipped else "")
  return state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                       opt_state=state.tx.init(variables["params"]),
                       extractor_params=copy_tree(variables["params"]),
                       extractor_batch_stats=copy_tree(variables["batch_stats"]))


class StreamedSource:
  """The loop's data source for image lists streamed from disk: one run, one step at a time."""

  stacked = False             # one run: no run axis
  tracks_soft_labels = False  # a pass over every training image per epoch would be too slow
  num_runs = 1

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None = None):
    self.config = config
    self.mesh = mesh or make_mesh()
    self._steps: dict[tuple[Phase, bool], StepFn] = {}
    self._evaluators: dict[Callable[..., Any], Callable[..., Any]] = {}

  def load(self) -> list[Dataset]:
    from mln_jax import input_pipeline
    config, mesh = self.config, self.mesh
    self.dataset = file_lists.load(config.data, config.seed)
    batch_size = config.batch_size
    if batch_size % mesh.size or batch_size % jax.process_count():
      raise ValueError(f"config.batch_size={batch_size} must be divisible by the number of devices "
                       f"({mesh.size}) and processes ({jax.process_count()}).")
    labelled = self.dataset.labelled_indices
    if batch_size > min(len(labelled), len(self.dataset.meta)):
      raise ValueError(f"config.batch_size={batch_size} is larger than the data: {len(labelled)} "
                       f"labelled training and {len(self.dataset.meta)} meta images. Lower "
                       f"--config.batch_size.")
    self.indices = {"labelled": labelled, "all": np.arange(len(self.dataset.train))}
    self.prep = input_pipeline.Preprocessing(config.data.resize_size, config.data.image_size,
                                             config.augment.hflip, config.data.resize_mode)
    self.meta_prep = dataclasses.replace(
        self.prep, hflip=config.augment.hflip and config.augment.meta_batches)
    self.eval_prep = dataclasses.replace(self.prep, hflip=False)
    self.eval_batch_size = -(-config.eval_batch_size // mesh.size) * mesh.size
    self.image_shape = (config.data.image_size, config.data.image_size, 3)
    self._meta_in_memory = None  # decoded on first use
    if config.data.verify_files:
      file_lists.check_all_exist(self.dataset.train.files, "the training list")
    # Every meta and test image is read once now: a broken one found at the first evaluation or in
    # phase 2 would cost an epoch (hours on Clothing1M).
    for name, split in {"meta": self.dataset.meta, **self.dataset.tests}.items():
      start = time.time()
      input_pipeline.check_decodes(split, self.eval_prep)
      logging.info("Checked the %d %s images: all decode (%.0f s).", len(split), name,
                   time.time() - start)
    return [self.dataset]

  def init_state(self, method: Method, fresh: bool) -> TrainState:
    """A new state, replicated: for a fresh run from `config.model.pretrained` where given (a
    resumed run restores its own weights onto it)."""
    config, name = self.config, self.dataset.name

    def new_classifier(key):  # also a method's second network or fresh network starts so
      state = state_from_config(config, self.image_shape, self.dataset.num_classes, key)
      return load_pretrained(config, state) if fresh and config.model.pretrained else state

    if fresh and not config.model.pretrained and name in ("clothing1m", "food101n"):
      logging.warning("The classifier starts from random weights; the %s protocol starts from "
                      "ImageNet weights (--config.model.pretrained=<resnet50 .pth>).", name)
    elif (fresh and not config.model.pretrained and name == "image_folder"
          and config.model.name in ("resnet50", "resnet")):
      logging.warning("The ResNet starts from random weights, but the schedule (lr %g, %d "
                      "epochs) is made for fine-tuning: give --config.model.pretrained=<resnet50 "
                      ".pth>, or a longer schedule (--config.num_epochs, warmup_epochs, "
                      "optim.learning_rate, optim.lr_boundaries).", config.optim.learning_rate,
                      config.num_epochs)
    # The method's own state after the weights: it may start from them (a teacher, a second
    # network).
    return replicate(self.mesh, method.new_state(
        config, self.image_shape, self.dataset.num_classes, self.dataset.train.labels,
        self.dataset.clean_train_labels, jax.random.PRNGKey(config.seed), new_classifier))

  def steps_per_epoch(self, phase: Phase) -> int:
    return len(self.indices[phase.trains_on]) // self.config.batch_size

  def train_chunks(self, state: TrainState, phase: Phase, epoch: int, start_step: int,
                   preempted: Callable[[int], bool], global_step: int) -> Iterator[Chunk]:
    """Chunks of the epoch from `start_step` on: logging windows, cut short by a preemption notice
    (asked after every step, as orbax's notices through JAX's distributed runtime need)."""
    from mln_jax import input_pipeline
    config, mesh, dataset = self.config, self.mesh, self.dataset
    batch_size = config.batch_size
    num_steps = self.steps_per_epoch(phase)
    batches = input_pipeline.device_batches(input_pipeline.train_batches(
        dataset.train, self.indices[phase.trains_on], batch_size, self.prep, config.seed, epoch,
        start_step), mesh)
    in_memory = phase.uses_meta and config.data.meta_in_memory
    key = (phase, in_memory)
    if key not in self._steps:
      self._steps[key] = make_train_step(phase, mesh, in_memory)
    step_fn = self._steps[key]
    if in_memory:
      if self._meta_in_memory is None:
        # Decoded once and kept on every device as uint8: the phase then decodes only training
        # images.
        self._meta_in_memory = (
            replicate(mesh, input_pipeline.decode_all(dataset.meta, self.eval_prep)),
            replicate(mesh, dataset.meta.labels))
      meta_order, meta_flips = replicate(mesh, input_pipeline.meta_schedule(
          len(dataset.meta), num_steps, batch_size, config.seed, epoch, self.meta_prep.hflip))
    elif phase.uses_meta:
      meta_stream = input_pipeline.device_batches(input_pipeline.meta_batches(
          dataset.meta, num_steps, batch_size, self.meta_prep, config.seed, epoch, start_step),
          mesh)

    window, seconds = [], 0.0
    for step in range(start_step, num_steps):
      step_start = time.time()
      batch = next(batches)
      if in_memory:
        state, metrics = step_fn(state, batch, *self._meta_in_memory, meta_order, meta_flips,
                                 step)
      elif phase.uses_meta:
        state, metrics = step_fn(state, batch, next(meta_stream))
      else:
        state, metrics = step_fn(state, batch)
      window.append(metrics)
      seconds += time.time() - step_start
      global_step += 1
      notice = preempted(global_step)
      if notice or (step + 1) % config.log_every_steps == 0 or step + 1 == num_steps:
        stacked = jax.tree.map(lambda *m: np.asarray(jnp.stack(m))[:, None], *window)
        yield Chunk(state, stacked, len(window), seconds, notice)
        window, seconds = [], 0.0
        if notice:
          return

  def evaluate(self, state: TrainState, predict: Callable[[TrainState, jax.Array], jax.Array]
               ) -> list[dict[str, dict[str, float]]]:
    """Top-1 and top-5 accuracy of `predict`'s logits on the meta list and every test list."""
    if predict not in self._evaluators:
      self._evaluators[predict] = make_evaluate(self.dataset.num_classes, predict)
    splits = {"meta": self.dataset.meta, **self.dataset.tests}
    return [{name: evaluate_list(self._evaluators[predict], state, images, self.mesh,
                                 self.eval_batch_size, self.eval_prep)
             for name, images in splits.items()}]

  def soft_labels(self, state: TrainState, phase: Phase) -> list[np.ndarray]:
    return [predict_list(phase.soft_labels, state, self.dataset.train, self.mesh,
                         self.eval_batch_size, self.eval_prep)]

  def training_pass(self, state: TrainState, per_batch: Callable[..., jax.Array],
                    absorb: Callable[[TrainState, jax.Array], TrainState]) -> TrainState:
    """`absorb(state, outputs)` of `per_batch` over every training image (list order)."""
    outputs = predict_list(per_batch, state, self.dataset.train, self.mesh, self.eval_batch_size,
                           self.eval_prep)
    return jax.jit(absorb)(state, replicate(self.mesh, outputs))

  def export_extras(self, index: int) -> dict[str, Any]:
    del index
    return {"image_file": self.dataset.train.files}
