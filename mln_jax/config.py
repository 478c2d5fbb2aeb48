"""The configuration schema: every key a run understands, with the paper's CIFAR-10 protocol as
defaults.

Config files in `configs/` start from `default_config()` and override values; `validate_config`
rejects keys this schema does not know and values outside their allowed sets, naming the key and the
fix.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from mln_jax.data import SOURCES
from mln_jax.human_labels import HUMAN_LABELS
from mln_jax.noise import FLIP_GROUPS, NOISE_KINDS

IN_MEMORY_DATASETS = ("cifar10", "cifar100", "digits")
# Too large for device memory: streamed from disk by tf.data (mln_jax.streamed).
STREAMED_DATASETS = ("clothing1m", "webvision", "food101n", "image_folder")
FOOD101N_SPLITS = ("literature", "authors")


def default_config() -> ml_collections.ConfigDict:
  """The paper's CIFAR-10 protocol (SPEC, Section IV-B) on the shared pack."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # A method of the registry (mln_jax/methods: 'metalabelnet', warm-up then phase 2;
  # 'cross_entropy', for all epochs, the baseline row), a comma-separated list of them, 'both'
  # (those two) or 'all': several train one after another, each in its own sub-folder of the
  # workdir, then a comparison.
  config.method = "metalabelnet"
  # Independent runs with seeds seed, seed + 1, ... trained together in one vmapped program (each
  # with its own split, noise, initialisation and data order); results per run in workdir/run_<i>.
  config.num_runs = 1
  # The dataset's folder (cifar10: the pack or the python folder; cifar100: cifar-100-python; tfds:
  # the tfds data folder, TFDS's default where empty; streamed datasets: the root of the authors'
  # layout). One setting with two names: --config.data_dir and --config.data.data_dir set
  # the same value (code reads data.data_dir).
  config.data_dir = ml_collections.FieldReference("", field_type=str)

  config.data = ml_collections.ConfigDict()
  # In memory: 'cifar10' | 'cifar100' | 'digits'. Streamed from disk: 'clothing1m' | 'webvision' |
  # 'food101n' | 'image_folder'.
  config.data.name = "cifar10"
  # cifar10: 'pack' (the JPEG .npz pack) | 'python' | 'tfds'; cifar100: 'python' | 'tfds'. tfds
  # is restored to the python release's order (the pack's, the student probabilities', CIFAR-N's).
  config.data.source = "pack"
  # tfds: prepare a dataset that is not there yet (it downloads); False stops with the command.
  config.data.download = False
  config.data.data_dir = config.get_ref("data_dir")
  # Meta-data size. cifar10, digits, webvision: drawn from the held-out pool, the rest is test;
  # clothing1m, image_folder: a subset of the clean meta set (0: all of it).
  config.data.num_meta = 5000
  config.data.num_unlabelled = 0         # training samples whose labels are dropped (phase 2 only)
  config.data.num_heldout = 0            # digits: size of the held-out (meta + test) pool
  config.data.split_seed = 0             # digits: which samples are held out
  # Streamed datasets: images resized to resize_size (see resize_mode), centre crop of image_size.
  config.data.resize_size = 0
  config.data.image_size = 0
  # 'square' (resize_size × resize_size, the paper's words) | 'shorter_side' (aspect kept, as
  # torchvision's Resize(int)).
  config.data.resize_mode = "square"
  config.data.num_classes = 0            # webvision: the first num_classes classes (paper: 50)
  config.data.imagenet_val_dir = ""      # webvision: ILSVRC12 val images in <synset>/ folders
  config.data.train_list = ""            # image_folder: `path label` lines instead of train/
  # food101n: 'literature' (train on Food-101N's noisy images, meta from its verified-correct
  # training images, test on Food-101's test set) | 'authors' (the MetaLabelNet code's: test on
  # Food-101N's verified-correct validation images; no Food-101 needed).
  config.data.food101n_split = "literature"
  config.data.food101_dir = ""           # food101n: food-101/ (default: <data_dir>/food-101)
  # Streamed datasets: decode the meta set once and keep it in device memory as uint8 (Clothing1M's
  # 14k at 224²: 2.1 GB per device), so that phase 2 decodes only training images; False streams
  # it from disk like the training images (the same batches either way).
  config.data.meta_in_memory = True
  # Streamed datasets: check before training that every training file exists (a sample of them is
  # always checked, and every meta and test image is decoded once).
  config.data.verify_files = False

  config.noise = ml_collections.ConfigDict()
  config.noise.kind = "feature_dependent"
  config.noise.rate = 0.4
  # feature_dependent: class probabilities P. 'student': the pack's student_probs.npz (CIFAR-10, as
  # the paper); 'clean_model': the classifier trained on clean labels (2-fold cross-fitted, constant
  # optim.learning_rate); or a path to an (N, C) .npy file, or a student_probs-style .npz, in
  # training order.
  config.noise.probabilities = "student"
  config.noise.teacher_epochs = 10       # epochs of each 'clean_model' fold
  # given: a .npy / .npz[:key] / .txt file of N labels in training order. human: the CIFAR-N file
  # (CIFAR-10_human.pt / CIFAR-100_human.pt, or an .npz / .npy export of it); '' with
  # data.source=tfds reads tfds's cifar10_n / cifar100_n.
  config.noise.labels_path = ""
  # human: which annotators' labels. CIFAR-10N: 'aggre' (9.0% noise), 'random1' | 'random2' |
  # 'random3' (17-18%), 'worse' (40.2%); CIFAR-100N: 'noisy' (about 40%).
  config.noise.human_label = "worse"
  # class_dependent on CIFAR-100: each class flips to the next class of its 'superclasses' group
  # or of its 'index_blocks' group (classes 5k..5k+4, as the literature's code does).
  config.noise.flip_groups = "superclasses"

  config.model = ml_collections.ConfigDict()
  # 'cifar_cnn' | 'conv_bn' | 'mlp' | 'resnet50' | 'resnet' (any depth) | 'inception_resnet_v2'
  config.model.name = "cifar_cnn"
  config.model.blocks = ()               # conv_bn (required): widths per block, e.g. ((32,), (64,))
  config.model.feature_dim = 256         # conv_bn: width of the feature layer
  config.model.hidden = ()               # mlp (required): hidden widths, e.g. (64, 32)
  # resnet: bottleneck blocks per stage ((3, 4, 23, 3): ResNet-101, (3, 8, 36, 3): ResNet-152)
  # and the first stage's width.
  config.model.stage_sizes = (3, 4, 6, 3)
  config.model.num_filters = 64
  # resnet50 / resnet: a torchvision ResNet state dict (.pth, or .npz of its arrays) to start from;
  # a classifier head of another size is left freshly initialised.
  config.model.pretrained = ""

  config.augment = ml_collections.ConfigDict()
  config.augment.pad = 4
  config.augment.hflip = True
  config.augment.vflip = True
  config.augment.meta_batches = True     # meta batches get the training augmentation too

  config.batch_size = 128
  config.eval_batch_size = 1000
  config.num_epochs = 120
  config.warmup_epochs = 44

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 0.01
  config.optim.lr_boundaries = (41, 81)  # 0-based epochs from which the rate is multiplied by decay
  config.optim.lr_decay = 0.1
  config.optim.momentum = 0.9
  config.optim.weight_decay = 1e-4

  config.mln = ml_collections.ConfigDict()
  config.mln.learning_rate = 1e-2        # β, Adam
  config.mln.weight_decay = 1e-4
  config.mln.inner_lr = 1.0              # α of the inner SGD step (reference: 1)
  config.mln.meta_gradient = "autodiff"  # 'autodiff' (jax.grad through optax) | 'jvp' (closed form)
  # BatchNorm running statistics in the steps with a fast-weight forward (MetaLabelNet, MSLG,
  # MLNT): False moves them once per step, toward the training batch's statistics; True also folds
  # in the fast forwards' batch statistics (MetaLabelNet: the meta batch's under θ', before the
  # training batch's), as the authors' code does and as the paper's numbers were made (SPEC).
  config.reference_batch_norm = False

  # The baselines' settings (mln_jax/methods; ../shared/BASELINES.md): the MetaLabelNet
  # reference's CIFAR-10 values (they made the paper's Table I), the original papers' beside them.
  config.sce = ml_collections.ConfigDict()
  config.sce.alpha = 0.1                 # weight of CE (SCE paper, CIFAR-10)
  config.sce.beta = 1.0                  # weight of reverse CE
  config.sce.label_clip = 1e-4           # log 0 in reverse CE is log(label_clip) (paper: A = -4)

  config.gce = ml_collections.ConfigDict()
  config.gce.q = 0.7                     # L_q = (1 - p_y^q) / q

  config.bootstrap = ml_collections.ConfigDict()
  config.bootstrap.beta = 0.95           # target = beta * label + (1 - beta) * prediction (soft)

  config.forward = ml_collections.ConfigDict()
  # Epochs of the cross-entropy network the noise matrix is estimated from (0: num_epochs, a whole
  # cross-entropy run, as the paper); the corrected network then trains num_epochs more.
  config.forward.estimator_epochs = 0
  config.forward.percentile = 97.0       # per class, the anchor is just below this percentile

  config.joint_optimization = ml_collections.ConfigDict()
  # Step 1 (labels updated) at a constant rate, then step 2: a fresh network, num_epochs on the
  # final labels with the configured schedule. JO paper: 200 epochs at lr 0.1 (ResNet-32).
  config.joint_optimization.step1_epochs = 120
  config.joint_optimization.step1_learning_rate = 0.01
  config.joint_optimization.alpha = 1.2  # class-prior KL weight (JO code default 1.0)
  config.joint_optimization.beta = 0.8   # entropy weight (JO code default 0.5)
  config.joint_optimization.label_start_epoch = 70  # 1-based step-1 epoch of the first update
  config.joint_optimization.window = 10  # epochs of predictions averaged into the labels

  config.pencil = ml_collections.ConfigDict()
  config.pencil.alpha = 0.1              # compatibility loss L_o (PENCIL code: 0.4)
  config.pencil.beta = 0.8               # entropy loss L_e (PENCIL code: 0.1)
  config.pencil.label_lr = 400.0         # lambda, plain GD on the label logits (PENCIL code: 600)
  config.pencil.k = 10.0                 # initial label logits K * one-hot
  config.pencil.stage2_epoch = 21        # 0-based first epoch of label learning (s1; code: 70)
  config.pencil.stage3_epoch = 80        # 0-based first epoch with frozen labels (s2; code: 200)

  config.coteaching = ml_collections.ConfigDict()
  # tau, the final share of each batch left out; < 0: noise.rate (the paper: the true rate).
  config.coteaching.forget_rate = -1.0
  config.coteaching.num_gradual = 10     # T_k: epochs of the linear ramp to tau
  config.coteaching.exponent = 1.0       # c: the ramp reaches tau^c

  config.mwnet = ml_collections.ConfigDict()
  config.mwnet.hidden = 100              # VNet 1 -> hidden -> 1
  config.mwnet.learning_rate = 1e-3      # Adam
  config.mwnet.weight_decay = 1e-4       # L2 added to the gradient
  # Weights normalised in the batch, w_i / sum_j w_j (the MW-Net paper's first script); False:
  # (1/B) sum_i w_i l_i (its later script and the MetaLabelNet reference).
  config.mwnet.normalize_weights = False

  config.mlnt = ml_collections.ConfigDict()
  # Epochs of the cross-entropy network whose features pick the synthetic labels (0: num_epochs);
  # the student then trains num_epochs more from a fresh start.
  config.mlnt.feature_epochs = 0
  config.mlnt.num_synthetic = 10         # M synthetic label sets per step
  config.mlnt.fraction = 0.5             # rho: share of the batch relabelled
  config.mlnt.neighbours = 10            # k nearest neighbours in feature space
  config.mlnt.meta_lr = 0.2              # alpha of the fast-weight step (Clothing1M code: 0.02)
  config.mlnt.weight = 1.0               # w, the consistency loss's final weight
  config.mlnt.start_step = 500           # student global steps before the meta loss starts
  config.mlnt.ramp_end_step = 2000       # end of the weight and EMA ramp
  config.mlnt.ema_ramp = 0.99            # teacher EMA decay during the ramp
  config.mlnt.ema = 0.999                # and after it

  config.mslg = ml_collections.ConfigDict()
  # The warm-up (cross-entropy) is config.warmup_epochs, as MetaLabelNet's (reference: E1 = 44).
  config.mslg.inner_lr = 0.5             # alpha of the inner SGD step
  config.mslg.label_lr = 4000.0          # beta, plain GD on the label logits
  config.mslg.entropy_weight = 1.0       # gamma
  config.mslg.k = 10.0                   # initial label logits K * one-hot

  config.checkpoint_every_epochs = 1     # and after the last epoch
  # Streamed datasets: also a checkpoint every so many steps (0: at epoch ends only) and a progress
  # line every log_every_steps steps (checkpoint_every_steps must be a multiple of it).
  config.checkpoint_every_steps = 0
  config.log_every_steps = 100
  # Methods with soft labels (MetaLabelNet): after training, one inference pass over the training
  # images writes soft_labels.npz and the label-issue report; False skips it (a long pass over a
  # streamed dataset).
  config.export_soft_labels = True
  # Each finished run writes into its folder figures/ (accuracy, soft labels, confusion, the
  # gallery of flagged images), label_issues.csv and summary.md (mln_jax.report; also
  # `python -m mln_jax.report --workdir=W` for any finished workdir).
  config.report = True
  config.label_issues = ml_collections.ConfigDict()
  config.label_issues.gallery_size = 32  # flagged images in figures/label_issues.png (0: none)
  # Out-of-sample soft labels: train on two halves of the training set and score each half with
  # the run that did not see it (in-memory datasets; writes cross_fit/ in the workdir).
  config.label_issues.cross_fit = False
  # 'scan': an epoch is one jitted lax.scan (fast on GPU/TPU); 'host': one jitted call per step
  # (fast on CPU, where XLA's convolutions are slow inside loops); 'auto': 'host' on CPU, else
  # 'scan'.
  config.epoch_loop = "auto"
  # Precision of float32 matmuls and convolutions (jax.default_matmul_precision): 'default' lets
  # GPUs use TF32 (as PyTorch's cuDNN convolutions do by default); 'high' and 'highest' are more
  # exact ('highest': full float32).
  config.matmul_precision = "default"
  # Mixed precision: the classifier computes in this dtype; parameters, optimiser states, BatchNorm
  # statistics, losses and MetaLabelNet stay float32.
  config.compute_dtype = "float32"       # 'float32' | 'bfloat16'
  return config


def streamed_config() -> ml_collections.ConfigDict:
  """The defaults of the streamed real-world datasets: the paper's Clothing1M protocol (fine-tuning
  an ImageNet ResNet-50) minus the dataset. configs/clothing1m.py, webvision.py and image_folder.py
  start from it."""
  config = default_config()
  config.noise.kind = "none"             # the datasets' own labels are the (real) noisy labels
  config.data.num_meta = 0               # all of the clean meta set
  config.data.resize_size = 256
  config.data.image_size = 224
  config.model.name = "resnet50"
  config.augment.pad = 0                 # pad-crop and vertical flips are CIFAR-10's augmentation
  config.augment.vflip = False
  config.augment.hflip = True
  config.batch_size = 32
  config.eval_batch_size = 250
  config.num_epochs = 10
  config.warmup_epochs = 1
  config.optim.learning_rate = 1e-3
  config.optim.lr_boundaries = (5,)
  config.mln.learning_rate = 1e-3
  config.checkpoint_every_steps = 2000   # a preempted run loses at most this many steps
  config.log_every_steps = 100
  return config


def _check_keys(config: Any, schema: Any, prefix: str = "") -> None:
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in schema:
      known = ", ".join(sorted(f"{prefix}{k}" for k in schema.keys()))
      raise ValueError(f"Unknown config key {name!r}. Known keys here: {known}.")
    if isinstance(schema[key], ml_collections.ConfigDict):
      if not isinstance(config[key], (ml_collections.ConfigDict, dict)):
        raise ValueError(f"Config key {name!r} must be a group of settings, got {config[key]!r}.")
      _check_keys(config[key], schema[key], name + ".")


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _in_range(config: ml_collections.ConfigDict, key: str, low: float, high: float,
              low_open: bool = False, meaning: str = "") -> None:
  """config.<key> is a number in [low, high] ((low, high] with `low_open`)."""
  value = config
  for part in key.split("."):
    value = value[part]
  above = value > low if low_open else value >= low
  _require(isinstance(value, (int, float)) and not isinstance(value, bool) and above
           and value <= high,
           f"config.{key}={value!r} must lie in {'(' if low_open else '['}{low}, {high}]"
           + (f" ({meaning})." if meaning else "."))


def _check_ranges(config: ml_collections.ConfigDict) -> None:
  """Values no run can mean: each names its key and valid range."""
  _require(_is_int(config.seed) and 0 <= config.seed < 2**31,
           f"config.seed={config.seed!r} must be an integer in [0, 2^31).")
  _in_range(config, "optim.learning_rate", 0, 10, low_open=True,
            meaning="the classifier's SGD step size; the paper's 0.01 for CIFAR-10")
  _in_range(config, "optim.momentum", 0, 0.999)
  _in_range(config, "optim.weight_decay", 0, 1)
  _in_range(config, "optim.lr_decay", 0, 1, low_open=True,
            meaning="the factor at each of optim.lr_boundaries")
  boundaries = config.optim.lr_boundaries
  _require(isinstance(boundaries, (tuple, list)) and all(_is_int(b) and b >= 0 for b in boundaries)
           and list(boundaries) == sorted(boundaries),
           f"config.optim.lr_boundaries={boundaries!r} must be increasing 0-based epochs, e.g. "
           "--config.optim.lr_boundaries='(41, 81)' (or '()' for a constant rate).")
  _in_range(config, "mln.learning_rate", 0, 1, low_open=True,
            meaning="MetaLabelNet's Adam step size β; the paper's 1e-2 (CIFAR-10) to 1e-3")
  _in_range(config, "mln.inner_lr", 0, 100, low_open=True,
            meaning="α of the inner SGD step; the reference's 1")
  _in_range(config, "mln.weight_decay", 0, 1)
  _require(_is_int(config.augment.pad) and config.augment.pad >= 0,
           f"config.augment.pad={config.augment.pad!r} must be a whole number of pixels >= 0.")
  _require(_is_int(config.noise.teacher_epochs) and config.noise.teacher_epochs >= 1,
           f"config.noise.teacher_epochs={config.noise.teacher_epochs!r} must be at least 1 (the "
           "epochs each clean-model teacher trains).")
  for key in ("data.num_meta", "data.num_unlabelled", "data.num_heldout", "warmup_epochs"):
    _in_range(config, key, 0, 2**31)
  for key in ("num_epochs", "batch_size", "eval_batch_size", "log_every_steps",
              "checkpoint_every_epochs"):
    _require(_is_int(config[key]) and config[key] > 0,
             f"config.{key}={config[key]!r} must be a positive integer.")
  widths = lambda v: isinstance(v, (tuple, list)) and all(_is_int(w) and w > 0 for w in v)
  _require(isinstance(config.model.blocks, (tuple, list))
           and all(widths(block) and block for block in config.model.blocks),
           f"config.model.blocks={config.model.blocks!r} must be blocks of positive widths, e.g. "
           "--config.model.blocks='((32,), (64,))'.")
  _require(widths(config.model.hidden),
           f"config.model.hidden={config.model.hidden!r} must be positive widths, e.g. '(64, 32)'.")
  _require(_is_int(config.model.feature_dim) and config.model.feature_dim > 0,
           f"config.model.feature_dim={config.model.feature_dim!r} must be a positive integer.")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the offending key for unknown keys or impossible values (a method's
  own settings are checked by the method, `mln_jax.methods.get`)."""
  _check_keys(config, default_config())
  _check_ranges(config)
  _require(config.noise.kind in NOISE_KINDS,
           f"config.noise.kind={config.noise.kind!r}: choose one of {NOISE_KINDS}.")
  _require(config.noise.human_label in HUMAN_LABELS,
           f"config.noise.human_label={config.noise.human_label!r}: choose one of "
           f"{tuple(HUMAN_LABELS)} (CIFAR-10N: aggre, worse, random1..3; CIFAR-100N: noisy).")
  _require(config.noise.flip_groups in FLIP_GROUPS,
           f"config.noise.flip_groups={config.noise.flip_groups!r}: choose one of {FLIP_GROUPS}.")
  _require(config.data.food101n_split in FOOD101N_SPLITS,
           f"config.data.food101n_split={config.data.food101n_split!r}: choose one of "
           f"{FOOD101N_SPLITS}.")
  if config.data.name in SOURCES:
    _require(config.data.source in SOURCES[config.data.name],
             f"config.data.source={config.data.source!r}: {config.data.name} reads from one of "
             f"{SOURCES[config.data.name]}.")
  _require(config.noise.kind != "human" or bool(config.noise.labels_path)
           or (config.data.name in SOURCES and config.data.source == "tfds"),
           "config.noise.kind='human' needs the annotators' labels: set "
           "--config.noise.labels_path to CIFAR-10_human.pt / CIFAR-100_human.pt (or an .npz/.npy "
           "export), or use --config.data.source=tfds (tfds's cifar10_n / cifar100_n).")
  _require(0.0 <= config.noise.rate <= 1.0,
           f"config.noise.rate={config.noise.rate}: a noise rate lies in [0, 1].")
  _require(_is_int(config.num_runs) and config.num_runs >= 1,
           f"config.num_runs={config.num_runs!r} must be at least 1.")
  _require(config.mln.meta_gradient in ("autodiff", "jvp"),
           f"config.mln.meta_gradient={config.mln.meta_gradient!r}: choose 'autodiff' or 'jvp'.")
  _require(config.epoch_loop in ("auto", "scan", "host"),
           f"config.epoch_loop={config.epoch_loop!r}: choose 'auto', 'scan' or 'host'.")
  _require(config.matmul_precision in ("default", "high", "highest"),
           f"config.matmul_precision={config.matmul_precision!r}: choose 'default', 'high' or "
           "'highest'.")
  _require(config.model.name != "conv_bn" or len(config.model.blocks) > 0,
           "config.model.blocks is empty: model 'conv_bn' needs its widths per block, e.g. "
           "--config.model.blocks='((32,), (64,))'.")
  _require(config.model.name != "mlp" or len(config.model.hidden) > 0,
           "config.model.hidden is empty: model 'mlp' needs its hidden widths, e.g. "
           "--config.model.hidden='(64, 32)'.")
  _require(config.compute_dtype in ("float32", "bfloat16"),
           f"config.compute_dtype={config.compute_dtype!r}: choose 'float32' or 'bfloat16'.")
  _require(config.label_issues.gallery_size >= 0,
           f"config.label_issues.gallery_size={config.label_issues.gallery_size} must be 0 (no "
           "gallery) or positive.")
  datasets = IN_MEMORY_DATASETS + STREAMED_DATASETS
  _require(config.data.name in datasets,
           f"config.data.name={config.data.name!r}: choose one of {datasets}.")
  _require(not config.model.pretrained or config.model.name in ("resnet50", "resnet"),
           f"config.model.pretrained is set, but loads torchvision ResNet weights only (model "
           f"{config.model.name!r}); use --config.model.name=resnet50 or leave it empty.")
  _require(not (config.label_issues.cross_fit and config.num_runs > 1
                and config.data.num_unlabelled),
           "config.label_issues.cross_fit with config.data.num_unlabelled: the seeds drop "
           "different labels, so their halves cannot train together; use --config.num_runs=1.")
  _require(not config.label_issues.cross_fit or config.data.name in IN_MEMORY_DATASETS,
           f"config.label_issues.cross_fit trains on halves of a dataset held in memory "
           f"({IN_MEMORY_DATASETS}); {config.data.name!r} streams from disk.")
  if config.data.name in STREAMED_DATASETS:
    _validate_streamed(config)


def _validate_streamed(config: ml_collections.ConfigDict) -> None:
  name = config.data.name
  _require(config.noise.kind == "none",
           f"config.noise.kind={config.noise.kind!r}: {name} trains on its own (really noisy) "
           "labels; set --config.noise.kind=none (synthetic noise is for cifar10 and digits).")
  _require(config.num_runs == 1, f"config.num_runs={config.num_runs}: runs on {name} stream from "
           "disk one at a time; start one job per seed.")
  _require(config.augment.pad == 0 and not config.augment.vflip,
           f"config.augment.pad={config.augment.pad}, vflip={config.augment.vflip}: {name} is "
           "augmented by centre crops and horizontal flips only (augment.hflip); set "
           "--config.augment.pad=0 --config.augment.vflip=False.")
  _require(0 < config.data.image_size <= config.data.resize_size,
           f"config.data.image_size={config.data.image_size}, resize_size="
           f"{config.data.resize_size}: {name} needs 0 < image_size <= resize_size (the paper: "
           "224 and 256 for Clothing1M, 299 and 320 for WebVision).")
  _require(config.data.resize_mode in ("square", "shorter_side"),
           f"config.data.resize_mode={config.data.resize_mode!r}: choose 'square' or "
           "'shorter_side'.")
  _require(name != "webvision" or config.data.num_classes > 0,
           "config.data.num_classes must be positive for webvision (the paper: 50).")
  _require(config.checkpoint_every_steps >= 0
           and config.checkpoint_every_steps % config.log_every_steps == 0,
           f"config.checkpoint_every_steps={config.checkpoint_every_steps} must be 0 or a multiple "
           f"of config.log_every_steps={config.log_every_steps}.")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """A nested config dict (e.g. a saved config.json) as {'group.key': value}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def learning_rate_at(config: ml_collections.ConfigDict, epoch: int) -> float:
  """The classifier's learning rate in 0-based `epoch` (piecewise constant, SPEC's schedule)."""
  passed = sum(epoch >= boundary for boundary in config.optim.lr_boundaries)
  return config.optim.learning_rate * config.optim.lr_decay**passed
