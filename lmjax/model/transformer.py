"""A decoder-only Transformer in Flax Linen, and its KV cache and initialisation.

Attention masks are computed from token *positions*: a key is visible to a query when
`0 <= key_pos <= query_pos`. Position -1 marks padding. The same rule serves training (positions
0..T-1), left-padded prompts and the KV cache (a decode step reads it through
ops/attention.cached_attention, in the layouts it is stored in).
Shape suffixes: see layers.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from lmjax.core import sharding
from lmjax.model import chunked_loss, mup
from lmjax.model.config import REMAT_POLICIES, ModelConfig
from lmjax.model.layers import (
  ACTIVATION_AXES,
  Block,
  Norm,
  dense,
  embed,
  make_param,
  sinusoidal_encoding,
  write_cache,
)
from lmjax.ops.dropout import Dropout


class Transformer(nn.Module):
  """Token ids -> next-token logits (fp32).

  `apply({'params': p}, tokens_BT)` returns logits_BTV (`return_hidden=True`: the final hidden
  states x_BTD instead). Given
  `cache=init_cache(...)`-shaped state it returns `(logits_BTV, new_cache)`;
  positions default to 0..T-1 (or continue after the cache's filled slots). `segment_ids_BT`
  (packed documents): tokens attend only within their segment, causally in row order, while
  `positions_BT` (restarting at 0 per document) drive the position encodings; with a cache, only an
  empty one of exactly T columns (several prompts' prefill in one row, inference/engine_steps.py). With
  `targets_BT` (and optionally `loss_mask_BT`) it returns the next-token loss instead of logits:
  (sum of cross-entropies over the masked-in tokens, their count), computed in chunks of the
  sequence for large vocabularies so the [B, T, V] logits never exist at once (chunked_loss.py).
  `logits_at_BN` (indices into T): the logits of those positions only, [B, N, V], since the head's
  [B, T, V] output is the largest tensor of a forward (sampling reads the last position, scoring
  log-likelihoods a continuation's).
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self,
    tokens_BT,
    positions_BT=None,
    cache=None,
    deterministic: bool = True,
    return_hidden: bool = False,
    segment_ids_BT=None,
    targets_BT=None,
    loss_mask_BT=None,
    logits_at_BN=None,
  ):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    B, T = tokens_BT.shape
    start = 0 if cache is None else cache["end"]
    # The cache is a ring of S slots: tokens past its end overwrite the oldest slots (a rolling KV
    # cache). Their keys keep their positions, so the mask stays right; a write of T > 1 tokens must
    # not cross the end (prefill writes at slot 0, decode one token at a time). `end` is one count for
    # all rows, or each row's own ([B]: continuous batching).
    slot = 0 if cache is None else start % cache["pos"].shape[1]
    if segment_ids_BT is not None and cache is not None and cache["pos"].shape[1] != T:
      raise ValueError(
        f"segment_ids with a KV cache take an empty cache of exactly the {T} packed tokens' columns (a "
        f"packed prefill); this one has {cache['pos'].shape[1]}"
      )
    # Default positions (or packed segments) and no cache: causal self-attention in row order (the
    # kernel may skip masked blocks).
    causal = (positions_BT is None or segment_ids_BT is not None) and cache is None
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(
        jnp.reshape(start, (-1, 1)) + jnp.arange(T, dtype=jnp.int32)[None], (B, T)
      )
    if cache is None:
      k_pos_BS, layer_caches = positions_BT, None
    elif cfg.scan_layers and isinstance(cache["k"], tuple):
      raise ValueError("a per-layer KV cache (init_cache of unrolled layers) given to scanned layers")
    else:
      k_pos_BS = write_cache(cache["pos"], positions_BT.astype(jnp.int32), slot)
      layer_caches = (cache["k"], cache["v"])

    embedding_VD = make_param(
      self, "embedding", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std
    )
    x_BTD = embed(embedding_VD, tokens_BT).astype(dtype)
    if cfg.scale_embeddings:
      x_BTD = x_BTD * jnp.asarray(math.sqrt(cfg.d_model), dtype)
    if cfg.pos_encoding == "sinusoidal":
      x_BTD = x_BTD + sinusoidal_encoding(positions_BT, cfg.d_model).astype(dtype)
    elif cfg.pos_encoding == "learned":
      pos_table_TD = make_param(
        self, "pos_embedding", (cfg.max_len, cfg.d_model), ("length", "embed"), cfg.init_std
      )
      x_BTD = x_BTD + jnp.take(pos_table_TD, jnp.maximum(positions_BT, 0), axis=0).astype(dtype)
    x_BTD = sharding.constrain(Dropout(cfg.dropout)(x_BTD, deterministic=deterministic), ACTIVATION_AXES)

    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    attn_inputs = (positions_BT, k_pos_BS, slot, segment_ids_BT)
    if cfg.scan_layers:
      blocks = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast),
        length=cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x_BTD, new_layer_caches = blocks(cfg, deterministic, causal, name="blocks")(
        x_BTD, layer_caches, attn_inputs
      )
    else:
      per_layer = []
      for i in range(cfg.n_layers):
        layer_cache = None if cache is None else (layer_caches[0][i], layer_caches[1][i])
        x_BTD, new_cache = block(cfg, deterministic, causal, name=f"block_{i}")(
          x_BTD, layer_cache, attn_inputs
        )
        per_layer.append(new_cache)
      if cache is not None:  # given back in the layout it came in (init_cache's per-layer tuples)
        gather = tuple if isinstance(cache["k"], tuple) else jnp.stack
        new_layer_caches = tuple(gather([c[j] for c in per_layer]) for j in (0, 1))

    x_BTD = Norm(cfg, name="final_norm")(x_BTD)
    if return_hidden:  # the last hidden states (after the final norm), e.g. for embeddings
      return x_BTD.astype(jnp.float32)
    if cfg.tie_embeddings:
      head = lambda x: dense(x, embedding_VD, cfg, out_dtype=jnp.float32, w_is_NK=True)
    else:
      head_DV = make_param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std)
      head = lambda x: dense(x, head_DV, cfg, out_dtype=jnp.float32)
    if mup.logit_mult(cfg) != 1.0:  # μP: logits x 1/m (model/mup.py)
      unscaled, head = head, lambda x: unscaled(x) * mup.logit_mult(cfg)
    if targets_BT is not None:  # the loss, chunked for large vocabularies (chunked_loss.py)
      return chunked_loss.token_loss_sum(x_BTD, head, targets_BT, loss_mask_BT)
    if logits_at_BN is not None:
      x_BTD = jnp.take_along_axis(x_BTD, logits_at_BN[..., None], axis=1)  # [B, N, D]
    logits_BTV = head(x_BTD)
    if cache is None:
      return logits_BTV
    return logits_BTV, {"k": new_layer_caches[0], "v": new_layer_caches[1], "pos": k_pos_BS, "end": start + T}


# Logical names of the cache dimensions, so the cache shards by the same rules as the parameters.
CACHE_AXES = {
  "k": ("layers", "batch", "heads", "kv", "length"),
  "v": ("layers", "batch", "heads", "length", "kv"),
  "pos": ("batch", "length"),
  "end": (),
}


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> dict:
  """An empty KV cache: keys [L, B, K, H, S] and values [L, B, K, S, H] (K heads of H dims, S slots:
  the layouts attention's matmuls read, ops/attention.cached_attention) for scanned layers, or tuples
  of L [B, ...] arrays for unrolled ones (each layer then reads and updates its own buffer in place,
  where slicing a stacked one copies it), key positions [B, S] (-1 = empty), and `end`, the number of
  tokens written (slot `end % S` is written next: see Transformer). `map_kv` applies a function to the
  rows of either."""
  B, S, K, H = batch_size, max_len, cfg.kv_heads, cfg.dim_per_head
  dtype = jnp.dtype(dtype or cfg.dtype)
  if cfg.scan_layers:
    zeros = lambda shape: jnp.zeros((cfg.n_layers, *shape), dtype)
  else:
    zeros = lambda shape: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
  return {
    "k": zeros((B, K, H, S)),
    "v": zeros((B, K, S, H)),
    "pos": jnp.full((batch_size, max_len), -1, jnp.int32),
    "end": jnp.zeros((), jnp.int32),
  }


def map_kv(fn, *caches) -> dict:
  """{"k": ..., "v": ...} of fn(batch_axis, *arrays) over the K/V arrays of `caches` (init_cache's
  layout, all alike): called once with the stacked [L, B, ...] arrays (batch_axis 1), or once per layer
  with [B, ...] ones (batch_axis 0). E.g. the rows of a cache: map_kv(lambda ax, a: a[:2] if ax == 0
  else a[:, :2], cache)."""

  def one(*arrays):
    if isinstance(arrays[0], tuple):
      return tuple(fn(0, *layer) for layer in zip(*arrays))
    return fn(1, *arrays)

  return {name: one(*(c[name] for c in caches)) for name in ("k", "v")}


def boxed_param_shapes(cfg: ModelConfig):
  """Parameter shapes with their logical axis names (nn.Partitioned boxes), nothing allocated."""
  tokens = jnp.zeros((1, min(cfg.max_len, 8)), jnp.int32)
  return jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), tokens)["params"])


def init_params(cfg: ModelConfig, rng: jax.Array, batch_size: int = 1, seq_len: int | None = None):
  """Initialised parameters (logically partitioned boxes removed). `batch_size` and `seq_len` only shape
  the dummy input of flax's init (parameters do not depend on them; seq_len defaults to min(max_len, 8))."""
  tokens = jnp.zeros((batch_size, seq_len or min(cfg.max_len, 8)), jnp.int32)
  return nn.unbox(Transformer(cfg).init(rng, tokens)["params"])
