"""Finished runs as a library: their final train state, and soft labels for any images."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mln_jax import augment, config as config_lib, in_memory, methods, runtime
from mln_jax.train_state import TrainState


def load_trained_state(workdir: str) -> tuple[TrainState, ml_collections.ConfigDict]:
  """The final train state of a finished run in `workdir` (the classifier and its method's state:
  MetaLabelNet's extractor and network) and its config; for a run trained together with others, its
  slice of their common checkpoint."""
  results_path = os.path.join(workdir, runtime.RESULTS_FILE)
  if not os.path.exists(results_path):
    raise FileNotFoundError(f"{results_path} does not exist: {workdir} holds no finished run (for "
                            f"runs trained together, name one run's folder, {workdir}/run_<i>).")
  config = ml_collections.ConfigDict(runtime.read_json(os.path.join(workdir, "config.json")))
  results = runtime.read_json(results_path)
  where = results["checkpoint"]
  method = methods.get(config)
  # The state's structure only: the restore fills in its values.
  no_labels = jnp.full(results["num_train"], -1, jnp.int32)
  make = lambda key: method.new_state(config, tuple(results["image_shape"]),
                                      results["num_classes"], no_labels, no_labels, key)
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
  # The state as the run's last phase left it (MetaLabelNet's: its extractor frozen).
  return method.phase_at(method.total_epochs(config) - 1).enter(state, False), config


def soft_labels_for(state: TrainState, images: np.ndarray, config: ml_collections.ConfigDict,
                    batch_size: int = 1000) -> np.ndarray:
  """The soft labels a finished run's method gives uint8 NHWC images (MetaLabelNet's for new,
  unlabelled or training images).

  `state` and `config` are a finished run's, from `load_trained_state`: the config names the method
  and says how images are normalised (streamed datasets: ImageNet's statistics; they must already
  have the run's size, which `input_pipeline.decode_all` gives files).
  """
  method = methods.get(config)
  soft_labels = method.phase_at(method.total_epochs(config) - 1).soft_labels
  if soft_labels is None:
    raise ValueError(f"A {method.name} run has no soft labels: its last phase makes none "
                     "(MetaLabelNet runs do).")
  streamed = config.data.name in config_lib.STREAMED_DATASETS
  mesh = runtime.make_mesh()
  predict = in_memory.make_predict(
      mesh, batch_size, soft_labels,
      normalise=augment.normalise_imagenet if streamed else augment.normalise)
  return np.asarray(predict(runtime.replicate(mesh, state), runtime.replicate(mesh, images)))
