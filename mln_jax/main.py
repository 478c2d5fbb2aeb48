"""Command line: `python -m mln_jax.main --config=configs/cifar10.py --workdir=DIR
[--config.KEY=VALUE] [--print_config]`.

A mistake in the config, the data or the workdir prints `error: <what and the fix>` and exits with
status 2 (the traceback with --verbosity=1); a stop asked for by SIGINT, SIGTERM or a preemption
notice writes a checkpoint and exits with status 3: run the same command again to resume.
"""

import importlib.util
import os
import re
import sys
import tempfile

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from mln_jax import config as config_lib, experiment, loop, methods, runtime

# TensorFlow's (tf.data, TensorBoard files) and JAX's start-up notices on a machine without a GPU
# or TPU, which read like failures: "failed call to cuInit", "Could not find cuda drivers",
# "Unable to initialize backend 'tpu'", oneDNN's.
_START_UP_NOISE = re.compile(r"cuInit|cuda drivers|cudart_stub|absl::InitializeLog|oneDNN|"
                             r"Unable to initialize backend|TF_ENABLE_ONEDNN_OPTS|"
                             r"computation placer already registered|Unable to register cu")

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None,
                    "Folder for checkpoints, metrics and results; a run resumes there.")
config_flags.DEFINE_config_file("config", None, "A config file with get_config().",
                                lock_config=True)
flags.DEFINE_bool("multihost", False,
                  "Start with jax.distributed.initialize(): one process per host (a TPU pod slice, "
                  "several GPU nodes). Each process reads its share of every batch; process 0 "
                  "writes metrics and results. Streamed datasets only.")
flags.DEFINE_bool("print_config", False,
                  "Check the config (keys, values, every method's settings), print it resolved and "
                  "exit without training; --workdir is not needed.")
flags.mark_flag_as_required("config")

# What a user can act on: a wrong setting or path, a diverged run, a busy workdir.
USER_ERRORS = (ValueError, OSError, FloatingPointError, runtime.WorkdirBusy)


def _import_tensorflow_quietly() -> None:
  """Imports TensorFlow (where installed) with its C++ start-up lines filtered out of stderr; any
  other line it prints is passed on."""
  if importlib.util.find_spec("tensorflow") is None:
    return
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # noqa: F401
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors="replace").splitlines(keepends=True):
        if not _START_UP_NOISE.search(line):
          sys.stderr.write(line)


def print_config(config) -> None:
  """Validates `config` as a run would and prints it with its references resolved."""
  config_lib.validate_config(config)
  for name in methods.resolve(config.method):
    methods.get(methods.with_method(config, name))
  print(config.copy_and_resolve_references())


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.print_config and FLAGS.workdir is None:
    raise app.UsageError("--workdir is required (where the run keeps its checkpoints and results).")
  # Orbax logs every checkpoint operation at INFO; keep the log to the run's own progress lines.
  logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname)
  logging.get_absl_handler().addFilter(
      lambda record: not _START_UP_NOISE.search(str(record.getMessage())))
  _import_tensorflow_quietly()
  try:
    if FLAGS.print_config:
      print_config(FLAGS.config)
      return
    if FLAGS.multihost:
      jax.distributed.initialize()  # finds the coordinator on TPU pods, SLURM and Open MPI
    logging.info("JAX %s on %d device(s) in %d process(es): %s", jax.__version__,
                 jax.device_count(), jax.process_count(), jax.devices()[0].device_kind)
    experiment.run(FLAGS.config, FLAGS.workdir)
  except loop.Preempted as e:
    print(f"stopped: {e}", file=sys.stderr)
    sys.exit(3)
  except USER_ERRORS as e:
    if FLAGS.verbosity >= 1:
      raise
    print(f"error: {e}\n(--verbosity=1 shows where it was raised)", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:  # a second Ctrl-C: stopped at once
    print("interrupted: run the same command again to resume from the last checkpoint.",
          file=sys.stderr, flush=True)
    # At once: an interrupted checkpoint save leaves orbax's threads to complain at a normal
    # shutdown; what was saved is complete, what was not is cleaned up on the rerun.
    os._exit(130)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad --config.KEY=VALUE (an unknown key, a value of the wrong type)
  named in one line instead of a traceback."""
  try:
    return FLAGS(argv)
  except flags.Error:
    return app.parse_flags_with_usage(argv)  # absl's own message and usage
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    named = str(e).strip("'\" ")  # e.g. the unknown key
    override = next((a for a in argv if a.startswith("--config.") and named in a), "")
    print(f"error: a --config override cannot be applied ({type(e).__name__}: {e}); check the "
          f"key and the value's type{f' in {override}' if override else ''} (--print_config "
          "lists every key).", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
