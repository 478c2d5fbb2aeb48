"""CIFAR-10 cross-entropy baseline (Table I's first row): the same protocol, cross-entropy
throughout.

  python -m mln_jax.main --config=configs/cifar10_cross_entropy.py --workdir=/tmp/ce_cifar10 \
      --config.data_dir=../shared/data/cifar10

Expected (paper, Table I, cross-entropy, feature-dependent 40%): 71.86 ± 0.69 % test accuracy.
"""

from mln_jax.config import default_config


def get_config():
  config = default_config()
  config.method = "cross_entropy"
  return config
