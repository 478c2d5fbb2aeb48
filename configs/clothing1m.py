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

Layout (read as the authors distribute it, no conversion step; `mln_jax/file_lists.py`): `data_dir`
with `images/…`, `noisy_label_kv.txt` and `clean_label_kv.txt` (`images/a/b/c.jpg <label>` lines),
`noisy_train_key_list.txt`, `clean_val_key_list.txt`, `clean_test_key_list.txt` (a path a line) and,
optionally, `category_names_eng.txt` (the class names). The 50k clean training images are not used;
the ~37k noisy training images that also have a clean label give the real noise rate in
results.json (`noise.realised_rate`, `noise.measured_on`) and, after a MetaLabelNet run, the
precision and recall of the label errors its soft labels flag (`label_issues`).

What follows holds for every dataset streamed from disk (this config, webvision.py and
image_folder.py).

Checks: a layout that is not what it should be stops the run before training, naming the missing or
malformed file (every list file is checked, and a sample of each list's images). The datasets' own
labels are the noisy labels (`noise.kind=none`); one run per job (`num_runs=1`: start one job per
seed); the batch must divide evenly over the devices and processes.

The stream (`mln_jax/input_pipeline.py`, tf.data): every epoch's order and flips are drawn in NumPy
from `(seed, epoch)`; each process reads its own slice of every global batch; JPEGs are decoded,
resized (`data.resize_mode`: `square`, "resized to 256x256" as the paper says, or `shorter_side` as
torchvision's `Resize(256)`), centre-cropped and flipped in parallel by tf.data; batches travel as
uint8 and are normalised with ImageNet's mean and standard deviation on the device, sharded over the
`Mesh`, two batches in flight. The meta stream cycles through whole shuffled passes of the meta set,
independently of the training stream; by default (`data.meta_in_memory`) the meta set is decoded
once and kept on every device as uint8 (Clothing1M's 14k at 224²: 2.1 GB), and each meta batch is
gathered and flipped on the device: the same batches as streaming it (tested), with half the
decoding in phase 2. Because the order is a function of `(seed, epoch)`, a run resumed from a
mid-epoch checkpoint (`checkpoint_every_steps`) skips the steps it has taken without decoding them
and ends bitwise equal to an uninterrupted run (tested).

Settings: `data.num_meta` (meta-data size, Table IV; 0: the whole clean set), `data.num_unlabelled`
(training images whose labels are dropped: warm-up skips them, phase 2 uses them; Table V),
`data.resize_size`, `data.image_size`, `data.resize_mode`, `data.meta_in_memory`, `model.pretrained`
(a torchvision ResNet state dict, `.pth` or an `.npz` of its arrays; loading `.pth` needs `torch`, a
CPU build is enough; a head of another class count stays freshly initialised), `model.name=resnet`
with `model.stage_sizes`/`model.num_filters` for other depths (torchvision's ResNet-101/152 weights
load the same way), `checkpoint_every_steps`, `log_every_steps`, `export_soft_labels`. The results
hold top-1 and top-5 accuracy on the meta data and every test set, at the best meta epoch and the
last one. After a MetaLabelNet run, one inference pass over the training images writes
`soft_labels.npz` (as for CIFAR-10, plus each image's `image_file`; `export_soft_labels=False` skips
it).

Several hosts (TPU pod slices, GPU nodes): `python -m mln_jax.main --multihost ...` on every host
calls `jax.distributed.initialize()`; each process reads its part of every batch, orbax checkpoints
once for all processes, and only process 0 writes metrics and results; the workdir must be a file
system every host sees. Preemption notices (a TPU's maintenance event, a cluster's SIGTERM) reach
the loop through JAX's distributed runtime, which `--multihost` starts (also useful on a single TPU
VM): the loop asks after every training step (a notice that comes during an evaluation is acted on
at the next step), writes a checkpoint at the notice and stops with `Preempted`; the same command
resumes. Without it, a killed run resumes from its last periodic checkpoint
(`checkpoint_every_steps`). The Colab TPU recipe is in experiments/colab_tpu.md.

Tested on CPU: the layouts and their errors on tiny fabricated datasets in exactly these layouts,
stream determinism and mid-epoch resume, two real processes (JAX's distributed runtime with gloo on
CPU, as two hosts) training one run that matches one process with the same four devices and writing
once, a 4-device sharded run matching a 1-device run, the CLI, and the torchvision converter against
PyTorch (tests/test_resnet.py, needs `torch`; skipped without it). Not yet run: any real Clothing1M
or WebVision training (the datasets are not available to this project), a TPU, several physical
hosts.

Expected (paper, Table II): 78.20% test accuracy. Not yet run here: the dataset is not available to
this project (experiments/results/ records only step throughput on synthetic inputs).
"""

from mln_jax.config import streamed_config


def get_config():
  config = streamed_config()             # the Clothing1M protocol, see mln_jax/config.py
  config.data.name = "clothing1m"
  config.model.pretrained = ""           # required for the paper's protocol; see the docstring
  return config
