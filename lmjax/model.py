"""A decoder-only Transformer in Flax Linen, described by one frozen config.

Shape suffixes name tensor dimensions:
  B batch, T query length, S key length (cache slots), D d_model, V vocab,
  N query heads, K key/value heads, G query heads per KV head (N = K*G),
  H head_dim, F d_ff, L layers.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`,
`vocab`, `length`, `layers`) so that sharding is one table in the config
(DESIGN.md property 3); the model itself never names a mesh axis.

Attention masks are computed from token *positions*: a key is visible to a
query when `0 <= key_pos <= query_pos`. Position -1 marks padding. The same
rule serves training (positions 0..T-1), left-padded prompts and the KV cache,
so the sampler needs no second attention implementation.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from lmjax import sharding
from lmjax.kernels import attention_core, matmul_fp32_accumulate
from lmjax.dropout import Dropout

POS_ENCODINGS = ("sinusoidal", "learned", "rope", "none")
MLP_KINDS = ("relu", "gelu", "swiglu")
NORM_KINDS = ("layernorm", "rmsnorm")
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = ("float32", "bfloat16", "float16")
# Logical names of the residual stream between blocks (sharding constraints; see sharding.py).
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed")
# A large finite negative instead of -inf: a fully masked row (a padding query)
# then gives a uniform, finite softmax instead of NaNs.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _choice(field: str, value: Any, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"model.{field}={value!r} is not supported; allowed values: {sorted(allowed, key=str)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only Transformer. Validated on construction."""
  vocab_size: int = 256
  max_len: int = 256  # longest sequence the model is used on (learned PE table size)
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int | None = None  # None: = n_heads (MHA); 1: MQA; otherwise GQA
  head_dim: int | None = None  # None: d_model // n_heads
  d_ff: int = 512
  pos_encoding: str = "rope"
  rope_theta: float = 10000.0
  mlp: str = "gelu"
  norm: str = "rmsnorm"
  norm_eps: float = 1e-5
  attn_bias: bool = False  # biases on the q/k/v/o projections
  mlp_bias: bool = False
  norm_bias: bool = True  # LayerNorm's additive bias (nanoGPT's bias=False drops it; RMSNorm has none)
  tie_embeddings: bool = True
  # Token embeddings times sqrt(d_model) on input (Vaswani et al. 2017, section 3.4), so that they
  # are not swamped by sinusoidal positions of amplitude 1.
  scale_embeddings: bool = False
  # Attention to the last `sliding_window` positions only (Mistral): a key at position k is visible
  # to a query at q iff 0 <= q - k < sliding_window. None: full causal attention.
  sliding_window: int | None = None
  dropout: float = 0.0  # on embeddings and on each residual branch
  attn_dropout: float = 0.0  # on attention probabilities
  scan_layers: bool = True
  remat: str = "none"
  dtype: str = "float32"  # compute dtype of activations and matmuls
  matmul_dtype: str | None = None  # operand dtype of the dense projections (None: dtype), fp32 accumulation
  param_dtype: str = "float32"  # storage dtype of parameters
  init_std: float = 0.02

  def __post_init__(self):
    _choice("pos_encoding", self.pos_encoding, POS_ENCODINGS)
    _choice("mlp", self.mlp, MLP_KINDS)
    _choice("norm", self.norm, NORM_KINDS)
    _choice("remat", self.remat, REMAT_POLICIES)
    _choice("dtype", self.dtype, DTYPES)
    _choice("matmul_dtype", self.matmul_dtype, DTYPES + (None,))
    _choice("param_dtype", self.param_dtype, DTYPES)
    for field in ("vocab_size", "max_len", "d_model", "n_layers", "n_heads", "d_ff"):
      if getattr(self, field) < 1:
        raise ValueError(f"model.{field}={getattr(self, field)} must be a positive integer")
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model} "
                       f"(or set model.head_dim explicitly); allowed n_heads: "
                       f"{[n for n in range(1, self.d_model + 1) if self.d_model % n == 0]}")
    if self.n_heads % self.kv_heads:
      raise ValueError(f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}; "
                       f"allowed n_kv_heads: {[k for k in range(1, self.n_heads + 1) if self.n_heads % k == 0]}")
    if self.pos_encoding == "rope" and self.dim_per_head % 2:
      raise ValueError(f"model.pos_encoding='rope' needs an even head_dim, got {self.dim_per_head}")
    if self.pos_encoding == "sinusoidal" and self.d_model % 2:
      raise ValueError(f"model.pos_encoding='sinusoidal' needs an even d_model, got {self.d_model}")
    for field in ("dropout", "attn_dropout"):
      if not 0.0 <= getattr(self, field) < 1.0:
        raise ValueError(f"model.{field}={getattr(self, field)} must be in [0, 1)")
    for field in ("n_kv_heads", "head_dim", "sliding_window"):
      if getattr(self, field) is not None and getattr(self, field) < 1:
        raise ValueError(f"model.{field}={getattr(self, field)} must be a positive integer (or 0 in a config: "
                         "the default)")
    for field in ("rope_theta", "norm_eps", "init_std"):
      if not getattr(self, field) > 0:
        raise ValueError(f"model.{field}={getattr(self, field)} must be > 0")

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @classmethod
  def from_dict(cls, values: dict) -> "ModelConfig":
    """Builds a config from a plain dict (e.g. an ml_collections `model` block)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(known)}")
    return cls(**values)


# ----------------------------------------------------------------------------
# Positional encodings: pure functions of integer positions, so they work the
# same for training, padded prompts and single decode steps.


def sinusoidal_encoding(positions_BT: jax.Array, d_model: int) -> jax.Array:
  """PE(i, 2j) = sin(i / 10000^(2j/d)), PE(i, 2j+1) = cos(i / 10000^(2j/d))."""
  inv_freq_J = 1.0 / (10000.0 ** (jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model))
  angle_BTJ = positions_BT[..., None].astype(jnp.float32) * inv_freq_J
  pe_BTJ2 = jnp.stack([jnp.sin(angle_BTJ), jnp.cos(angle_BTJ)], axis=-1)  # interleave sin, cos
  return pe_BTJ2.reshape(*positions_BT.shape, d_model)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, Llama/HF layout.

  Dimension j is paired with j + H/2 and the pair is rotated by the angle
  pos * theta^(-2j/H). Rotating q and k this way makes q.k depend only on the
  distance between their positions.
  """
  half = x_BTNH.shape[-1] // 2
  inv_freq_J = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2 / x_BTNH.shape[-1]))
  angle_BTJ = positions_BT[..., None].astype(jnp.float32) * inv_freq_J
  sin_BT1J, cos_BT1J = jnp.sin(angle_BTJ)[:, :, None], jnp.cos(angle_BTJ)[:, :, None]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos_BT1J - x2 * sin_BT1J, x2 * cos_BT1J + x1 * sin_BT1J], axis=-1)
  return rotated.astype(x_BTNH.dtype)


# ----------------------------------------------------------------------------
# Layers.


def _param(module: nn.Module, name: str, shape, axes, std: float | None):
  """A parameter with logical axis names; std=None initialises to ones, 0 to zeros."""
  if std is None:
    init = nn.initializers.ones
  elif std == 0:
    init = nn.initializers.zeros
  else:
    init = nn.initializers.normal(std)
  return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                      jnp.dtype(module.cfg.param_dtype))


def _dense(x, w, cfg: ModelConfig, in_dims: int = 1, out_dtype=None, w_is_NK: bool = False) -> jax.Array:
  """Contracts the last `in_dims` dims of x with the first `in_dims` of w, as one 2-D matmul.

  Flattening to [tokens, features] @ [features, out] matters on XLA:CPU: a dot
  that contracts over both batch and length (the weight gradient of a 3-D
  einsum) runs ~2x slower than the same matmul in 2-D. Operands are cast to
  `matmul_dtype` (default: the compute dtype) and accumulated in fp32, so bf16
  operands with fp32 activations are one setting: the matmuls run at the bf16
  rate while norms, softmax and the residual stream stay fp32. `w_is_NK`: w is
  [out, in] (the tied embedding as the output projection) and x contracts with
  its last dim.
  """
  operand_dtype = jnp.dtype(cfg.matmul_dtype or cfg.dtype)
  if w_is_NK:
    k, out_dims, w_2d = w.shape[1], w.shape[:1], w
  else:
    k, out_dims = int(np.prod(w.shape[:in_dims])), w.shape[in_dims:]
    w_2d = w.reshape(k, -1)
  lead = x.shape[:x.ndim - in_dims]
  x_MK = x.reshape(-1, k)
  if operand_dtype == jnp.float32:  # plain autodiff already keeps everything fp32 (and remat sees a dot)
    y = jnp.dot(x_MK.astype(operand_dtype), (w_2d.T if w_is_NK else w_2d).astype(operand_dtype),
                preferred_element_type=jnp.float32)
  else:
    y = matmul_fp32_accumulate(x_MK, w_2d, operand_dtype, w_is_NK)
  return y.reshape(*lead, *out_dims).astype(out_dtype or cfg.dtype)


class Norm(nn.Module):
  """Pre-norm: LayerNorm (scale, and bias unless `norm_bias` is off) or RMSNorm (scale), in fp32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    d = x_BTD.shape[-1]
    x = x_BTD.astype(jnp.float32)
    if self.cfg.norm == "layernorm":
      x = x - x.mean(-1, keepdims=True)
    x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.cfg.norm_eps)
    x = x * _param(self, "scale", (d,), ("embed",), None)
    if self.cfg.norm == "layernorm" and self.cfg.norm_bias:
      x = x + _param(self, "bias", (d,), ("embed",), 0)
    return x.astype(self.cfg.dtype)


def causal_query_blocks(seq_len: int) -> int:
  """How many query blocks causal self-attention over `seq_len` tokens is split into.

  Blocks of at least 64 queries keep the matmuls efficient; at most 8 keep the
  unrolled graph small. Short sequences stay one block (no skipped work to gain).
  """
  blocks = min(8, seq_len // 64)
  while blocks > 1 and seq_len % blocks:
    blocks -= 1
  return max(blocks, 1)


def _visible(q_pos, k_pos, window: int | None):
  """The causal (and sliding-window) rule on broadcasting query/key positions, numpy or jax."""
  visible = k_pos <= q_pos
  return visible if window is None else visible & (q_pos - k_pos < window)


def _attend(q_BKGTH, k_BKSH, v_BKSH, visible_TS, dropout: Dropout, operand_dtype) -> jax.Array:
  """`attention_core` for grouped heads; `visible_TS` broadcasts against [B, K, G, T, S]. fp32 result."""
  B, K, G, T, H = q_BKGTH.shape
  bias = jnp.where(visible_TS, 0.0, _MASK_VALUE)
  bias = bias.reshape((1,) * (5 - bias.ndim) + bias.shape)
  bias_BKMS = jnp.broadcast_to(bias, (*bias.shape[:2], G, T, bias.shape[-1])).reshape(*bias.shape[:2], G * T, -1)
  keep_BKMS = None
  if not dropout.deterministic and dropout.rate > 0:
    keep_BKMS = dropout(jnp.ones((B, K, G * T, k_BKSH.shape[2]), jnp.float32))
  out_BKMH = attention_core(q_BKGTH.reshape(B, K, G * T, H), k_BKSH, v_BKSH, bias_BKMS, keep_BKMS, operand_dtype)
  return out_BKMH.reshape(B, K, G, T, H)


class Attention(nn.Module):
  """Causal multi-head attention softmax(QK^T/sqrt(d_k))V with grouped KV heads.

  With `layer_cache=(k_BSKH, v_BSKH)` the new keys/values are written into the
  cache at slot `cache_end` and the queries attend over the whole cache; the
  updated cache is returned (None without a cache).
  """
  cfg: ModelConfig
  deterministic: bool = True
  # >0: plain causal self-attention (positions 0..T-1, no cache) in this many query blocks;
  # 0: the mask comes from the positions (padding, caches).
  causal_blocks: int = 0

  @nn.compact
  def __call__(self, x_BTD, q_pos_BT, k_pos_BS, layer_cache=None, cache_end=None):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)

    names = ("wq", "wk", "wv")
    w_DKH = [_param(self, name, (D, heads, H), ("embed", "heads", "kv"), cfg.init_std)
             for name, heads in zip(names, (N, K, K))]
    if N == K:  # one [D, 3*N*H] matmul instead of three: small matmuls run far below peak
      qkv_BT3NH = _dense(x_BTD, jnp.stack(w_DKH, axis=1), cfg)
      q_BTNH, k_BTKH, v_BTKH = (qkv_BT3NH[:, :, i] for i in range(3))
    else:
      q_BTNH, k_BTKH, v_BTKH = (_dense(x_BTD, w, cfg) for w in w_DKH)
    if cfg.attn_bias:
      q_BTNH, k_BTKH, v_BTKH = (y + _param(self, name + "_bias", (heads, H), ("heads", "kv"), 0).astype(dtype)
                                for y, name, heads in zip((q_BTNH, k_BTKH, v_BTKH), names, (N, K, K)))
    if cfg.pos_encoding == "rope":
      q_BTNH = apply_rope(q_BTNH, q_pos_BT, cfg.rope_theta)
      k_BTKH = apply_rope(k_BTKH, q_pos_BT, cfg.rope_theta)
    if layer_cache is not None:
      k_BSKH = jax.lax.dynamic_update_slice_in_dim(layer_cache[0], k_BTKH.astype(layer_cache[0].dtype), cache_end, 1)
      v_BSKH = jax.lax.dynamic_update_slice_in_dim(layer_cache[1], v_BTKH.astype(layer_cache[1].dtype), cache_end, 1)
      new_cache = (k_BSKH, v_BSKH)
    else:
      k_BSKH, v_BSKH, new_cache = k_BTKH, v_BTKH, None

    B, T = q_BTNH.shape[:2]
    # Heads-first layout: the per-head [T, H] @ [H, S] matmuls then run on contiguous blocks.
    q_BKGTH = (q_BTNH.reshape(B, T, K, N // K, H) * jnp.asarray(H ** -0.5, dtype)).transpose(0, 2, 3, 1, 4)
    k_BKSH, v_BKSH = (c.astype(dtype).transpose(0, 2, 1, 3) for c in (k_BSKH, v_BSKH))
    dropout = Dropout(cfg.attn_dropout, deterministic=self.deterministic)
    operand_dtype = jnp.dtype(cfg.matmul_dtype or cfg.dtype)
    if self.causal_blocks:
      # Plain causal self-attention: a constant mask, and query block i sees key blocks 0..i
      # only, so blocks above the diagonal are never computed (~40% less at 4 blocks). Split
      # rather than sliced: the backward then concatenates the blocks' gradients instead of
      # summing zero-padded full-length copies (6x384 training step ~5% faster).
      n, size = self.causal_blocks, T // self.causal_blocks
      q_blocks = jnp.split(q_BKGTH, n, axis=3)
      k_blocks, v_blocks = jnp.split(k_BKSH, n, axis=2), jnp.split(v_BKSH, n, axis=2)
      out_BKGTH = jnp.concatenate([
          _attend(q_blocks[i], jnp.concatenate(k_blocks[:i + 1], axis=2), jnp.concatenate(v_blocks[:i + 1], axis=2),
                  _visible(np.arange(i * size, (i + 1) * size)[:, None], np.arange((i + 1) * size)[None, :],
                           cfg.sliding_window), dropout, operand_dtype)
          for i in range(n)], axis=3)
    else:
      visible_BTS = (k_pos_BS[:, None, :] >= 0) & _visible(q_pos_BT[:, :, None], k_pos_BS[:, None, :],
                                                           cfg.sliding_window)
      out_BKGTH = _attend(q_BKGTH, k_BKSH, v_BKSH, visible_BTS[:, None, None], dropout, operand_dtype)
    out_BTKGH = out_BKGTH.astype(dtype).transpose(0, 3, 1, 2, 4)

    wo_NHD = _param(self, "wo", (N, H, D), ("heads", "kv", "embed"), out_std)
    out_BTD = _dense(out_BTKGH.reshape(B, T, N, H), wo_NHD, cfg, in_dims=2)
    if cfg.attn_bias:
      out_BTD = out_BTD + _param(self, "wo_bias", (D,), ("embed",), 0).astype(dtype)
    return out_BTD, new_cache


class MLP(nn.Module):
  """relu: max(0, xW1+b1)W2+b2; gelu: GELU(xW1+b1)W2+b2; swiglu: (silu(xW1) * xW3)W2."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    D, F = cfg.d_model, cfg.d_ff
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)

    def bias(name, size, axis):
      return _param(self, name, (size,), (axis,), 0).astype(dtype) if cfg.mlp_bias else 0

    h_BTF = _dense(x_BTD, _param(self, "w1", (D, F), ("embed", "mlp"), cfg.init_std), cfg)
    h_BTF = h_BTF + bias("b1", F, "mlp")
    if cfg.mlp == "relu":
      h_BTF = jax.nn.relu(h_BTF)
    elif cfg.mlp == "gelu":
      h_BTF = jax.nn.gelu(h_BTF)
    else:
      gate_BTF = _dense(x_BTD, _param(self, "w3", (D, F), ("embed", "mlp"), cfg.init_std), cfg)
      h_BTF = jax.nn.silu(h_BTF) * (gate_BTF + bias("b3", F, "mlp"))
    out_BTD = _dense(h_BTF, _param(self, "w2", (F, D), ("mlp", "embed"), out_std), cfg)
    return out_BTD + bias("b2", D, "embed")


class Block(nn.Module):
  """Pre-norm residual block: x + Attn(Norm(x)), then x + MLP(Norm(x)).

  The signature (carry, per-layer input, broadcast input) -> (carry, per-layer
  output) is the one `nn.scan` needs, so the same block runs scanned or unrolled.
  """
  cfg: ModelConfig
  deterministic: bool = True
  causal_blocks: int = 0

  @nn.compact
  def __call__(self, x_BTD, layer_cache, attn_inputs):
    q_pos_BT, k_pos_BS, cache_end = attn_inputs
    drop = Dropout(self.cfg.dropout, deterministic=self.deterministic)
    h_BTD, new_cache = Attention(self.cfg, self.deterministic, self.causal_blocks, name="attn")(
        Norm(self.cfg, name="attn_norm")(x_BTD), q_pos_BT, k_pos_BS, layer_cache, cache_end)
    x_BTD = x_BTD + drop(h_BTD)
    x_BTD = x_BTD + drop(MLP(self.cfg, name="mlp")(Norm(self.cfg, name="mlp_norm")(x_BTD)))
    return sharding.constrain(x_BTD, ACTIVATION_AXES), new_cache


class Transformer(nn.Module):
  """Token ids -> next-token logits (fp32).

  `apply({'params': p}, tokens_BT)` returns logits_BTV (`return_hidden=True`: the final hidden
  states x_BTD instead). Given
  `cache=init_cache(...)`-shaped state it returns `(logits_BTV, new_cache)`;
  positions default to 0..T-1 (or continue after the cache's filled slots).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, positions_BT=None, cache=None, deterministic: bool = True,
               return_hidden: bool = False):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    B, T = tokens_BT.shape
    start = 0 if cache is None else cache["end"]
    # Default positions and no cache: plain causal self-attention, computed block by block.
    causal_blocks = causal_query_blocks(T) if positions_BT is None and cache is None else 0
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
    if cache is None:
      k_pos_BS, layer_caches = positions_BT, None
    else:
      k_pos_BS = jax.lax.dynamic_update_slice_in_dim(cache["pos"], positions_BT.astype(jnp.int32), start, 1)
      layer_caches = (cache["k"], cache["v"])

    embedding_VD = _param(self, "embedding", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)
    x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0).astype(dtype)
    if cfg.scale_embeddings:
      x_BTD = x_BTD * jnp.asarray(math.sqrt(cfg.d_model), dtype)
    if cfg.pos_encoding == "sinusoidal":
      x_BTD = x_BTD + sinusoidal_encoding(positions_BT, cfg.d_model).astype(dtype)
    elif cfg.pos_encoding == "learned":
      pos_table_TD = _param(self, "pos_embedding", (cfg.max_len, cfg.d_model), ("length", "embed"), cfg.init_std)
      x_BTD = x_BTD + jnp.take(pos_table_TD, jnp.maximum(positions_BT, 0), axis=0).astype(dtype)
    x_BTD = sharding.constrain(Dropout(cfg.dropout)(x_BTD, deterministic=deterministic), ACTIVATION_AXES)

    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    attn_inputs = (positions_BT, k_pos_BS, start)
    if cfg.scan_layers:
      blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                       in_axes=(0, nn.broadcast), length=cfg.n_layers,
                       metadata_params={nn.PARTITION_NAME: "layers"})
      x_BTD, new_layer_caches = blocks(cfg, deterministic, causal_blocks, name="blocks")(x_BTD, layer_caches, attn_inputs)
    else:
      per_layer = []
      for i in range(cfg.n_layers):
        layer_cache = None if cache is None else jax.tree.map(lambda c: c[i], layer_caches)
        x_BTD, new_cache = block(cfg, deterministic, causal_blocks, name=f"block_{i}")(x_BTD, layer_cache, attn_inputs)
        per_layer.append(new_cache)
      new_layer_caches = None if cache is None else jax.tree.map(lambda *c: jnp.stack(c), *per_layer)

    x_BTD = Norm(cfg, name="final_norm")(x_BTD)
    if return_hidden:  # the last hidden states (after the final norm), e.g. for embeddings
      return x_BTD.astype(jnp.float32)
    if cfg.tie_embeddings:
      logits_BTV = _dense(x_BTD, embedding_VD, cfg, out_dtype=jnp.float32, w_is_NK=True)
    else:
      head_DV = _param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std)
      logits_BTV = _dense(x_BTD, head_DV, cfg, out_dtype=jnp.float32)
    if cache is None:
      return logits_BTV
    return logits_BTV, {"k": new_layer_caches[0], "v": new_layer_caches[1], "pos": k_pos_BS, "end": start + T}


# Logical names of the cache dimensions, so the cache shards by the same rules as the parameters.
CACHE_AXES = {"k": ("layers", "batch", "length", "heads", "kv"), "v": ("layers", "batch", "length", "heads", "kv"),
              "pos": ("batch", "length"), "end": ()}


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> dict:
  """An empty KV cache: k/v [L, B, S, K, H], key positions [B, S] (-1 = empty), fill level."""
  shape = (cfg.n_layers, batch_size, max_len, cfg.kv_heads, cfg.dim_per_head)
  dtype = jnp.dtype(dtype or cfg.dtype)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "pos": jnp.full((batch_size, max_len), -1, jnp.int32), "end": jnp.zeros((), jnp.int32)}


# ----------------------------------------------------------------------------
# Size and cost.


def boxed_param_shapes(cfg: ModelConfig):
  """Parameter shapes with their logical axis names (nn.Partitioned boxes), nothing allocated."""
  tokens = jnp.zeros((1, min(cfg.max_len, 8)), jnp.int32)
  return jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), tokens)["params"])


def init_params(cfg: ModelConfig, rng: jax.Array, batch_size: int = 1, seq_len: int | None = None):
  """Initialised parameters (logically partitioned boxes removed)."""
  tokens = jnp.zeros((batch_size, seq_len or min(cfg.max_len, 8)), jnp.int32)
  return nn.unbox(Transformer(cfg).init(rng, tokens)["params"])


def param_count(cfg: ModelConfig) -> int:
  """Number of parameters, from shapes only (nothing is allocated)."""
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def non_embedding_param_count(cfg: ModelConfig) -> int:
  """Parameters outside the token, position and output embeddings: the N of scaling laws."""
  embeddings = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  if cfg.pos_encoding == "learned":
    embeddings += cfg.max_len * cfg.d_model
  return param_count(cfg) - embeddings


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6N + 12*L*T*(N_heads*H) (Kaplan et al.; PaLM appendix B).

  N counts the parameters used in matmuls: the input embedding table and the
  learned position table are lookups, not matmuls, so they are excluded unless
  the embedding is tied to the output projection (then it is counted once).
  """
  n = param_count(cfg)
  if not cfg.tie_embeddings:
    n -= cfg.vocab_size * cfg.d_model
  if cfg.pos_encoding == "learned":
    n -= cfg.max_len * cfg.d_model
  return 6.0 * n + 12.0 * cfg.n_layers * seq_len * cfg.n_heads * cfg.dim_per_head
