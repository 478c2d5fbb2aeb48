"""ResNet-50: torchvision's size and shapes, torchvision weights loaded and checked against PyTorch
(inference and training mode), strict loading errors, and `meta_step` on a ResNet."""

import copy
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mln_jax import pretrained, steps
from mln_jax.resnet import ResNet, ResNet50
from mln_jax.train_state import create_train_state, freeze_extractor

TINY = {"stage_sizes": (1, 1), "num_filters": 8}  # 2 blocks, 64-d features
RESNET50 = ResNet50(num_classes=1000)
# Module-level, so that tests sharing an input shape share the compilation.
_resnet50_eval = jax.jit(functools.partial(RESNET50.apply, train=False))
_resnet50_train = jax.jit(functools.partial(RESNET50.apply, train=True, mutable=["batch_stats"]))


def _init(model, size=64, seed=0):
  return model.init(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3)), train=False)


def _torch_resnet(torch, num_classes, stage_sizes=(3, 4, 6, 3), num_filters=64):
  """A reference written against torchvision's resnet50: same modules, names and state-dict keys."""
  nn = torch.nn

  class Bottleneck(nn.Module):

    def __init__(self, in_channels, width, stride):
      super().__init__()
      out = 4 * width
      self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(width)
      self.conv3 = nn.Conv2d(width, out, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(out)
      self.downsample = None
      if stride != 1 or in_channels != out:
        self.downsample = nn.Sequential(nn.Conv2d(in_channels, out, 1, stride, bias=False),
                                        nn.BatchNorm2d(out))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = torch.relu(self.bn2(self.conv2(y)))
      y = self.bn3(self.conv3(y))
      return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

  class ResNetTorch(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(3, num_filters, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(num_filters)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      channels = num_filters
      for i, num_blocks in enumerate(stage_sizes):
        blocks = []
        for j in range(num_blocks):
          blocks.append(Bottleneck(channels, num_filters * 2**i, 2 if i > 0 and j == 0 else 1))
          channels = 4 * num_filters * 2**i
        setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
      self.num_stages = len(stage_sizes)
      self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
      x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
      for i in range(self.num_stages):
        x = getattr(self, f"layer{i + 1}")(x)
      features = x.mean((2, 3))
      return self.fc(features), features

  model = ResNetTorch()
  # Every weight and BatchNorm statistic random (non-trivial running statistics make inference mode
  # a real test); the scales keep activations O(1)-O(100) through all blocks.
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.Conv2d):
        fan_out = module.weight[:, 0].numel()
        module.weight.normal_(0.0, (2.0 / fan_out)**0.5, generator=generator)
      elif isinstance(module, nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5, generator=generator)
        module.bias.normal_(0.0, 0.2, generator=generator)
        module.running_mean.normal_(0.0, 0.2, generator=generator)
        module.running_var.uniform_(0.5, 2.0, generator=generator)
      elif isinstance(module, nn.Linear):
        module.weight.normal_(0.0, module.in_features**-0.5, generator=generator)
        module.bias.normal_(0.0, 0.1, generator=generator)
  return model


def _numpy_state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _torch_name(flax_path):
  """('batch_stats', 'layer1_0', 'downsample_1', 'var') -> 'layer1.0.downsample.1.running_var'."""
  _, *modules, leaf = flax_path
  leaf = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}.get(
      leaf, leaf)
  return ".".join([module.replace("_", ".") for module in modules] + [leaf])


def _nchw(torch, images):
  return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


def _images(size, batch=2, seed=1):
  return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (batch, size, size, 3)))


def _assert_close_to_scale(actual, expected, rel):
  """|actual − expected| <= rel · max|expected| elementwise: rounding relative to the output's scale
  (a plain rtol fails on entries that are near zero only by cancellation)."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * np.abs(expected).max())


def test_resnet50_size_and_shapes():
  # Abstract evaluation: the check needs shapes only, and a full initialisation costs ~10 s on CPU.
  variables = jax.eval_shape(lambda: _init(RESNET50))
  # torchvision's resnet50 has 25,557,032 parameters (BatchNorm running statistics not counted).
  assert sum(p.size for p in jax.tree.leaves(variables["params"])) == 25_557_032
  assert sum(s.size for s in jax.tree.leaves(variables["batch_stats"])) == 2 * 26_560
  for size in (224, 64):
    logits, features = jax.eval_shape(
        lambda v: RESNET50.apply(v, jnp.ones((2, size, size, 3)), train=False), variables)
    assert logits.shape == (2, 1000) and features.shape == (2, 2048)
    assert logits.dtype == features.dtype == jnp.float32
  # bfloat16 compute: float32 parameters and statistics, float32 outputs.
  model = ResNet50(num_classes=1000, dtype=jnp.bfloat16)
  variables = jax.eval_shape(lambda: _init(model))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  outputs = jax.eval_shape(lambda v: model.apply(v, jnp.ones((2, 64, 64, 3)), train=False),
                           variables)
  assert [x.dtype for x in outputs] == [jnp.float32, jnp.float32]


def test_initialisation_is_torchvisions():
  """Kaiming-normal (fan_out, ReLU gain) convs, PyTorch's default Linear, BatchNorm 1/0 and 0/1."""
  variables = _init(ResNet(num_classes=10, **TINY), 32)
  params = variables["params"]
  kernel = params["layer2_0"]["conv2"]["kernel"]  # 3x3, 16 -> 16
  assert float(jnp.std(kernel)) == pytest.approx(np.sqrt(2.0 / (9 * 16)), rel=0.05)
  assert float(jnp.abs(params["fc"]["kernel"]).max()) <= 64**-0.5
  assert "bias" not in params["conv1"]
  np.testing.assert_array_equal(params["layer1_0"]["bn3"]["scale"], np.ones(32))
  np.testing.assert_array_equal(params["layer1_0"]["bn3"]["bias"], np.zeros(32))
  np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["var"], np.ones(8))


@pytest.fixture(scope="module")
def torch_resnet50():
  """(torch, a random PyTorch ResNet-50, a template of the Flax ResNet-50's variables)."""
  torch = pytest.importorskip("torch")
  # The checkpoint replaces every leaf, so zeros of the right structure stand in for a random
  # initialisation of 25M parameters (~10 s on CPU).
  template = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                          jax.eval_shape(lambda: _init(RESNET50)))
  return torch, _torch_resnet(torch, num_classes=1000), template


@pytest.mark.parametrize("file_format", ["npz", "pth"])
def test_torchvision_weights_reproduce_pytorch_outputs(torch_resnet50, tmp_path, file_format):
  torch, torch_model, initial = torch_resnet50
  assert len(torch_model.state_dict()) == 320  # As torchvision's resnet50 (53 num_batches_tracked).
  path = tmp_path / f"resnet50.{file_format}"
  if file_format == "npz":
    np.savez(path, **_numpy_state_dict(torch_model))
  else:
    torch.save(torch_model.state_dict(), path)

  variables, skipped = pretrained.load_pretrained_resnet(path, initial)
  assert skipped == ()
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))

  images = _images(96)
  torch_model.eval()
  with torch.no_grad():
    torch_logits, torch_features = torch_model(_nchw(torch, images))
  logits, features = _resnet50_eval(variables, images)
  # float32 through 53 layers: the observed errors are <= 1e-6 of the output's scale; 1e-4 leaves
  # room for other conv kernels and summation orders, while a wrong layout, padding or statistic is
  # off by orders of magnitude more.
  _assert_close_to_scale(logits, torch_logits, 1e-4)
  _assert_close_to_scale(features, torch_features, 1e-4)
  assert float(jnp.abs(logits).max()) > 1.0  # Not a vacuous comparison of near-zero outputs.


def test_training_mode_matches_pytorch_outputs_and_running_statistics(torch_resnet50):
  """One training-mode forward (batch statistics) and the running statistics it leaves, in float64.

  Normalising with the statistics of few samples (16 per channel in layer4 here) amplifies float32
  rounding to ~6e-5 of the output's scale, too close to any float32 tolerance that still means much;
  in float64 the outputs agree to ~2e-13, so even a small difference in semantics would show.
  """
  torch, torch_model, initial = torch_resnet50
  variables, _ = pretrained.resnet_variables_from_torch(_numpy_state_dict(torch_model), initial)
  with jax.enable_x64(True):
    images = _images(64, batch=4, seed=2).astype(np.float64)
    train_model = copy.deepcopy(torch_model).double().train()
    with torch.no_grad():
      torch_logits, torch_features = train_model(_nchw(torch, images))
    (logits, features), mutated = _resnet50_train(variables, images)
    assert logits.dtype == jnp.float64
    _assert_close_to_scale(logits, torch_logits, 1e-9)
    _assert_close_to_scale(features, torch_features, 1e-9)

    # Momentum 0.1 and the unbiased variance, in all 53 BatchNorms. models.BatchNorm decays the
    # loaded float32 statistic in float32 (0.9·old), which costs ~1e-7 of the scale.
    torch_state = _numpy_state_dict(train_model)
    updated = jax.tree_util.tree_flatten_with_path(mutated["batch_stats"])[0]
    assert len(updated) == 2 * 53
    for (path, stat), old in zip(updated, jax.tree.leaves(variables["batch_stats"])):
      expected = torch_state[_torch_name(("batch_stats", *(k.key for k in path)))]
      assert not np.allclose(expected, old), path  # The step moved the statistic.
      _assert_close_to_scale(stat, expected, 1e-6)


def test_imagenet_head_is_replaced_for_another_class_count(tmp_path):
  torch = pytest.importorskip("torch")
  torch_model = _torch_resnet(torch, num_classes=1000, **TINY).eval()
  path = tmp_path / "tiny.pth"
  # DataParallel-style keys load too.
  torch.save({f"module.{k}": v for k, v in torch_model.state_dict().items()}, path)
  model = ResNet(num_classes=14, **TINY)
  initial = _init(model, 32)
  variables, skipped = pretrained.load_pretrained_resnet(path, initial)
  assert skipped == ("fc.bias", "fc.weight")
  assert jax.tree.structure(variables) == jax.tree.structure(initial)
  jax.tree.map(np.testing.assert_array_equal, variables["params"]["fc"], initial["params"]["fc"])
  images = _images(32)
  with torch.no_grad():
    _, torch_features = torch_model(_nchw(torch, images))
  logits, features = model.apply(variables, images, train=False)
  assert logits.shape == (2, 14)
  _assert_close_to_scale(features, torch_features, 1e-4)


def _tiny_state_dict():
  """The tiny Flax model's own variables as a torchvision-style state dict (no torch needed)."""
  variables = _init(ResNet(num_classes=10, **TINY), 32)
  to_torch_layout = {4: (3, 2, 0, 1), 2: (1, 0), 1: (0,)}  # HWIO -> OIHW, (in, out) -> (out, in)
  state_dict = {
      _torch_name(tuple(k.key for k in path)): np.transpose(leaf, to_torch_layout[leaf.ndim])
      for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}
  return variables, state_dict


def test_state_dict_round_trip_and_strict_errors(tmp_path):
  variables, state_dict = _tiny_state_dict()
  state_dict["layer1.0.bn1.num_batches_tracked"] = np.array(3)  # ignored
  loaded, skipped = pretrained.resnet_variables_from_torch(state_dict, variables)
  assert skipped == ()
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)

  missing = {k: v for k, v in state_dict.items() if k != "layer2.0.bn1.running_var"}
  with pytest.raises(ValueError,
                     match=r"missing from the checkpoint: layer2\.0\.bn1\.running_var \(16,\)"):
    pretrained.resnet_variables_from_torch(missing, variables)

  unexpected = {**state_dict, "layer3.0.conv1.weight": np.zeros((8, 8, 1, 1), np.float32)}
  with pytest.raises(ValueError,
                     match=r"not in the model: layer3\.0\.conv1\.weight \(8, 8, 1, 1\)"):
    pretrained.resnet_variables_from_torch(unexpected, variables)

  wrong = {**state_dict, "conv1.weight": np.zeros((8, 3, 5, 5), np.float32)}
  with pytest.raises(ValueError, match=r"shape mismatches: conv1\.weight \(8, 3, 5, 5\) "
                                       r"\(model: \(8, 3, 7, 7\)\)"):
    pretrained.resnet_variables_from_torch(wrong, variables)

  # A head with another input width is a wrong checkpoint, not a new task.
  wrong_head = {**state_dict, "fc.weight": np.zeros((1000, 32), np.float32),
                "fc.bias": np.zeros((1000,), np.float32)}
  with pytest.raises(ValueError, match=r"fc\.weight \(1000, 32\) \(model: \(10, 64\)\)"):
    pretrained.resnet_variables_from_torch(wrong_head, variables)

  with pytest.raises(FileNotFoundError, match="nowhere.pth"):
    pretrained.load_state_dict(tmp_path / "nowhere.pth")


def test_npz_needs_no_torch_and_pth_without_torch_says_how_to_proceed(tmp_path, monkeypatch):
  variables, state_dict = _tiny_state_dict()
  np.savez(tmp_path / "w.npz", **{f"module.{k}": v for k, v in state_dict.items()})
  (tmp_path / "w.pth").write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError.
  loaded, _ = pretrained.load_pretrained_resnet(tmp_path / "w.npz", variables)
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  with pytest.raises(ImportError, match=r"needs torch .*\.npz"):
    pretrained.load_state_dict(tmp_path / "w.pth")


def test_warmup_and_meta_step_train_a_resnet():
  model = ResNet(num_classes=5, **TINY)
  state = create_train_state(jax.random.PRNGKey(0), model, (32, 32, 3), 5)
  key_x, key_y, key_m = jax.random.split(jax.random.PRNGKey(1), 3)
  batch = {"image": jax.random.normal(key_x, (8, 32, 32, 3)),
           "label": jax.random.randint(key_y, (8,), 0, 5)}
  meta_batch = {"image": jax.random.normal(key_m, (8, 32, 32, 3)), "label": batch["label"][::-1]}

  state, metrics = jax.jit(steps.warmup_step)(state, batch)
  assert np.isfinite(metrics["loss"])
  state = freeze_extractor(state)
  new_state, metrics = jax.jit(steps.meta_step)(state, batch, meta_batch)
  for name, value in metrics.items():
    assert np.isfinite(value), name
  changed = lambda a, b: any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a),
                                                                   jax.tree.leaves(b)))
  assert changed(new_state.mln_params, state.mln_params)
  assert changed(new_state.params, state.params)
  assert changed(new_state.batch_stats, state.batch_stats)
