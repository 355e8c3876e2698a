"""Per-row token choice for continuous batching (inference/engine.py): each row of a decode batch drawn
with its own key, temperature, top-k and top-p, and the log-probabilities OpenAI's API reports."""

import jax
import jax.numpy as jnp

from lmjax.inference import sampler
from lmjax.ops.reductions import first_argmax

# The most alternatives a request may ask for at each token (OpenAI's chat API allows 20).
MAX_TOP_LOGPROBS = 20


def token_keys(seeds_R, counts_R) -> jax.Array:
  """Each row's key for its next token: fold_in(key(seed), tokens it has so far), so a seeded request
  samples the same text whatever else is in the batch. seeds uint32 [R], counts int32 [R]."""
  return jax.vmap(lambda seed, count: jax.random.fold_in(jax.random.key(seed), count))(seeds_R, counts_R)


def sample_rows(logits_BV, keys_B, temperature_B, top_k_B, top_p_B) -> jax.Array:
  """Per-row sampling: greedy where temperature is 0, else softmax(logits / temperature) restricted to
  the top_k (0: all) most likely tokens and the smallest set whose mass reaches top_p (the rules of
  sampler.process_logits, with one setting per row). int32 [B]."""
  V = logits_BV.shape[-1]
  scaled_BV = logits_BV / jnp.maximum(temperature_B, 1e-6)[:, None]

  def filtered(x_BV):
    sorted_BV = jnp.sort(x_BV, axis=-1)[:, ::-1]
    kth_B1 = jnp.take_along_axis(sorted_BV, jnp.clip(top_k_B - 1, 0, V - 1)[:, None], axis=-1)
    x_BV = jnp.where((top_k_B[:, None] > 0) & (x_BV < kth_B1), -jnp.inf, x_BV)
    threshold_B1 = sampler.top_p_threshold(jnp.sort(x_BV, axis=-1)[:, ::-1], top_p_B[:, None])
    return jnp.where(x_BV < threshold_B1, -jnp.inf, x_BV)

  def sampled(x_BV):  # jax.random.categorical's Gumbel-max draw
    x_BV = jax.lax.cond(jnp.any((top_k_B > 0) | (top_p_B < 1.0)), filtered, lambda x: x, x_BV)
    return first_argmax(x_BV + jax.vmap(lambda key: jax.random.gumbel(key, (V,)))(keys_B))

  greedy_B = first_argmax(logits_BV)
  sampled_B = jax.lax.cond(jnp.any(temperature_B > 0), sampled, lambda x: greedy_B, scaled_BV)
  return jnp.where(temperature_B == 0, greedy_B, sampled_B)


def token_logprobs(logits_BV, tokens_B, wanted) -> tuple:
  """(log p of each row's token [B], the MAX_TOP_LOGPROBS largest log p [B, K] in descending order, their
  token ids [B, K]) under softmax(logits): the model's distribution before temperature, top-k and top-p
  (as OpenAI's and vLLM's logprobs report it). Computed only where the traced bool `wanted` holds, zeros
  otherwise, so a batch where no request asked pays one branch and no extra compile."""
  B, V = logits_BV.shape
  K = min(MAX_TOP_LOGPROBS, V)

  def compute(x_BV):
    logp_BV = jax.nn.log_softmax(x_BV.astype(jnp.float32), axis=-1)
    top_BK, ids_BK = jax.lax.top_k(logp_BV, K)
    return jnp.take_along_axis(logp_BV, tokens_B[:, None], axis=-1)[:, 0], top_BK, ids_BK.astype(jnp.int32)

  def skip(x_BV):
    return jnp.zeros((B,), jnp.float32), jnp.zeros((B, K), jnp.float32), jnp.zeros((B, K), jnp.int32)

  return jax.lax.cond(wanted, compute, skip, logits_BV)
