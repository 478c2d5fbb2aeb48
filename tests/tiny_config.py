"""A seconds-long config for tests: digits, a one-block CNN, 4 epochs (2 warm-up), uniform noise."""

from mln_jax.config import default_config


def get_config():
  config = default_config()
  config.method = "metalabelnet"
  config.data.name = "digits"
  config.data.num_heldout = 300
  config.data.num_meta = 100
  config.noise.kind = "uniform"
  config.noise.rate = 0.4
  config.model.name = "conv_bn"
  config.model.blocks = ((8,),)
  config.model.feature_dim = 16
  config.augment.pad = 1
  config.augment.hflip = False
  config.augment.vflip = False
  config.batch_size = 32
  config.eval_batch_size = 128
  config.num_epochs = 4
  config.warmup_epochs = 2
  config.optim.learning_rate = 0.05
  config.optim.lr_boundaries = (3,)
  # The end-of-run report costs seconds a run; the tests that check it turn it on.
  config.report = False
  return config


def with_overrides(config, **overrides):
  """`config` with dotted keys set, e.g. `with_overrides(c, **{"data.num_meta": 10})`."""
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def run_killed(monkeypatch, run, epoch, step=None):
  """Calls `run()` and kills it (KeyboardInterrupt, as a kill would) when the loop closes a logging
  window of 0-based `epoch` (at `step` of it, if given), before the window's metrics are counted:
  what was checkpointed stays, the rest is lost."""
  import pytest  # here, not at the top: this file is also a --config file
  from mln_jax import loop
  real_check = loop.check_finite

  def killed(metrics, at_epoch, at_step, phase, run_dirs):
    if at_epoch == epoch and step in (None, at_step):
      raise KeyboardInterrupt("simulated kill")
    real_check(metrics, at_epoch, at_step, phase, run_dirs)

  with monkeypatch.context() as patch:
    patch.setattr(loop, "check_finite", killed)
    with pytest.raises(KeyboardInterrupt):
      run()
