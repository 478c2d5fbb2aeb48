"""Your own noisy dataset from image folders: `train/<class>/…` (or a `path label` list), a small
clean `meta/<class>/…` and a clean `test/<class>/…`; ResNet-50 at 224×224 with Clothing1M's schedule.

  python -m mln_jax.main --config=configs/image_folder.py --workdir=/tmp/mln_mine \
      --config.data_dir=/data/mine [--config.data.train_list=noisy_labels.txt] \
      [--config.model.pretrained=/weights/resnet50-0676ba61.pth]

Classes are the sorted folder names of `meta/`. Change the schedule with `--config.num_epochs`,
`--config.warmup_epochs`, `--config.optim.*`; the model with `--config.model.name`.
"""

from mln_jax.config import streamed_config


def get_config():
  config = streamed_config()             # Clothing1M's protocol, see mln_jax/config.py
  config.data.name = "image_folder"
  return config
