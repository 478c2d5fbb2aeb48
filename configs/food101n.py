"""Food-101N (Lee et al., CleanNet, 2018): 310k web images of Food-101's 101 classes labelled by
their search query (about 20% wrong), with the MetaLabelNet authors' settings: ImageNet-pretrained
ResNet-50, batch 32, 10 epochs with 1 warm-up, lr 1e-3 for 5 epochs then 1e-4, β = 1e-3, 10,000
meta images, images resized to 256×256 and centre-cropped to 224, random horizontal flips.

  python -m mln_jax.main --config=configs/food101n.py --workdir=/tmp/mln_food101n \\
      --config.data_dir=/data/food \\
      --config.model.pretrained=/weights/resnet50-0676ba61.pth

`data_dir` holds `Food-101N_release/` and `food-101/` as their authors distribute them
(`Food-101N_release/images/<class>/<file>.jpg`, `meta/classes.txt`, `meta/imagelist.tsv`,
`meta/verified_train.tsv`, `meta/verified_val.tsv`; `food-101/images/<class>/<name>.jpg`,
`meta/classes.txt`, `meta/test.txt`); `--config.data.food101_dir` puts Food-101 elsewhere.

Splits (`data.food101n_split`):
- 'literature' (default): train on Food-101N's noisy images, test on Food-101's 25,250 test images;
  the meta images (`data.num_meta`, drawn by seed) are verified-correct images of
  `verified_train.tsv`, taken out of the training set.
- 'authors' (the MetaLabelNet code, `dataset.py`, `get_bigdata_lists`): the same meta images; the
  test set is the validation images verified correct (`verified_val.tsv`, label 1), the ones
  verified wrong stay in training; Food-101 is not read.
results.json's `noise.verified` gives the share of verified-wrong labels among the training images
that were checked (the per-image truth is unknown).

Checks: a missing or malformed list file, an image path outside meta/classes.txt's classes,
Food-101 and Food-101N class lists that differ, or a sample of missing images stop the run before
training, naming the file; verified images not in imagelist.tsv (one in the real release) are left
out with a warning. Everything else (the stream, resumption, several hosts) is as for Clothing1M
(configs/clothing1m.py).

Expected: not run here (the dataset is not available to this project); the steps at these shapes
compile and run on synthetic inputs (experiments/results/streamed_steps_cpu.md).
"""

from mln_jax.config import streamed_config


def get_config():
  config = streamed_config()             # the Clothing1M protocol: the authors use it here too
  config.data.name = "food101n"
  config.data.num_meta = 10000
  config.mln.learning_rate = 1e-3
  config.model.pretrained = ""           # required for the authors' protocol; see the docstring
  return config
