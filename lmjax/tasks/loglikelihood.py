"""Log-likelihoods of continuations, batched: the scoring core of the lm-eval backend (harness.py).

A request is (context ids, continuation ids). Its score is sum_i log p(continuation_i | context,
continuation_<i) and whether greedy decoding would have produced the whole continuation (lm-eval's
`(logprob, is_greedy)`). The model reads context + continuation minus its last token, cut from the
left to the model's max_len (lm-eval's reference backends keep the last max_len + 1 tokens the same
way), and the last len(continuation) positions are scored.

Requests are sorted by length, longest first (so a too-large batch fails on the first one), cut
into batches of `batch_size`, and each batch right-padded to a bucket length (`bucket`: a multiple
of an eighth of the next power of two, so at most ~1/8 padding, at most max_len) and its rows to a
power of two, so a whole task compiles a handful of shapes. Right padding changes no score:
attention is causal and positions start at 0 for every row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import model


@functools.partial(jax.jit, static_argnums=0)
def _target_logprobs(cfg: model.ModelConfig, params, inputs_BT, targets_BT):
  """(log p(target) [B, T] fp32, target == argmax [B, T]) of a right-padded batch."""
  logits_BTV = model.Transformer(cfg).apply({"params": params}, inputs_BT).astype(jnp.float32)
  chosen_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  logp_BT = chosen_BT - jax.nn.logsumexp(logits_BTV, axis=-1)  # no second [B, T, V] buffer
  return logp_BT, jnp.argmax(logits_BTV, axis=-1) == targets_BT


def bucket(n: int, limit: int) -> int:
  """n rounded up to a multiple of max(16, 2^(k-3)) where 2^(k-1) < n <= 2^k, capped at `limit`."""
  step = max(16, 1 << max(0, (max(n, 1) - 1).bit_length() - 3))
  return min(-(-n // step) * step, limit)


def score(cfg: model.ModelConfig, params, requests: list, batch_size: int = 16) -> list:
  """[(log-likelihood in nats, is_greedy)] for `requests` [(context ids, continuation ids)], in the
  requests' order (module docstring).

  Raises ValueError for an empty continuation, an empty context (lm-eval puts a prefix token there)
  or a continuation longer than cfg.max_len (it cannot be scored in one window).
  """
  for i, (context, continuation) in enumerate(requests):
    if not context or not continuation:
      raise ValueError(f"request {i}: context and continuation must each hold at least one token")
    if len(continuation) > cfg.max_len:
      raise ValueError(
        f"request {i}: its continuation has {len(continuation)} tokens, more than the model's context "
        f"of {cfg.max_len}; score it with loglikelihood_rolling"
      )
  windows = [(list(c) + list(x))[-(cfg.max_len + 1) :] for c, x in requests]
  order = sorted(range(len(requests)), key=lambda i: -len(windows[i]))
  results = [None] * len(requests)
  for start in range(0, len(order), batch_size):
    batch = order[start : start + batch_size]
    length = bucket(max(len(windows[i]) - 1 for i in batch), cfg.max_len)
    rows = 1 << (len(batch) - 1).bit_length()
    inputs_BT = np.zeros((rows, length), np.int32)
    targets_BT = np.zeros((rows, length), np.int32)
    for row, i in enumerate(batch):
      window = windows[i]
      inputs_BT[row, : len(window) - 1] = window[:-1]
      targets_BT[row, : len(window) - 1] = window[1:]
    logp_BT, greedy_BT = jax.device_get(_target_logprobs(cfg, params, inputs_BT, targets_BT))
    for row, i in enumerate(batch):
      end, n = len(windows[i]) - 1, len(requests[i][1])
      results[i] = (
        float(np.sum(logp_BT[row, end - n : end], dtype=np.float64)),
        bool(greedy_BT[row, end - n : end].all()),
      )
  return results
