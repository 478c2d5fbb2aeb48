"""What every run needs from its surroundings: the device mesh, replicated arrays, workdir checks,
JSON files written atomically, and the environment a result was computed in."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import socket
import subprocess
from typing import Any, Iterator

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mln_jax import config as config_lib

RESULTS_FILE = "results.json"
# Settings a resumed run may change: they do not change its numbers (e.g. keeping the meta set in
# device memory or streaming it gives the same batches, and may be switched when memory runs short;
# the others change only what a run checks or writes at its end or beside it).
RESUMABLE_CHANGES = ("data.meta_in_memory", "data.verify_files", "data.download",
                     "export_soft_labels", "report",
                     "label_issues.gallery_size", "label_issues.cross_fit")
# Where a workdir's cross-fit lives (mln_jax.cross_fit): its half runs are parts of one score.
CROSS_FIT_DIR = "cross_fit"
LOCK_FILE = ".lock"
# What to do about a damaged JSON file a workdir holds, by its name.
_JSON_FIXES = {
    RESULTS_FILE: "Delete it and run the same command again: the run resumes from its last "
                  "checkpoint and writes it anew.",
    "config.json": "It records the config the run was started with: restore it from a copy, or "
                   "delete it if you are sure the command's config is that run's.",
    "comparison.json": "Delete it: the next run of the experiment writes it again.",
}


class WorkdirBusy(RuntimeError):
  """Another process trains in the workdir."""


_held_locks: set[str] = set()  # the lock files this process holds


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds `workdir/.lock` while a run works there, so that a second process on the same workdir is
  refused with the first one's pid instead of training beside it.

  The lock is an `flock`, which the kernel releases when its process ends in any way (a SIGKILL
  included): it never stays stuck. Nested holds in one process (an experiment around its runs)
  are allowed.
  """
  path = os.path.abspath(os.path.join(workdir, LOCK_FILE))
  if path in _held_locks:  # the outer hold releases it
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
    os.close(fd)
    raise WorkdirBusy(f"{workdir} is in use by another run ({holder}). Wait for it to finish or "
                      "stop it (it resumes later from its checkpoints), or use another "
                      "--workdir.") from None
  os.ftruncate(fd, 0)
  os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
  _held_locks.add(path)
  try:
    yield
  finally:
    _held_locks.discard(path)
    os.close(fd)  # releases the lock; the file stays (removing it would race a new holder)


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


def git_commit() -> str:
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
  """A JSON file of a workdir; a damaged one is named, with what to do about it."""
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    fix = _JSON_FIXES.get(os.path.basename(path), "Delete or restore it.")
    raise ValueError(f"{path} is damaged ({e}); a killed write or a full disk? {fix}") from None


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:  # e.g. a source tree on the path
    return "unknown"


def run_environment(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a result was computed on and with: device, JAX and package versions, precision settings,
  commit. (Numbers on a CPU can change with the processor and with the packages' versions.)"""
  return {"device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
          "processes": jax.process_count(),
          "jax_version": jax.__version__,
          "packages": {name: _version(name) for name in
                       ("jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")},
          "matmul_precision": config.matmul_precision,
          "compute_dtype": config.compute_dtype,
          "commit": git_commit()}


def run_dirs(workdir: str, num_runs: int) -> list[str]:
  """Each run's folder: `workdir` itself for one run, `workdir/run_<i>` for runs trained
  together."""
  if num_runs == 1:
    return [workdir]
  return [os.path.join(workdir, f"run_{index}") for index in range(num_runs)]


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict, checkpoint_dir: str,
                         write: bool = True) -> None:
  """A workdir belongs to one config: resuming with another would silently mix two runs.

  A workdir whose run stopped before its first checkpoint (say a wrong data_dir or a diverging
  learning rate) holds nothing to resume, so a corrected config replaces the saved one.
  """
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    saved, now = config_lib.flatten(read_json(path)), config_lib.flatten(current)
    changed = sorted(k for k in set(saved) | set(now)
                     if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
    if not changed:
      if write and saved != now:  # only what a resume may change: the saved config follows
        write_json_atomically(path, current)
      return
    if (ocp.utils.checkpoint_steps(checkpoint_dir)
        or os.path.exists(os.path.join(workdir, RESULTS_FILE))):
      raise ValueError(f"{workdir} holds a run with a different config (differs in: "
                       f"{', '.join(changed)}). Resume with the same config or use a new "
                       "--workdir.")
    logging.info("%s: no checkpoint yet, so the new config replaces the saved one (it differed "
                 "in %s).", workdir, ", ".join(changed))
  if write:
    write_json_atomically(path, current)
