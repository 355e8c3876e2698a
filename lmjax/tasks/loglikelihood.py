"""Log-likelihoods of continuations, batched: the scoring core of the lm-eval backend (harness.py).

A request is (context ids, continuation ids). Its score is sum_i log p(continuation_i | context,
continuation_<i) and whether greedy decoding would have produced the whole continuation (lm-eval's
`(logprob, is_greedy)`). The model reads context + continuation minus its last token (the request's
input), cut from the left to the model's max_len (lm-eval's reference backends keep the last
max_len + 1 tokens the same way), and the last len(continuation) positions are scored.

Requests share rows: a request whose input is a prefix of another's (the choices of a multiple-choice
question with a one-token answer all have the same input, the context) is read from that one's row,
since causal attention gives a prefix the same logits inside a longer row. (lm-eval's `hf` backend
shares a row only between equal inputs with a one-token continuation.) Only the scored positions go
through the output head and log-softmax, not all [B, T, V] logits.

Rows are packed into sequences of one length L, best-fit decreasing, each row a segment with its
own positions from 0 (`segment_ids`, as packed training rows), so short rows fill the space longer
ones leave instead of padding. L is the longest row's length rounded up to a multiple of 8 (at most
max_len), or up to twice that where fewer FLOPs result (`packing`); a forward holds at most as many
tokens as `batch_size` unpacked rows of the longest request would. The last forward's sequence count
is padded to a power of two and each sequence's scored positions to a bucket (`bucket`: a multiple
of an eighth of the next power of two), so a call compiles a few shapes. The [B, N, V] logits of the
scored positions are the largest buffer; N is largest where many short requests share a sequence.
Packing changes no score: a segment sees only itself, and its positions start at 0 as a row's would.
"""

from __future__ import annotations

import bisect
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import model


@functools.partial(jax.jit, static_argnums=0)
def _target_logprobs(cfg: model.ModelConfig, params, inputs_BT, positions_BT, segments_BT, at_BN, targets_BN):
  """(log p(target) [B, N] fp32, target == argmax [B, N]) at indices at_BN of packed sequences."""
  logits_BNV = model.Transformer(cfg).apply(
    {"params": params}, inputs_BT, positions_BT=positions_BT, segment_ids_BT=segments_BT, logits_at_BN=at_BN
  )
  logits_BNV = logits_BNV.astype(jnp.float32)
  chosen_BN = jnp.take_along_axis(logits_BNV, targets_BN[..., None], axis=-1)[..., 0]
  logp_BN = chosen_BN - jax.nn.logsumexp(logits_BNV, axis=-1)  # no second [B, N, V] buffer
  return logp_BN, jnp.argmax(logits_BNV, axis=-1) == targets_BN


def bucket(n: int) -> int:
  """n rounded up to a multiple of max(1, 2^(k-3)) where 2^(k-1) < n <= 2^k: exact up to 8."""
  step = 1 << max(0, (max(n, 1) - 1).bit_length() - 3)
  return -(-n // step) * step


def score(cfg: model.ModelConfig, params, requests: list, batch_size: int = 16) -> list:
  """[(log-likelihood in nats, is_greedy)] for `requests` [(context ids, continuation ids)], in the
  requests' order; a forward pass holds at most `batch_size` times the longest request's tokens
  (module docstring).

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
  if not requests:
    return []
  windows = [(list(c) + list(x))[-(cfg.max_len + 1) :] for c, x in requests]
  owner = shared_rows([tuple(w[:-1]) for w in windows])
  scored = {}  # row (a request index) -> [(request, position, target)]
  for i, window in enumerate(windows):
    end, n = len(window) - 1, len(requests[i][1])
    scored.setdefault(owner[i], []).extend((i, p, window[p + 1]) for p in range(end - n, end))
  weights = sum(x.size for x in jax.tree.leaves(params))
  length, sequences, per_forward = packing(cfg, weights, {r: len(windows[r]) - 1 for r in scored}, batch_size)
  logp = np.zeros(len(requests), np.float64)
  greedy = np.ones(len(requests), bool)
  for start in range(0, len(sequences), per_forward):
    batch = sequences[start : start + per_forward]
    rows_B = _padded_rows(len(batch), per_forward)
    inputs_BT, positions_BT, segments_BT = (np.zeros((rows_B, length), np.int32) for _ in range(3))
    positions_BT[:] = np.arange(length)  # the padding after the last segment: segment 0
    entries = [[] for _ in batch]  # per sequence: (request, index in the sequence, target)
    for b, sequence in enumerate(batch):
      offset = 0
      for segment, r in enumerate(sequence, start=1):
        n = len(windows[r]) - 1
        inputs_BT[b, offset : offset + n] = windows[r][:-1]
        positions_BT[b, offset : offset + n] = np.arange(n)
        segments_BT[b, offset : offset + n] = segment
        entries[b] += [(i, offset + p, t) for i, p, t in scored[r]]
        offset += n
    width = bucket(max(map(len, entries)))
    at_BN, targets_BN = np.zeros((rows_B, width), np.int32), np.zeros((rows_B, width), np.int32)
    for b, sequence_entries in enumerate(entries):
      _, at_BN[b, : len(sequence_entries)], targets_BN[b, : len(sequence_entries)] = zip(*sequence_entries)
    logp_BN, greedy_BN = jax.device_get(
      _target_logprobs(cfg, params, inputs_BT, positions_BT, segments_BT, at_BN, targets_BN)
    )
    for b, sequence_entries in enumerate(entries):
      owners = np.asarray([i for i, _, _ in sequence_entries])
      np.add.at(logp, owners, logp_BN[b, : len(owners)].astype(np.float64))
      np.logical_and.at(greedy, owners, greedy_BN[b, : len(owners)])
  return [(float(lp), bool(g)) for lp, g in zip(logp, greedy)]


def packing(cfg: model.ModelConfig, weights: int, lengths: dict, batch_size: int) -> tuple:
  """(L, pack(lengths, L), sequences per forward) with the fewest forward FLOPs (2 per weight and
  token, plus attention's 4 * n_layers * L * n_heads * dim_per_head; padding rows counted) among
  L = the longest row rounded up to a multiple of 8 (`fit`, at most max_len) and up to twice that,
  in eighths. A forward holds batch_size * fit // L sequences: never more tokens than batch_size
  unpacked rows of the longest request."""
  fit = min(-(-max(lengths.values()) // 8) * 8, cfg.max_len)
  best = None
  for length in sorted({min(-(-fit * (8 + k) // 64) * 8, cfg.max_len) for k in range(9)}):
    sequences, per_forward = pack(lengths, length), max(1, batch_size * fit // length)
    full, last = divmod(len(sequences), per_forward)
    rows = full * per_forward + (_padded_rows(last, per_forward) if last else 0)
    flops = rows * length * (2 * weights + 4 * cfg.n_layers * length * cfg.n_heads * cfg.dim_per_head)
    if best is None or flops < best[0]:
      best = (flops, length, sequences, per_forward)
  return best[1:]


def _padded_rows(count: int, per_forward: int) -> int:
  """The sequence count a forward of `count` runs with: a partial (last) forward's, padded to a power
  of two, so its shape repeats across calls."""
  return per_forward if count == per_forward else min(1 << (count - 1).bit_length(), per_forward)


def pack(lengths: dict, capacity: int) -> list:
  """Best-fit decreasing: {row: length} -> sequences [[row, ...]] whose lengths sum to at most
  `capacity`, longest rows first; each row goes where it leaves the least space (a new sequence
  when none has room). Raises ValueError for a row longer than `capacity`."""
  sequences, room = [], []  # room: sorted (free space, sequence index)
  for row in sorted(lengths, key=lambda r: (-lengths[r], r)):
    if lengths[row] > capacity:
      raise ValueError(f"a row of {lengths[row]} tokens does not fit a sequence of {capacity}")
    k = bisect.bisect_left(room, (lengths[row], -1))
    if k == len(room):
      free, index = capacity, len(sequences)
      sequences.append([])
    else:
      free, index = room.pop(k)
    sequences[index].append(row)
    if free > lengths[row]:
      bisect.insort(room, (free - lengths[row], index))
  return sequences


def shared_rows(inputs: list) -> list:
  """For each input (a tuple of ids), the index of the input whose row it is read from: one it is a
  prefix of (itself when there is none). Sorted lexicographically, the inputs that extend an input
  come right after it, so one pass from the end finds each input's row."""
  order = sorted(range(len(inputs)), key=inputs.__getitem__)
  owner = list(range(len(inputs)))
  for k in range(len(order) - 2, -1, -1):
    this, after = inputs[order[k]], inputs[order[k + 1]]
    if after[: len(this)] == this:
      owner[order[k]] = owner[order[k + 1]]
  return owner
