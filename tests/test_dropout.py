"""The unrolled Threefry dropout against Random123's answers, jax.random and flax.linen.Dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lmjax.ops import dropout


@pytest.mark.parametrize(
  "key, count, expected",
  [
    # Known-answer vectors of Threefry-2x32-20 from the Random123 distribution (kat_vectors).
    ((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
  ],
)
def test_threefry2x32_known_answers(key, count, expected):
  words = jax.jit(dropout.threefry2x32)(*(np.uint32(w) for w in (*key, *count)))
  assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey])
@pytest.mark.parametrize("p, shape", [(0.8, (4, 64, 48)), (0.1, (3, 5, 7)), (0.5, (1,)), (0.999, (33, 65))])
def test_bernoulli_equals_jax_random_bernoulli(make_key, p, shape):
  """Same bits as jax.random.bernoulli, so dropout masks (and runs) do not change with it."""
  key = jax.random.fold_in(make_key(7), 3)
  got = jax.jit(dropout.bernoulli, static_argnums=(1, 2))(key, p, shape)
  np.testing.assert_array_equal(got, jax.random.bernoulli(key, p, shape))


def test_other_prng_implementations_fall_back_to_jax_random():
  key = jax.random.key(5, impl="rbg")
  np.testing.assert_array_equal(dropout.bernoulli(key, 0.7, (6, 10)), jax.random.bernoulli(key, 0.7, (6, 10)))


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_dropout_module_equals_flax_dropout(rate):
  x = jax.random.normal(jax.random.key(1), (4, 9, 8))
  rngs = {"dropout": jax.random.key(4)}
  for deterministic in (False, True):
    got = dropout.Dropout(rate).apply({}, x, deterministic=deterministic, rngs=rngs)
    expected = nn.Dropout(rate).apply({}, x, deterministic=deterministic, rngs=rngs)
    np.testing.assert_array_equal(got, expected)
  kept = dropout.Dropout(0.3, deterministic=False).apply({}, jnp.ones((200, 200)), rngs=rngs)
  assert abs(float((kept > 0).mean()) - 0.7) < 0.01 and float(kept.max()) == pytest.approx(1 / 0.7)
