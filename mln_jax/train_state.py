"""The train state: one pytree holding everything a run updates.

The classifier, and MetaLabelNet's frozen extractor and soft-label network as first-class fields
(the library's `meta_step` works on them; every state carries them, so checkpoints have one
structure in all phases); other methods keep their own arrays in `method_state`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mln_jax import models

PyTree = Any

META_GRADIENTS = ("autodiff", "jvp")


def sgd_with_l2(learning_rate: float, momentum: float, weight_decay: float
                ) -> optax.GradientTransformation:
  """PyTorch's SGD: the L2 term `weight_decay·θ` is added to the gradient before momentum.

  The learning rate is a hyperparameter in the optimiser state (`optax.inject_hyperparams`), so the
  per-epoch schedule is set with `set_learning_rate` and survives checkpointing.
  """
  def make(learning_rate, momentum, weight_decay):
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(learning_rate, momentum=momentum))
  return optax.inject_hyperparams(make)(learning_rate=learning_rate, momentum=momentum,
                                        weight_decay=weight_decay)


def adam_with_l2(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
  """PyTorch's Adam with `weight_decay`: coupled L2 added to the gradient (not AdamW)."""
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))


def set_learning_rate(opt_state: optax.OptState, learning_rate: float) -> optax.OptState:
  """Returns `opt_state` of `sgd_with_l2` with its learning rate replaced (for every run, where the
  state stacks several)."""
  hyperparams = dict(opt_state.hyperparams)
  hyperparams["learning_rate"] = jnp.full_like(hyperparams["learning_rate"], learning_rate)
  return opt_state._replace(hyperparams=hyperparams)


@flax.struct.dataclass
class TrainState:
  """Classifier, frozen feature extractor and MetaLabelNet, with their optimiser states, and any
  other method's state.

  Array fields are pytree leaves (checkpointed, donated to jitted steps); the functions and
  hyperparameters below them are static.
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: optax.OptState
  extractor_params: PyTree        # Copy of the warmed-up classifier; set by `freeze_extractor`.
  extractor_batch_stats: PyTree
  mln_params: PyTree
  mln_opt_state: optax.OptState
  rng: jax.Array                  # The data stream: epoch e shuffles and augments with
                                  # fold_in(rng, e).
  # What other methods keep beside the classifier (a second network, a teacher, per-sample tables
  # indexed by the batch's `index`): a pytree, checkpointed, donated and stacked per run like the
  # rest.
  method_state: PyTree
  apply_fn: Callable[..., Any] = flax.struct.field(pytree_node=False)
  mln_apply_fn: Callable[..., Any] = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  mln_tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  inner_lr: float = flax.struct.field(pytree_node=False, default=1.0)
  meta_gradient: str = flax.struct.field(pytree_node=False, default="autodiff")
  # Set by `freeze_extractor`; MetaLabelNet refuses a state without it (its soft labels would come
  # from the initial classifier's features).
  extractor_frozen: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def variables(self) -> dict[str, PyTree]:
    return {"params": self.params, "batch_stats": self.batch_stats}

  @property
  def extractor_variables(self) -> dict[str, PyTree]:
    return {"params": self.extractor_params, "batch_stats": self.extractor_batch_stats}


def create_train_state(
    rng: jax.Array,
    model: nn.Module,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    learning_rate: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    mln_learning_rate: float = 1e-2,
    mln_weight_decay: float = 1e-4,
    inner_lr: float = 1.0,
    meta_gradient: str = "autodiff",
) -> TrainState:
  """Initialises classifier and MetaLabelNet; `input_shape` is one image's (H, W, C)."""
  if meta_gradient not in META_GRADIENTS:
    raise ValueError(f"Unknown meta_gradient {meta_gradient!r}: choose one of {META_GRADIENTS}.")
  # Separate branches for the two initialisations and the data stream, so no key serves twice.
  init_rng, mln_rng, state_rng = jax.random.split(rng, 3)
  dummy = jnp.zeros((2, *input_shape), jnp.float32)
  variables = model.init(init_rng, dummy, train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  _, features = jax.eval_shape(lambda v: model.apply(v, dummy, train=False), variables)
  mln = models.MetaLabelNet(num_classes=num_classes)
  mln_params = mln.init(mln_rng, jnp.zeros((1, features.shape[-1]), jnp.float32))["params"]
  tx = sgd_with_l2(learning_rate, momentum, weight_decay)
  mln_tx = adam_with_l2(mln_learning_rate, mln_weight_decay)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      # Until the warm-up ends the extractor is a copy of the initial classifier; keeping it in the
      # state from the start gives checkpoints one structure in both phases.
      extractor_params=copy_tree(params),
      extractor_batch_stats=copy_tree(batch_stats),
      mln_params=mln_params,
      mln_opt_state=mln_tx.init(mln_params),
      rng=state_rng,
      method_state={},
      apply_fn=model.apply,
      mln_apply_fn=mln.apply,
      tx=tx,
      mln_tx=mln_tx,
      inner_lr=inner_lr,
      meta_gradient=meta_gradient,
  )


def freeze_extractor(state: TrainState) -> TrainState:
  """Phase 1 -> 2: the current classifier becomes the (never trained again) feature extractor."""
  return state.replace(extractor_params=copy_tree(state.params),
                       extractor_batch_stats=copy_tree(state.batch_stats), extractor_frozen=True)


def copy_tree(tree: PyTree) -> PyTree:
  """`tree` in distinct buffers: a donated state must not hold one buffer twice."""
  return jax.tree.map(jnp.copy, tree)


def state_from_config(config: ml_collections.ConfigDict, image_shape: tuple[int, ...],
                      num_classes: int, key: jax.Array) -> TrainState:
  """A fresh train state of `config`'s classifier and optimiser settings."""
  return create_train_state(
      key, models.build_model(config, num_classes), tuple(image_shape), num_classes,
      learning_rate=config.optim.learning_rate, momentum=config.optim.momentum,
      weight_decay=config.optim.weight_decay, mln_learning_rate=config.mln.learning_rate,
      mln_weight_decay=config.mln.weight_decay, inner_lr=config.mln.inner_lr,
      meta_gradient=config.mln.meta_gradient)
