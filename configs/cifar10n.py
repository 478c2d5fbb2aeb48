"""CIFAR-10N (Wei et al., ICLR 2022): CIFAR-10's training images with real human annotators'
labels, on the paper's CIFAR-10 protocol (SPEC, Section IV-B: the 8-layer CNN, batch 128, 120
epochs, 44 warm-up, 5,000 meta images from the test set). Default: the `worse` labels (40.2%
noise); `--config.noise.human_label=aggre` (9.0%), `random1` | `random2` | `random3` (17-18%).

The label file is CIFAR-N's `CIFAR-10_human.pt` (github.com/UCSC-REAL/cifar-10-100n, data/), or an
.npz / .npy export of its arrays; it is read without torch. Its images are the pack's, the python
release's, or tfds's:

  python -m mln_jax.main --config=configs/cifar10n.py --workdir=/tmp/mln_cifar10n \\
      --config.data_dir=../shared/data/cifar10 --config.noise.labels_path=/data/CIFAR-10_human.pt
  # Colab: tfds's cifar10 images and cifar10_n labels (no file; cifar10_n needs its manual files)
  python -m mln_jax.main --config=configs/cifar10n.py --workdir=/tmp/mln_cifar10n \\
      --config.data.source=tfds

The file's `clean_label` must equal the dataset's clean training labels element by element, or
the run stops before training, saying the file and the images are in different orders. results.json
gives the realised noise rate (`noise.realised_rate`) and the transition matrix
(`noise.transition_matrix`, P(given | clean)); figures/noise_transition.png draws it.

Expected: not run here (the label files are not available to this project; the route is tested
on fabricated files in exactly their formats, experiments/results/human_noise_cli.md).
"""

from mln_jax.config import default_config


def get_config():
  config = default_config()              # the paper's CIFAR-10 protocol
  config.noise.kind = "human"
  config.noise.human_label = "worse"
  return config
