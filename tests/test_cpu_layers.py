"""experiments/cpu_layers.py: its rows time every form it names (on tiny shapes here)."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("cpu_layers", ROOT / "experiments" / "cpu_layers.py")
cpu_layers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cpu_layers)


def test_rows_time_every_form():
  row = cpu_layers.convolution_row(4, 2, 3, repeats=1)
  assert row["shape"] == "4x4x2->3"
  for key in ("forward_xla", "forward_as_matmuls", "input_grad_xla", "kernel_grad_xla",
              "kernel_grad_conv_same", "kernel_grad_im2col"):
    assert row[key] > 0, key
  pool = cpu_layers.pool_row(4, 2, repeats=1)
  assert pool["grad_nn_max_pool"] > 0 and pool["grad_layers_max_pool"] > 0
