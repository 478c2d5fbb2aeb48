"""`python -m mln_jax.bench --vs_torch`: mln_jax's steps timed against the PyTorch oracle's."""

import importlib.util
import pathlib

import pytest

pytest.importorskip("torch")

from mln_jax import bench_vs_torch  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_digits_case_is_the_digits_default_s_classifier():
  spec = importlib.util.spec_from_file_location("digits", ROOT / "configs" / "digits.py")
  digits = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(digits)
  config = digits.get_config()
  (_, model, image_shape, batch_size), = [c for c in bench_vs_torch.CASES if c[0] == "digits"]
  assert model == {"name": config.model.name, "blocks": tuple(config.model.blocks),
                   "feature_dim": config.model.feature_dim}
  assert batch_size == config.batch_size
  assert image_shape == (8, 8, 1)


def test_comparison_times_every_step_of_both_libraries():
  report = bench_vs_torch.compare_with_torch(repeats=1, cases=("digits",))
  assert [row["step"] for row in report["rows"]] == ["warm-up", "meta/autodiff", "meta/jvp"]
  for row in report["rows"]:
    assert row["jax_ms"] > 0 and row["torch_ms"] > 0
    assert row["ratio"] == pytest.approx(row["jax_ms"] / row["torch_ms"])
  text = bench_vs_torch.format_comparison(report)
  assert "meta/jvp" in text and "jax/torch" in text
