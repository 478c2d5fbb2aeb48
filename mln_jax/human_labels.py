"""Real human noise: the CIFAR-10N / CIFAR-100N annotators' labels (Wei et al., ICLR 2022).

`noise.kind=human` trains on one of their label sets (`noise.human_label`), read from
- the files the CIFAR-N authors distribute, `CIFAR-10_human.pt` / `CIFAR-100_human.pt`: a
  `torch.save`d dict of numpy int arrays in the python release's training order (keys
  `clean_label`, `aggre_label`, `worse_label`, `random_label1..3`; CIFAR-100N: `clean_label`,
  `noisy_label`, `clean_coarse_label`, `noisy_coarse_label`). A dict of numpy arrays is read
  without torch, by an unpickler that builds numpy arrays and nothing else (a file with torch
  tensors in it is handed to torch, where installed);
- their exports: an `.npz` with those keys, or an `.npy` of the dict (`np.save(path, d)`), read by
  the same restricted unpickler instead of numpy's `allow_pickle`;
- TensorFlow Datasets' `cifar10_n` / `cifar100_n` (with `data.source=tfds` and no file), restored
  to the python order from their ids (`mln_jax.tfds_data`).

Whatever the source, its clean labels must equal the dataset's clean training labels element by
element: a label file in another order than the images (the most common CIFAR-N mistake: one
re-ordered for another loader) would otherwise train on labels that belong to other images, with a
"noise rate" that means nothing.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import zipfile
from typing import Any, BinaryIO

import numpy as np

# noise.human_label -> the label file's key.
HUMAN_LABELS = {"aggre": "aggre_label", "worse": "worse_label", "random1": "random_label1",
                "random2": "random_label2", "random3": "random_label3", "noisy": "noisy_label"}
CLEAN_KEY = "clean_label"
# The tfds builders with the human labels of each dataset.
TFDS_BUILDERS = {"cifar10": "cifar10_n", "cifar100": "cifar100_n"}
# What the pickle of a dict of numpy arrays refers to, and nothing else may be built (protocol 2,
# torch.save's, writes bytes as _codecs.encode(text, 'latin1')).
_NUMPY_GLOBALS = {("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
                  ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
                  ("_codecs", "encode")}
# torch's legacy (pre-1.6) format starts with this number, pickled.
_TORCH_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class _TensorsInside(Exception):
  """The file holds torch tensors: torch reads it (with its own safe loader)."""


class _Refused(ValueError):
  """The file would build other objects than numpy arrays."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Builds dicts, lists, numbers, strings and numpy arrays; refuses every other class (pickles can
  run code) and hands torch's tensors over to torch."""

  def find_class(self, module: str, name: str) -> Any:
    # numpy >= 2 moved numpy.core to numpy._core; files pickled by numpy 1 name the old module.
    module = module.replace("numpy.core.", "numpy._core.", 1)
    if module == "torch" or module.startswith("torch."):
      raise _TensorsInside(f"{module}.{name}")
    if (module, name) not in _NUMPY_GLOBALS:
      raise _Refused(f"the file would build a {module}.{name}, not only numpy arrays; refusing "
                       "to unpickle it (pickles can run code)")
    return super().find_class(module, name)

  def persistent_load(self, pid: Any) -> Any:
    raise _TensorsInside("a tensor storage")


def _unpickle(stream: BinaryIO) -> Any:
  return _NumpyOnlyUnpickler(stream).load()


def _read_torch_pickles(path: pathlib.Path) -> Any:
  """The object of a `torch.save` file (zip or legacy format) made of numpy arrays."""
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      members = [m for m in archive.namelist() if m.endswith("data.pkl")]
      if len(members) != 1:
        raise ValueError(f"{path} is a zip file but not one torch.save wrote (no single data.pkl "
                         f"in it; it holds {archive.namelist()[:5]}).")
      with archive.open(members[0]) as stream:
        return _unpickle(stream)
  with open(path, "rb") as stream:
    try:
      magic = _unpickle(stream)
    except (pickle.UnpicklingError, EOFError, ValueError, _TensorsInside) as e:
      raise ValueError(f"{path} is not a file torch.save wrote ({type(e).__name__}: "
                       f"{e}).") from None
    if magic != _TORCH_LEGACY_MAGIC:
      raise ValueError(f"{path} is not a file torch.save wrote (it starts with {magic!r}).")
    _unpickle(stream)  # the protocol version
    _unpickle(stream)  # the saving machine's sizes and byte order
    return _unpickle(stream)


def _read_torch_file(path: pathlib.Path) -> Any:
  try:
    return _read_torch_pickles(path)
  except _Refused as e:
    raise ValueError(f"{path}: {e}.") from None
  except _TensorsInside as e:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ValueError(f"{path} holds torch objects ({e}), not only numpy arrays: reading it needs "
                       "torch (pip install torch), or save its arrays with np.savez.") from None
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict):
      return loaded
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in loaded.items()}


def _read_npy_file(path: pathlib.Path) -> Any:
  """An `.npy` file: a plain array, or an object array (e.g. `np.save` of a dict) unpickled with
  numpy arrays only."""
  with open(path, "rb") as stream:
    version = np.lib.format.read_magic(stream)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read_header(stream)
    if dtype != object:
      return np.load(path, allow_pickle=False)
    try:
      array = _unpickle(stream)
    except (_TensorsInside, _Refused) as e:
      raise ValueError(f"{path}: {e}.") from None
  return array.item() if shape == () else array


def read_label_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """The label sets of a CIFAR-N file (`.pt`/`.pth`, `.npz`, or `.npy` of a dict), by key."""
  path = pathlib.Path(path).expanduser()
  if path.is_dir():
    raise IsADirectoryError(f"human-label path {path} is a folder: name the label file in it "
                            "(CIFAR-10_human.pt, CIFAR-100_human.pt, or an .npz/.npy export).")
  if not path.is_file():
    raise FileNotFoundError(f"human-label file not found: {path}. CIFAR-10N/100N's "
                            "CIFAR-10_human.pt and CIFAR-100_human.pt are in "
                            "github.com/UCSC-REAL/cifar-10-100n (data/).")
  suffix = path.suffix.lower()
  try:
    if suffix in (".pt", ".pth"):
      loaded = _read_torch_file(path)
    elif suffix == ".npy":
      loaded = _read_npy_file(path)
    elif suffix == ".npz":
      with np.load(path, allow_pickle=False) as archive:
        loaded = {key: archive[key] for key in archive.files}
    else:
      raise ValueError(f"{path}: unsupported file type for human labels; use the CIFAR-N .pt "
                       "file, an .npz of its arrays, or an .npy of its dict.")
  except (EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError) as e:
    raise ValueError(f"{path} is damaged or not a {suffix} file ({type(e).__name__}: "
                     f"{e}).") from None
  if not isinstance(loaded, dict):
    raise ValueError(f"{path} holds {type(loaded).__name__} {getattr(loaded, 'shape', '')}, not "
                     f"the dict of label sets a CIFAR-N file holds (keys {CLEAN_KEY}, "
                     "worse_label, …); for one bare array of labels use --config.noise.kind=given.")
  return {str(key): np.asarray(value) for key, value in loaded.items()}


def _labels(values: np.ndarray, key: str, where: str, num_classes: int) -> np.ndarray:
  if values.ndim != 1 or values.dtype.kind not in "iu":
    raise ValueError(f"{where}: {key} must be a 1-D integer array, got {values.dtype} "
                     f"{values.shape}.")
  bad = np.flatnonzero((values < 0) | (values >= num_classes))
  if bad.size:
    raise ValueError(f"{where}: {key}[{bad[0]}] = {values[bad[0]]} lies outside [0, "
                     f"{num_classes}): a file for a dataset with more classes?")
  return values.astype(np.int32)


def check_same_order(file_clean: np.ndarray, clean: np.ndarray, where: str) -> None:
  """The label source's clean labels equal the dataset's, element by element, or ValueError says
  how they differ (another order, or another dataset)."""
  if file_clean.shape != clean.shape:
    raise ValueError(f"{where}: {CLEAN_KEY} holds {file_clean.size} labels for {clean.size} "
                     "training samples: a file for another dataset (CIFAR-10N's for CIFAR-10, "
                     "CIFAR-100N's for CIFAR-100).")
  differ = np.flatnonzero(file_clean != clean)
  if not differ.size:
    return
  first = differ[0]
  same_classes = np.array_equal(np.sort(file_clean), np.sort(clean))
  raise ValueError(
      f"{where}: its {CLEAN_KEY} differs from the dataset's clean training labels at "
      f"{differ.size} of {clean.size} positions (first at index {first}: {file_clean[first]} vs "
      f"{clean[first]}). "
      + ("The label file and the images are in different orders. CIFAR-N's files follow the "
         "python release's training order (data_batch_1..5), which data.source=pack, python and "
         "tfds (restored from tfds's ids) all give; a file re-ordered for another loader does not."
         if same_classes else "The file is for another dataset, or its clean labels are damaged."))


def load(human_label: str, labels_path: str, clean: np.ndarray, num_classes: int,
         tfds_dataset: tuple[str, str, bool] | None = None) -> np.ndarray:
  """The `human_label` set (a key of HUMAN_LABELS), checked against the clean training labels.

  Args:
    human_label: 'aggre' | 'worse' | 'random1' | 'random2' | 'random3' (CIFAR-10N), 'noisy'
      (CIFAR-100N).
    labels_path: the label file; '' reads tfds's `<name>_n` instead (needs `tfds_dataset`).
    clean: the dataset's clean training labels, in its training order.
    num_classes: the dataset's class count.
    tfds_dataset: (dataset name, tfds data_dir, download) for the tfds route.

  Returns:
    The int32 human labels, one per training sample in the dataset's order.
  """
  if human_label not in HUMAN_LABELS:
    raise ValueError(f"config.noise.human_label={human_label!r}: choose one of "
                     f"{', '.join(HUMAN_LABELS)}.")
  if labels_path:
    sets, where = read_label_dict(labels_path), str(labels_path)
  elif tfds_dataset is not None:
    from mln_jax import tfds_data  # pylint: disable=g-import-not-at-top (TensorFlow)
    name, data_dir, download = tfds_dataset
    if name not in TFDS_BUILDERS:
      raise ValueError(f"tfds has no human labels for {name!r} (it has {list(TFDS_BUILDERS)}).")
    sets = tfds_data.read_human_labels(TFDS_BUILDERS[name], data_dir, download)
    where = f"tfds {TFDS_BUILDERS[name]}"
  else:
    raise ValueError("noise kind 'human' needs its labels: set --config.noise.labels_path to "
                     "CIFAR-10_human.pt / CIFAR-100_human.pt (or an .npz/.npy export), or use "
                     "--config.data.source=tfds to read tfds's cifar10_n / cifar100_n.")
  key = HUMAN_LABELS[human_label]
  for needed in (CLEAN_KEY, key):
    if needed not in sets:
      hint = (" (a CIFAR-100N file: use --config.noise.human_label=noisy)" if "noisy_label" in sets
              else " (a CIFAR-10N file: human_label aggre, worse or random1..3)"
              if "worse_label" in sets else "")
      raise ValueError(f"{where} has no {needed!r}; it holds {sorted(sets)}{hint}."
                       + (" Without the clean labels the file's order cannot be checked."
                          if needed == CLEAN_KEY else ""))
  check_same_order(_labels(sets[CLEAN_KEY], CLEAN_KEY, where, num_classes),
                   np.asarray(clean, np.int32), where)
  return _labels(sets[key], key, where, num_classes)
