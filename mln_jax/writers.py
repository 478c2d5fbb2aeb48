"""TensorBoard summaries through clu's metric writers (the progress log lines come from the loop).

clu's TensorBoard writer needs TensorFlow; where it is absent (a slim install, the GPU machine here)
runs still log every epoch and write results.json, and say once that TensorBoard files are off.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from absl import logging


class NoSummaryWriter:
  """Stands in for clu's writer where TensorFlow is missing: the log and results.json hold it
  all."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    del step, scalars

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    del hparams

  def flush(self) -> None:
    pass


def create_writer(workdir: str) -> Any:
  """clu's TensorBoard `SummaryWriter` into `workdir`, or a `NoSummaryWriter` without TensorFlow."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
  try:
    import tensorflow as tf
    from clu import metric_writers
  except ImportError as error:
    logging.warning("TensorBoard summaries are off (%s); metrics go to the log and results.json.",
                    error)
    return NoSummaryWriter()
  # TensorFlow only writes summary files here: keep it off the accelerators JAX uses.
  tf.config.set_visible_devices([], "GPU")
  return metric_writers.SummaryWriter(workdir)
