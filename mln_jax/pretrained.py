"""Loading torchvision ResNet weights (e.g. ImageNet `resnet50`) into `mln_jax.resnet.ResNet`.

Checkpoints are PyTorch state dicts saved with `torch.save` (`.pth`/`.pt`; reading them needs torch)
or `.npz` archives with the same keys (no torch needed). To make one where torch is installed:

  state = torch.load("resnet50-0676ba61.pth", map_location="cpu", weights_only=True)
  np.savez("resnet50.npz", **{k: v.numpy() for k, v in state.items()})
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

Variables = Mapping[str, Any]  # {"params": ..., "batch_stats": ...} of an initialised model

HEAD = "fc"  # The classification layer: kept as initialised where the class count differs.

# torchvision leaf name -> (Flax collection, leaf name); a 1-D `weight` is a BatchNorm scale.
_LEAVES = {
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Reads a state dict from an `.npz` or a `torch.save` file (anything else), as NumPy arrays.

  A leading `module.` (from `nn.DataParallel`) is stripped from every key.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"No checkpoint file at {path}.")
  if path.suffix == ".npz":
    with np.load(path, allow_pickle=False) as archive:
      state = {key: archive[key] for key in archive.files}
  else:
    state = _torch_load(path)
  return {key.removeprefix("module."): value for key, value in state.items()}


def _torch_load(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel  # Only .pth/.pt files need torch.
  except ImportError as e:
    raise ImportError(
        f"Reading the PyTorch checkpoint {path} needs torch (`pip install torch`); or convert "
        "it to an .npz with the same keys where torch is installed (see mln_jax/pretrained.py)."
    ) from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise ValueError(f"{path} does not hold a state dict (a mapping from names to tensors).")
  # bfloat16 tensors have no NumPy dtype; float32 is what the model takes anyway.
  return {key: (value.float() if value.is_floating_point() else value).numpy()
          for key, value in state.items()}


def _flax_key(torch_key: str, value: np.ndarray) -> tuple[str, ...] | None:
  """`layer1.0.downsample.1.running_var` -> ('batch_stats', 'layer1_0', 'downsample_1', 'var')."""
  module, leaf = torch_key.rsplit(".", 1) if "." in torch_key else ("", torch_key)
  path = tuple(re.sub(r"\.(\d+)", r"_\1", module).split("."))
  if leaf == "weight":
    collection, name = ("params", "scale") if value.ndim == 1 else ("params", "kernel")
  elif leaf in _LEAVES:
    collection, name = _LEAVES[leaf]
  else:
    return None
  return (collection, *path, name)


def torch_name(flax_key: tuple[str, ...]) -> str:
  """The inverse of `_flax_key`, for error messages."""
  *path, leaf = flax_key[1:]
  leaf = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}.get(
      leaf, leaf)
  return re.sub(r"_(\d+)", r".\1", ".".join(path)) + "." + leaf


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(flax_shape) == 4:
    return tuple(flax_shape[i] for i in (3, 2, 0, 1))  # HWIO -> OIHW
  return tuple(reversed(flax_shape))  # (in, out) -> (out, in); 1-D unchanged


def _to_flax_layout(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # conv OIHW -> HWIO
  if value.ndim == 2:
    return value.T  # linear (out, in) -> (in, out)
  return value


def resnet_variables_from_torch(state_dict: Mapping[str, Any], variables: Variables
                                ) -> tuple[dict[str, Any], tuple[str, ...]]:
  """Returns `(new_variables, skipped_keys)`: `variables` with every tensor replaced by the
  torchvision state dict's, and the state-dict keys left out.

  Convolution kernels go OIHW -> HWIO, linear weights are transposed, BatchNorm `weight`, `bias`,
  `running_mean`, `running_var` become `scale`, `bias` (params) and `mean`, `var` (batch_stats);
  `num_batches_tracked` is ignored. If only the class count of `fc` differs (a 1000-class ImageNet
  checkpoint for a 14-class model), the model's initialised head is kept and the `fc` keys are
  returned as skipped (and logged); otherwise loading is strict: any missing or unexpected key or
  other shape mismatch raises a `ValueError` naming them. The result has the tree structure of
  `variables`, with float32 arrays.
  """
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(variables)
  paths = [tuple(str(k.key) for k in path) for path, _ in leaves_with_paths]
  targets = {path: tuple(leaf.shape) for path, (_, leaf) in zip(paths, leaves_with_paths)}

  def mismatch(torch_key, torch_shape, key):
    return f"{torch_key} {torch_shape} (model: {_torch_shape(targets[key])})"

  converted, unexpected, mismatched, head = {}, [], [], {}
  for torch_key, value in state_dict.items():
    value = np.asarray(value)
    if torch_key.endswith("num_batches_tracked"):
      continue
    key = _flax_key(torch_key, value)
    if key not in targets:
      unexpected.append(f"{torch_key} {value.shape}")
    elif key[1] == HEAD:
      head[torch_key] = (key, value.shape, _to_flax_layout(value))
    elif _to_flax_layout(value).shape != targets[key]:
      mismatched.append(mismatch(torch_key, value.shape, key))
    else:
      converted[key] = _to_flax_layout(value)

  skipped = ()
  # Same input width, different class count: a new head for a new task, not a wrong checkpoint.
  head_fits = all(value.shape == targets[key] for key, _, value in head.values())
  same_features = all(value.shape[:-1] == targets[key][:-1] for key, _, value in head.values())
  if head_fits:
    converted.update((key, value) for key, _, value in head.values())
  elif same_features:
    skipped = tuple(sorted(head))
    converted.update((key, None) for key, _, _ in head.values())  # Covered: kept as initialised.
    logging.info("Kept the model's initialised head: the checkpoint's %s have another class count.",
                 ", ".join(f"{k} {shape}" for k, (_, shape, _) in sorted(head.items())))
  else:
    mismatched += [mismatch(k, shape, key) for k, (key, shape, value) in sorted(head.items())
                   if value.shape != targets[key]]

  missing = [f"{torch_name(path)} {_torch_shape(targets[path])}" for path in paths
             if path not in converted]
  # Shapes in PyTorch's layout (OIHW convs, (out, in) linears), as in the checkpoint.
  problems = [f"{title}: {', '.join(items)}" for title, items in
              (("missing from the checkpoint", missing), ("not in the model", unexpected),
               ("shape mismatches", mismatched)) if items]
  if problems:
    raise ValueError("The checkpoint does not fit the model; " + "; ".join(problems) + ".")

  new_leaves = [jnp.asarray(leaf if converted[path] is None else converted[path], jnp.float32)
                for path, (_, leaf) in zip(paths, leaves_with_paths)]
  return jax.tree_util.tree_unflatten(treedef, new_leaves), skipped


def load_pretrained_resnet(path: str | os.PathLike[str], variables: Variables
                           ) -> tuple[dict[str, Any], tuple[str, ...]]:
  """`resnet_variables_from_torch(load_state_dict(path), variables)`."""
  return resnet_variables_from_torch(load_state_dict(path), variables)
