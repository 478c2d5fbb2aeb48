"""CIFAR-100 on the paper's CIFAR-10 protocol (SPEC, Section IV-B), with 100 classes: the 8-layer
CNN, batch 128, 120 epochs with 44 warm-up, 5,000 of the 10,000 test images as meta-data and the
other 5,000 as the test set (split by seed), as the authors' code does for CIFAR-100.

Default noise: 40% feature-dependent from a clean model's class probabilities (2-fold cross-fitted,
`noise.probabilities=clean_model`: no student file exists for CIFAR-100), kept in the workdir.

  python -m mln_jax.main --config=configs/cifar100.py --workdir=/tmp/mln_cifar100 \\
      --config.data_dir=/data/cifar-100-python
  # or from TensorFlow Datasets (the Colab route), restored to the python release's order:
  python -m mln_jax.main --config=configs/cifar100.py --workdir=/tmp/mln_cifar100 \\
      --config.data.source=tfds [--config.data.download=True] [--config.data_dir=<tfds data dir>]

Other noise: `--config.noise.kind=uniform --config.noise.rate=0.6`; `--config.noise.kind=
class_dependent` flips each class to the next class of its superclass (the 20 coarse classes;
`--config.noise.flip_groups=index_blocks`: classes 5k..5k+4, as the literature's code does);
CIFAR-100N's human labels: `--config.noise.kind=human --config.noise.human_label=noisy
--config.noise.labels_path=CIFAR-100_human.pt` (or with data.source=tfds, tfds's cifar100_n).

Expected: the paper reports no CIFAR-100 numbers, and none has been run here yet (CIFAR-100 is not
available to this project; its loaders are tested on fabricated files in exactly its formats).
"""

from mln_jax.config import default_config


def get_config():
  config = default_config()              # the paper's CIFAR-10 protocol
  config.data.name = "cifar100"
  config.data.source = "python"
  config.noise.probabilities = "clean_model"
  return config
