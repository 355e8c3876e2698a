"""Sampling text from a trained model.

`sample_tokens` is nanoGPT-style: every new token is predicted from the last
`max_len` tokens (the context is cropped, so samples can be longer than the
training context even with learned positions), with temperature sampling. The
window is a fixed-shape buffer, left-padded (position -1) until it fills, so
the whole loop is one `lax.scan` compiled once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import model


@functools.partial(jax.jit, static_argnames=("cfg", "num_new", "temperature"))
def _sample_window(cfg: model.ModelConfig, params, window_BW, filled, rng, num_new: int, temperature: float):
  B, W = window_BW.shape
  transformer = model.Transformer(cfg)

  def step(carry, rng_t):
    window, filled = carry
    positions = jnp.broadcast_to(jnp.arange(W) - (W - filled), (B, W))
    positions = jnp.where(positions < 0, -1, positions)
    logits_BV = transformer.apply({"params": params}, window, positions_BT=positions)[:, -1]
    if temperature > 0:
      token_B = jax.random.categorical(rng_t, logits_BV / temperature)
    else:
      token_B = jnp.argmax(logits_BV, -1)
    window = jnp.concatenate([window[:, 1:], token_B[:, None].astype(window.dtype)], axis=1)
    return (window, jnp.minimum(filled + 1, W)), token_B

  _, tokens_NB = jax.lax.scan(step, (window_BW, filled), jax.random.split(rng, num_new))
  return tokens_NB.T


def sample_tokens(cfg: model.ModelConfig, params, prompt_ids, num_samples: int, num_new: int,
                  temperature: float = 0.8, seed: int = 0) -> np.ndarray:
  """[num_samples, num_new] token ids continuing `prompt_ids`."""
  if not len(prompt_ids):
    raise ValueError("the prompt is empty: give at least one token to start from")
  W = cfg.max_len
  prompt = list(prompt_ids)[-W:]
  window = np.zeros((num_samples, W), np.int32)
  window[:, W - len(prompt):] = prompt
  out = _sample_window(cfg, params, jnp.asarray(window), jnp.int32(len(prompt)), jax.random.key(seed),
                       num_new, float(temperature))
  return np.asarray(out)
