"""Test set-up: four forced CPU devices (for the data-parallel tests) and the shared data pack."""

import os
import pathlib
import sys

# Must happen before JAX initialises its backends: every test sees 4 CPU devices, so the
# data-parallel tests can compare a sharded step with a single-device one in the same process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CIFAR10_PACK = REPO_ROOT.parent / "shared" / "data" / "cifar10"


@pytest.fixture
def cifar10_pack() -> pathlib.Path:
  """Path of the real CIFAR-10 pack; skips the test cleanly where ../shared is absent."""
  if not (CIFAR10_PACK / "cifar10_jpeg.npz").exists():
    pytest.skip(f"CIFAR-10 pack not found at {CIFAR10_PACK}")
  return CIFAR10_PACK


@pytest.fixture(scope="session")
def finished_digits_run(tmp_path_factory) -> pathlib.Path:
  """A finished one-epoch cross-entropy run on tiny digits, shared by the tests that need one: what
  a finished workdir refuses, returns and gives."""
  sys.path.insert(0, str(REPO_ROOT / "tests"))
  import tiny_config
  from mln_jax import experiment
  workdir = tmp_path_factory.mktemp("finished_digits")
  config = tiny_config.with_overrides(tiny_config.get_config(), method="cross_entropy",
                                      num_epochs=1)
  experiment.run(config, str(workdir))
  return workdir
