"""One process of a multi-process CPU run (tests/test_multiprocess.py starts several).

  python tests/multiprocess_driver.py PROCESS_ID NUM_PROCESSES PORT WORKDIR DATA_DIR

Each process gets 4 / NUM_PROCESSES CPU devices; with several processes, JAX's distributed runtime
connects them (gloo collectives on CPU) as it would the hosts of a TPU pod slice. Prints the run's
history as one JSON line.
"""

import json
import os
import pathlib
import sys

process_id, num_processes, port = (int(a) for a in sys.argv[1:4])
workdir, data_dir = sys.argv[4:6]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // num_processes}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if num_processes > 1:
  jax.distributed.initialize(f"localhost:{port}", num_processes=num_processes,
                             process_id=process_id)

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from mln_jax import config as config_lib, experiment  # noqa: E402
import test_streamed  # noqa: E402
import tiny_config  # noqa: E402

config = tiny_config.with_overrides(config_lib.streamed_config(), **{
    **test_streamed.TINY_STREAMED, "data.name": "clothing1m", "data.data_dir": data_dir,
    "report": True})  # its files too must come from one process
results = experiment.run(config, workdir)["metalabelnet"][0]
print("HISTORY " + json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                               "history": results["history"]}), flush=True)
