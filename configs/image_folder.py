"""Your own noisy dataset from image folders: `train/<class>/…` (or a `path label` list), a small
clean `meta/<class>/…` and a clean `test/<class>/…`; ResNet-50 at 224×224 with Clothing1M's
schedule.

  python -m mln_jax.main --config=configs/image_folder.py --workdir=/tmp/mln_mine \
      --config.data_dir=/data/mine [--config.data.train_list=noisy_labels.txt] \
      [--config.model.pretrained=/weights/resnet50-0676ba61.pth]

Layout (`mln_jax/file_lists.py`): `data_dir` with `train/<class>/…` (noisy labels) or, instead,
`data.train_list`: a file of `relative/path label` lines (paths relative to `data_dir`; label −1
marks an image without a label: warm-up skips it, phase 2 learns from it through its soft label),
and the clean `meta/<class>/…` and `test/<class>/…`. Classes are the sorted folder names of
`meta/` (label i is the i-th name); `train/` must have the same class folders, `test/` one for each
class. Hidden files and folders are skipped. `data.num_meta` draws a meta subset by `seed` (0: all
of `meta/`). No clean labels of the training images are known, so results.json has no realised
noise rate or label-issue report.

Change the schedule with `--config.num_epochs`, `--config.warmup_epochs`, `--config.optim.*`; the
model with `--config.model.name`. Streaming, checks, settings, several hosts and preemption: as for
every streamed dataset, see the docstring of configs/clothing1m.py.
"""

from mln_jax.config import streamed_config


def get_config():
  config = streamed_config()             # Clothing1M's protocol, see mln_jax/config.py
  config.data.name = "image_folder"
  return config
