"""CIFAR-10, the paper's protocol (SPEC, Section IV-B): 8-layer CNN, batch 128, 120 epochs, 44
warm-up.

Default noise: 40% feature-dependent, from the pack's student probabilities (as the paper).

  python -m mln_jax.main --config=configs/cifar10.py --workdir=/tmp/mln_cifar10 \
      --config.data_dir=../shared/data/cifar10 \
      [--config.noise.kind=uniform --config.noise.rate=0.6 --config.seed=1 --config.num_runs=3]

Expected (paper, Table I, MetaLabelNet, feature-dependent 40%): 80.42 ± 0.51 % test accuracy.
Other cells: uniform 20/40/60/80% -> 83.35 / 79.03 / 70.60 / 50.02; feature-dependent 20/60/80% ->
83.00 / 78.42 / 76.57. Our measured numbers live in experiments/results/.
"""

from mln_jax.config import default_config


def get_config():
  return default_config()
