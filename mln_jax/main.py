"""Command line: `python -m mln_jax.main --config=configs/cifar10.py --workdir=DIR
[--config.KEY=VALUE]`."""

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from mln_jax import experiment

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None,
                    "Folder for checkpoints, metrics and results; a run resumes there.")
config_flags.DEFINE_config_file("config", None, "A config file with get_config().",
                                lock_config=True)
flags.DEFINE_bool("multihost", False,
                  "Start with jax.distributed.initialize(): one process per host (a TPU pod slice, "
                  "several GPU nodes). Each process reads its share of every batch; process 0 "
                  "writes metrics and results. Streamed datasets only.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Orbax logs every checkpoint operation at INFO; keep the log to the run's own progress lines.
  logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname)
  if FLAGS.multihost:
    jax.distributed.initialize()  # finds the coordinator on TPU pods, SLURM and Open MPI
  logging.info("JAX %s on %d device(s) in %d process(es): %s", jax.__version__, jax.device_count(),
               jax.process_count(), jax.devices()[0].device_kind)
  experiment.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
