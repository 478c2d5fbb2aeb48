"""Metric writers: clu's default writer (log lines + TensorBoard), or log lines alone without TensorFlow.

clu's TensorBoard writer needs TensorFlow; where it is absent (the GPU machine here, a slim install) runs
still log every metric and write results.json, and say once that TensorBoard files are off.
"""

from __future__ import annotations

from typing import Any, Mapping

from absl import logging


class LogOnlyWriter:
  """The subset of clu's MetricWriter interface that the training loop uses, writing to the log."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in scalars.items()))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info("hparams: %s", dict(hparams))

  def flush(self) -> None:
    pass


def create_writer(workdir: str) -> Any:
  """clu's default writer into `workdir` where TensorFlow is installed, else a `LogOnlyWriter`."""
  try:
    from clu import metric_writers  # Imports TensorFlow.
  except ImportError as error:
    logging.warning("TensorBoard summaries are off (%s); metrics go to the log and results.json.",
                    error)
    return LogOnlyWriter()
  return metric_writers.create_default_writer(workdir, asynchronous=False)
