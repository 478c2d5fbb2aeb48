"""A PyTorch implementation of MetaLabelNet on the paper's CIFAR-10 CNN: the test oracle of
`steps.warmup_step` and `steps.meta_step`, and the speed yardstick of the benchmark.

Needs `torch` (not a dependency of mln_jax: only the tests and the benchmark import this module).
It is written from SPEC (phase 1 and phase-2 steps 1–7) with PyTorch's own autograd and
optimisers (`torch.optim.SGD`, `torch.optim.Adam`), so that it shares nothing with the JAX code but
the weights it starts from. The model is functional: parameters and BatchNorm running buffers are
dicts of tensors named after the Flax modules (`Conv_0.weight`, `BatchNorm_0.running_mean`, ...),
images are NCHW. `TorchMetaLabelNet.from_train_state` copies a JAX `TrainState` in (any float
dtype: float64 for the exactness test, float32 for timing); `to_train_state` copies it back, leaf
for leaf, for comparison.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from optax import tree_utils as otu

from mln_jax import models

Tensors = dict[str, torch.Tensor]

# The paper's CNN's conv widths per block, as mln_jax builds it.
CIFAR_BLOCKS = models.CifarCNN.keywords["blocks"]
BN_MOMENTUM = 0.1
BN_EPS = 1e-5

# Flax leaf name -> PyTorch's name of the same tensor.
_TORCH_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                "var": "running_var"}


def _to_torch_layout(name: str, array: Any, dtype: torch.dtype) -> torch.Tensor:
  """One Flax leaf as a contiguous tensor in PyTorch's layout (kernels HWIO -> OIHW, (in, out) ->
  (out, in))."""
  tensor = torch.from_numpy(np.array(array)).to(dtype)
  if name == "kernel":
    tensor = tensor.permute(3, 2, 0, 1) if tensor.ndim == 4 else tensor.T
  return tensor.contiguous()


def _to_flax_layout(name: str, tensor: torch.Tensor, like: Any) -> np.ndarray:
  """The inverse of `_to_torch_layout`, as a numpy array of `like`'s dtype (a copy: the oracle
  updates its tensors in place)."""
  array = tensor.detach().cpu().numpy()
  if name == "kernel":
    array = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
  return np.array(array, dtype=np.asarray(like).dtype)


def flax_to_torch(tree: dict[str, dict[str, Any]], dtype: torch.dtype = torch.float32) -> Tensors:
  """Flax `params` or `batch_stats` ({module: {leaf: array}}) as PyTorch tensors named
  `module.weight`, `module.bias`, `module.running_mean`, `module.running_var`."""
  return {f"{module}.{_TORCH_NAMES[leaf]}": _to_torch_layout(leaf, value, dtype)
          for module, leaves in tree.items() for leaf, value in leaves.items()}


def torch_to_flax(tensors: Tensors, like: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """The inverse of `flax_to_torch`: numpy arrays in `like`'s structure, layouts and dtypes."""
  return {module: {leaf: _to_flax_layout(leaf, tensors[f"{module}.{_TORCH_NAMES[leaf]}"], value)
                   for leaf, value in leaves.items()}
          for module, leaves in like.items()}


def images_to_torch(images: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
  """NHWC images (a JAX or numpy array) as a contiguous NCHW tensor."""
  return torch.from_numpy(np.array(images)).to(dtype).permute(0, 3, 1, 2).contiguous()


def labels_to_torch(labels: Any) -> torch.Tensor:
  """Integer labels (−1: unlabelled) as an int64 tensor."""
  return torch.from_numpy(np.array(labels)).long()


@functools.lru_cache(maxsize=None)
def _layer_names(blocks: tuple[tuple[int, ...], ...]) -> list[list[tuple[str, str]]]:
  """(conv, BatchNorm) module names of each block, numbered as Flax numbers them."""
  names, index = [], 0
  for block in blocks:
    names.append([(f"Conv_{index + i}", f"BatchNorm_{index + i}") for i in range(len(block))])
    index += len(block)
  return names


def _batch_norm(x: torch.Tensor, params: Tensors, buffers: Tensors | None, name: str, train: bool,
                momentum: float) -> torch.Tensor:
  # In training mode without buffers: batch statistics, nothing updated. With buffers: PyTorch folds
  # the batch's mean and unbiased variance into them in place.
  running_mean = running_var = None
  if buffers is not None:
    running_mean, running_var = buffers[f"{name}.running_mean"], buffers[f"{name}.running_var"]
  return F.batch_norm(x, running_mean, running_var, params[f"{name}.weight"],
                      params[f"{name}.bias"], train, momentum, BN_EPS)


def cnn_forward(params: Tensors, buffers: Tensors | None, images: torch.Tensor, train: bool, *,
                momentum: float = BN_MOMENTUM, blocks: Sequence[Sequence[int]] = CIFAR_BLOCKS
                ) -> tuple[torch.Tensor, torch.Tensor]:
  """The paper's CNN (`models.ConvBNClassifier`): blocks of conv3x3+BN+ReLU, a 2x2 max-pool after
  each, FC+BN+ReLU features, FC logits. Returns `(logits, features)`.

  `train`: BatchNorm on batch statistics, folded into `buffers` (in place) unless `buffers` is
  None; otherwise BatchNorm on the running statistics `buffers`.
  """
  x = images
  for block in _layer_names(tuple(tuple(b) for b in blocks)):
    for conv, bn in block:
      x = F.conv2d(x, params[f"{conv}.weight"], params[f"{conv}.bias"], padding=1)
      x = F.relu(_batch_norm(x, params, buffers, bn, train, momentum))
    x = F.max_pool2d(x, 2)
  # Flax flattens NHWC: the FC layer's input order is (h, w, c).
  x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
  fc, last = "Dense_0", f"BatchNorm_{sum(len(b) for b in blocks)}"
  x = F.linear(x, params[f"{fc}.weight"], params[f"{fc}.bias"])
  features = F.relu(_batch_norm(x, params, buffers, last, train, momentum))
  logits = F.linear(features, params["Dense_1.weight"], params["Dense_1.bias"])
  return logits, features


def _soft_label_kl(log_p: torch.Tensor, log_soft_labels: torch.Tensor) -> torch.Tensor:
  """L_c = 1/(B·C) Σ p (log p − log ŷ).

  log ŷ is a log_softmax of MLN's logits, as in mln_jax; the reference takes log(ŷ + 1e-10), which
  agrees to float32 precision while ŷ > ~1e-9 but differs beyond that (and in float64).
  """
  return (log_p.exp() * (log_p - log_soft_labels)).mean()


class TorchMetaLabelNet:
  """MetaLabelNet (SPEC) in PyTorch: classifier θ (SGD, momentum, L2), frozen extractor e, and
  MetaLabelNet φ, a linear layer (Adam with L2).

  Attributes: `params`, `buffers` (running statistics), `extractor_params`, `extractor_buffers`,
  `mln_params` (dicts of tensors), `sgd`, `adam` (the optimisers), `step` (updates done).

  `reference_batch_norm`: as the reference code, the meta forward of step 4 (through θ') folds the
  meta batch's BatchNorm statistics into the running statistics before step 7 folds the training
  batch's; by default only step 7's are.
  """

  def __init__(self, params: Tensors, buffers: Tensors, mln_params: Tensors, *,
               learning_rate: float = 0.01, momentum: float = 0.9, weight_decay: float = 1e-4,
               mln_learning_rate: float = 1e-2, mln_weight_decay: float = 1e-4,
               inner_lr: float = 1.0, reference_batch_norm: bool = False,
               blocks: Sequence[Sequence[int]] = CIFAR_BLOCKS, step: int = 0):
    self.params = {k: v.detach().requires_grad_() for k, v in params.items()}
    self.buffers = {k: v.detach() for k, v in buffers.items()}
    self.mln_params = {k: v.detach().requires_grad_() for k, v in mln_params.items()}
    self.extractor_params: Tensors | None = None
    self.extractor_buffers: Tensors | None = None
    self.inner_lr = inner_lr
    self.reference_batch_norm = reference_batch_norm
    self.blocks = tuple(tuple(b) for b in blocks)
    self.step = step
    self._theta = list(self.params.values())
    self._phi = list(self.mln_params.values())
    self._buffer_list = list(self.buffers.values())
    self.sgd = torch.optim.SGD(self._theta, lr=learning_rate, momentum=momentum,
                               weight_decay=weight_decay, foreach=True)
    self.adam = torch.optim.Adam(self._phi, lr=mln_learning_rate, weight_decay=mln_weight_decay,
                                 foreach=True)

  # --- Conversion from and to mln_jax's TrainState -----------------------------------------------

  @classmethod
  def from_train_state(cls, state: Any, *, dtype: torch.dtype = torch.float32,
                       mln_learning_rate: float = 1e-2, mln_weight_decay: float = 1e-4,
                       reference_batch_norm: bool = False,
                       blocks: Sequence[Sequence[int]] = CIFAR_BLOCKS) -> "TorchMetaLabelNet":
    """An oracle holding `state`'s classifier, running statistics, SGD momentum and settings,
    extractor (if frozen), MetaLabelNet and its Adam moments, in `dtype`.

    The Adam learning rate and L2 are not in the state: give `state`'s (`mln_learning_rate`,
    `mln_weight_decay`).
    """
    hyper = state.opt_state.hyperparams
    oracle = cls(flax_to_torch(state.params, dtype), flax_to_torch(state.batch_stats, dtype),
                 flax_to_torch(state.mln_params, dtype),
                 learning_rate=float(hyper["learning_rate"]), momentum=float(hyper["momentum"]),
                 weight_decay=float(hyper["weight_decay"]), mln_learning_rate=mln_learning_rate,
                 mln_weight_decay=mln_weight_decay, inner_lr=float(state.inner_lr),
                 reference_batch_norm=reference_batch_norm, blocks=blocks, step=int(state.step))
    if state.extractor_frozen:
      oracle.extractor_params = flax_to_torch(state.extractor_params, dtype)
      oracle.extractor_buffers = flax_to_torch(state.extractor_batch_stats, dtype)
    # Optimiser states: optax's trace is torch's momentum buffer; Adam's mu/nu/count are
    # exp_avg/exp_avg_sq/step. Before the first update torch keeps no state (and starts the same).
    if int(otu.tree_get(state.opt_state, "count")) > 0:
      trace = flax_to_torch(otu.tree_get(state.opt_state, "trace"), dtype)
      for name, p in oracle.params.items():
        oracle.sgd.state[p]["momentum_buffer"] = trace[name]
    adam_count = int(otu.tree_get(state.mln_opt_state, "count"))
    if adam_count > 0:
      mu = flax_to_torch(otu.tree_get(state.mln_opt_state, "mu"), dtype)
      nu = flax_to_torch(otu.tree_get(state.mln_opt_state, "nu"), dtype)
      for name, p in oracle.mln_params.items():
        oracle.adam.state[p] = {"step": torch.tensor(float(adam_count)), "exp_avg": mu[name],
                                "exp_avg_sq": nu[name]}
    return oracle

  def to_train_state(self, like: Any) -> Any:
    """`like` (a TrainState of the same model) with every array field replaced by the oracle's
    value, as numpy arrays of `like`'s dtypes and layouts: to compare with JAX leaf by leaf."""
    zeros = {name: torch.zeros_like(p) for name, p in self.params.items()}
    trace = {name: self.sgd.state.get(p, {}).get("momentum_buffer", zeros[name])
             for name, p in self.params.items()}
    adam = {name: self.adam.state.get(p, {}) for name, p in self.mln_params.items()}
    mu = {n: s.get("exp_avg", torch.zeros_like(self.mln_params[n])) for n, s in adam.items()}
    nu = {n: s.get("exp_avg_sq", torch.zeros_like(self.mln_params[n])) for n, s in adam.items()}
    adam_count = int(next(iter(adam.values())).get("step", 0))
    count = lambda tree, n: np.asarray(n, dtype=np.asarray(otu.tree_get(tree, "count")).dtype)
    group = self.sgd.param_groups[0]
    torch_names = {"learning_rate": "lr", "momentum": "momentum", "weight_decay": "weight_decay"}
    hyper = {k: np.asarray(group[torch_names[k]], dtype=np.asarray(v).dtype)
             for k, v in like.opt_state.hyperparams.items()}
    # One tree_set per field: optax 0.2.8's tree_set drops the nested `trace` when it also
    # replaces the enclosing state's `count`.
    opt_state = otu.tree_set(like.opt_state, trace=torch_to_flax(trace, like.params))
    opt_state = otu.tree_set(opt_state, count=count(like.opt_state, self.step))
    opt_state = opt_state._replace(hyperparams=hyper)
    mln_opt_state = otu.tree_set(like.mln_opt_state, mu=torch_to_flax(mu, like.mln_params),
                                 nu=torch_to_flax(nu, like.mln_params))
    mln_opt_state = otu.tree_set(mln_opt_state, count=count(like.mln_opt_state, adam_count))
    fields = dict(step=np.asarray(self.step, dtype=np.asarray(like.step).dtype),
                  params=torch_to_flax(self.params, like.params),
                  batch_stats=torch_to_flax(self.buffers, like.batch_stats),
                  opt_state=opt_state, mln_params=torch_to_flax(self.mln_params, like.mln_params),
                  mln_opt_state=mln_opt_state)
    if self.extractor_params is not None:
      fields.update(extractor_params=torch_to_flax(self.extractor_params, like.extractor_params),
                    extractor_batch_stats=torch_to_flax(self.extractor_buffers,
                                                        like.extractor_batch_stats),
                    extractor_frozen=True)
    return like.replace(**fields)

  # --- Training ----------------------------------------------------------------------------------

  def set_learning_rate(self, learning_rate: float) -> None:
    """The classifier's SGD learning rate (the per-epoch schedule)."""
    for group in self.sgd.param_groups:
      group["lr"] = learning_rate

  def _sgd_update(self, grads: Sequence[torch.Tensor]) -> None:
    for p, g in zip(self._theta, grads):
      p.grad = g
    self.sgd.step()
    self.step += 1

  def warmup_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Phase 1: one SGD step of mean cross-entropy (labels −1 left out), BatchNorm in training
    mode updating the running statistics. Returns the loss and the batch accuracy."""
    logits, _ = cnn_forward(self.params, self.buffers, images, True, blocks=self.blocks)
    loss = F.cross_entropy(logits, labels, ignore_index=-1)
    self._sgd_update(torch.autograd.grad(loss, self._theta))
    with torch.no_grad():
      labelled = labels >= 0
      hits = ((logits.argmax(-1) == labels) & labelled).sum()
      accuracy = hits / labelled.sum().clamp(min=1)
    return {"loss": loss.detach(), "accuracy": accuracy}

  def freeze_extractor(self) -> None:
    """Phase 1 -> 2: a copy of the classifier becomes the (never trained) feature extractor."""
    self.extractor_params = {k: v.detach().clone() for k, v in self.params.items()}
    self.extractor_buffers = {k: v.clone() for k, v in self.buffers.items()}

  def soft_label_logits(self, images: torch.Tensor) -> torch.Tensor:
    """MetaLabelNet's logits on the frozen extractor's features (inference mode); differentiable
    in φ."""
    if self.extractor_params is None:
      raise ValueError("No frozen feature extractor: call freeze_extractor() after the warm-up.")
    with torch.no_grad():
      _, features = cnn_forward(self.extractor_params, self.extractor_buffers, images, False,
                                blocks=self.blocks)
    return F.linear(features, self.mln_params["Dense_0.weight"], self.mln_params["Dense_0.bias"])

  def meta_step(self, images: torch.Tensor, meta_images: torch.Tensor, meta_labels: torch.Tensor
                ) -> dict[str, Any]:
    """Phase 2, SPEC steps 1–7, on a training batch (no labels) and a clean meta batch.

    Returns the losses of step 7 (`loss`, `classification_loss`, `entropy_loss`), `meta_loss`
    (step 4), `mln_grads` (∇_φ L_meta, {name: tensor}) and `soft_labels` (ŷ' of step 6).
    """
    # 1. ŷ = softmax(MLN(e(x))). The features do not depend on φ: computed once for steps 1 and 6.
    if self.extractor_params is None:
      raise ValueError("No frozen feature extractor: call freeze_extractor() after the warm-up.")
    with torch.no_grad():
      _, features = cnn_forward(self.extractor_params, self.extractor_buffers, images, False,
                                blocks=self.blocks)
    weight, bias = self.mln_params["Dense_0.weight"], self.mln_params["Dense_0.bias"]
    log_soft_labels = F.log_softmax(F.linear(features, weight, bias), -1)

    # 2. One training forward with θ serves steps 2 and 7 (as in the reference). Its batch
    # statistics must reach the running statistics exactly once, after step 4's in the reference
    # order: there it writes them to zeroed scratch buffers (momentum 1: the statistics
    # themselves), folded in after step 4.
    if self.reference_batch_norm:
      captured = {k: torch.zeros_like(v) for k, v in self.buffers.items()}
      logits, _ = cnn_forward(self.params, captured, images, True, momentum=1.0,
                              blocks=self.blocks)
    else:
      logits, _ = cnn_forward(self.params, self.buffers, images, True, blocks=self.blocks)
    log_p = F.log_softmax(logits, -1)
    inner_loss = _soft_label_kl(log_p, log_soft_labels)

    # 3. θ' = θ − α ∇_θ L_c(θ, ŷ), differentiable in φ (second order).
    inner_grads = torch.autograd.grad(inner_loss, self._theta, create_graph=True)
    fast = {name: p - self.inner_lr * g
            for (name, p), g in zip(self.params.items(), inner_grads)}

    # 4. Meta loss through θ', BatchNorm on the meta batch's statistics (folded into the running
    # statistics only in the reference's way).
    meta_logits, _ = cnn_forward(fast, self.buffers if self.reference_batch_norm else None,
                                 meta_images, True, blocks=self.blocks)
    meta_loss = F.cross_entropy(meta_logits, meta_labels, ignore_index=-1)

    # 5. ∇_φ L_meta by autograd through step 3; Adam on φ. The graph of step 2 is kept for step 7.
    mln_grads = torch.autograd.grad(meta_loss, self._phi, retain_graph=True)
    meta_loss = meta_loss.detach()
    del inner_grads, fast, meta_logits
    if self.reference_batch_norm:
      # Step 7's statistics on top of step 4's; only now, as step 4's graph saved the buffers.
      torch._foreach_lerp_(self._buffer_list, [captured[k] for k in self.buffers], BN_MOMENTUM)
    for p, g in zip(self._phi, mln_grads):
      p.grad = g
    self.adam.step()

    # 6. ŷ' from the updated MetaLabelNet, a constant for step 7.
    with torch.no_grad():
      new_log_soft_labels = F.log_softmax(F.linear(features, weight, bias), -1)

    # 7. SGD on L_c(θ, ŷ') + L_e(θ), from the forward of step 2.
    classification = _soft_label_kl(log_p, new_log_soft_labels)
    entropy = -(log_p.exp() * log_p).mean()
    loss = classification + entropy
    self._sgd_update(torch.autograd.grad(loss, self._theta))
    return {"loss": loss.detach(), "classification_loss": classification.detach(),
            "entropy_loss": entropy.detach(), "meta_loss": meta_loss,
            "mln_grads": dict(zip(self.mln_params, mln_grads)),
            "soft_labels": new_log_soft_labels.exp()}

  def predict(self, images: torch.Tensor) -> torch.Tensor:
    """Classifier logits in inference mode (running statistics)."""
    with torch.no_grad():
      return cnn_forward(self.params, self.buffers, images, False, blocks=self.blocks)[0]
