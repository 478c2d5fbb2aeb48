"""On-device augmentation: determinism per key, exact crop/flip geometry, normalisation."""

import jax
import jax.numpy as jnp
import numpy as np

from mln_jax import augment


def images(batch=16, size=6):
  pixels = jnp.arange(batch * size * size * 3, dtype=jnp.int32).reshape(batch, size, size, 3)
  return pixels % 251 + 1


def test_same_key_same_batch_and_different_keys_differ():
  x = images()
  aug = lambda k: augment.random_crop_flip(jax.random.PRNGKey(k), x, pad=2, hflip=True, vflip=True)
  np.testing.assert_array_equal(aug(0), aug(0))
  assert not np.array_equal(aug(0), aug(1))


def test_every_output_is_a_shifted_and_flipped_window_of_the_zero_padded_input():
  x = np.asarray(images())
  out = np.asarray(augment.random_crop_flip(jax.random.PRNGKey(3), jnp.asarray(x), pad=2,
                                            hflip=True, vflip=True))
  size = x.shape[1]
  seen_flips = set()
  for original, augmented in zip(x, out):
    padded = np.pad(original, ((2, 2), (2, 2), (0, 0)))
    matches = [(dy, dx, h, v)
               for dy in range(5) for dx in range(5) for h in (0, 1) for v in (0, 1)
               if np.array_equal(_flip(padded[dy:dy + size, dx:dx + size], h, v), augmented)]
    assert matches, "output is not a crop of the padded image"
    seen_flips.add(matches[0][2:])
  assert len(seen_flips) > 1  # flips actually happen, independently per image


def _flip(window, h, v):
  window = window[:, ::-1] if h else window
  return window[::-1] if v else window


def test_no_augmentation_is_the_identity():
  x = images()
  out = augment.random_crop_flip(jax.random.PRNGKey(0), x, pad=0, hflip=False, vflip=False)
  np.testing.assert_array_equal(out, x)


def test_normalise_maps_uint8_to_minus_one_one():
  x = jnp.array([0, 51, 255], jnp.uint8)
  np.testing.assert_allclose(augment.normalise(x), [-1.0, 51 / 127.5 - 1.0, 1.0], rtol=1e-6)
  assert augment.normalise(x).dtype == jnp.float32
