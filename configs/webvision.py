"""WebVision 1.0, the paper's protocol (SPEC; paper, Section IV-B3): Google images of the first 50
classes, Inception-ResNet-v2 from random initialisation, batch 16, 30 epochs with 14 warm-up, lr
1e-2 for 12 epochs then 1e-3, β = 1e-3, images resized to 320×320 and centre-cropped to 299, random
horizontal flips; 1k of the 2.5k verified validation images are the meta-data, the other 1.5k the
test set (split by seed).

  python -m mln_jax.main --config=configs/webvision.py --workdir=/tmp/mln_webvision \
      --config.data_dir=/data/webvision [--config.data.imagenet_val_dir=/data/imagenet/val]

`data_dir` holds `info/`, `google/` and `val_images/` as distributed; `imagenet_val_dir` (optional)
the ILSVRC12 validation images in one folder per synset, a second test set of the same 50 classes.
Accuracies are top-1 and top-5. Batch 16 is the paper's (the reference code uses 25).

Layout (read as distributed, no conversion step; `mln_jax/file_lists.py`): `data_dir` with
`info/train_filelist_google.txt` (`google/q0001/x.jpg <label>` lines), `info/val_filelist.txt`
(`x.jpg <label>`, images under `val_images/`, or `val_images_256/` in the resized release),
`info/synsets.txt` (one `n01440764 name` a line) and `google/…`. Training and validation images with
a label ≥ `data.num_classes` are dropped; the kept validation images are split by `seed` into
`data.num_meta` meta images and the test set (0 < num_meta < their number). `data.imagenet_val_dir`:
the ILSVRC12 validation images in one folder per synset (`n01440764/…`, the first `num_classes`
synsets of `info/synsets.txt`), reported as the test split `imagenet_val`. No clean labels of the
training images are known, so results.json has no realised noise rate or label-issue report.

Streaming, checks, settings, several hosts and preemption: as for every streamed dataset, see the
docstring of configs/clothing1m.py.

Expected: the paper reports its WebVision results in Table III (not in this project's copy of the
text). Not yet run here: the dataset is not available to this project.
"""

from mln_jax.config import streamed_config


def get_config():
  config = streamed_config()
  config.data.name = "webvision"
  config.data.num_classes = 50
  config.data.num_meta = 1000
  config.data.resize_size = 320
  config.data.image_size = 299
  config.model.name = "inception_resnet_v2"
  config.batch_size = 16
  config.num_epochs = 30
  config.warmup_epochs = 14
  config.optim.learning_rate = 1e-2
  config.optim.lr_boundaries = (12,)     # β stays 1e-3
  return config
