"""Clothing1M, the paper's protocol (SPEC; paper, Section IV-B2): ImageNet-pretrained ResNet-50,
batch 32, 10 epochs with 1 warm-up, lr 1e-3 for 5 epochs then 1e-4, β = 1e-3, images resized to
256×256 and centre-cropped to 224, random horizontal flips; the 14k clean validation images are the
meta-data, the 10k clean test images the test set.

  python -m mln_jax.main --config=configs/clothing1m.py --workdir=/tmp/mln_clothing1m \
      --config.data_dir=/data/clothing1m \
      --config.model.pretrained=/weights/resnet50-0676ba61.pth

`data_dir` holds `images/` and the list files as the authors distribute them; `pretrained` is a
torchvision ResNet-50 ImageNet state dict (.pth, or an .npz of its arrays). Table IV: meta-data size
`--config.data.num_meta=1000` (0: all 14k); Table V: `--config.data.num_unlabelled=500000`.

Expected (paper, Table II): 78.20% test accuracy. Not yet run here: the dataset is not available to
this project (experiments/results/ records only step throughput on synthetic inputs).
"""

from mln_jax.config import streamed_config


def get_config():
  config = streamed_config()             # the Clothing1M protocol, see mln_jax/config.py
  config.data.name = "clothing1m"
  config.model.pretrained = ""           # required for the paper's protocol; see the docstring
  return config
