"""The Transformer's layers: positional encodings, norms, attention, MLP and the residual block.

Shape suffixes name tensor dimensions:
  B batch, T query length, S key length (cache slots), D d_model, V vocab,
  N query heads, K key/value heads, G query heads per KV head (N = K*G),
  H head_dim, F d_ff, L layers.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, `length`,
`layers`) so that sharding is one table in the config (DESIGN.md property 3); the layers never name
a mesh axis. Matmuls and attention go through ops/ (`model.matmul_impl`, `model.attention_impl`;
a one-token decode step over a KV cache uses `cached_attention`, weights held for decoding
`quantized.matmul`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from lmjax.core import sharding
from lmjax.model import mup
from lmjax.model.config import ModelConfig
from lmjax.ops import quantized
from lmjax.ops.attention import attention, cached_attention
from lmjax.ops.dropout import Dropout
from lmjax.ops.matmul import matmul

# Logical names of the residual stream between blocks (sharding constraints; see core/sharding.py).
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed")


# Positional encodings: pure functions of integer positions, so they work the
# same for training, padded prompts and single decode steps.


def sinusoidal_encoding(positions_BT: jax.Array, d_model: int) -> jax.Array:
  """PE(i, 2j) = sin(i / 10000^(2j/d)), PE(i, 2j+1) = cos(i / 10000^(2j/d))."""
  inv_freq_J = 1.0 / (10000.0 ** (jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model))
  angle_BTJ = positions_BT[..., None].astype(jnp.float32) * inv_freq_J[None, None]
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
  angle_BTJ = positions_BT[..., None].astype(jnp.float32) * inv_freq_J[None, None]
  sin_BT1J, cos_BT1J = jnp.sin(angle_BTJ)[:, :, None], jnp.cos(angle_BTJ)[:, :, None]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos_BT1J - x2 * sin_BT1J, x2 * cos_BT1J + x1 * sin_BT1J], axis=-1)
  return rotated.astype(x_BTNH.dtype)


# ----------------------------------------------------------------------------
# Layers.


def write_cache(cache, new, slot, axis: int = 1) -> jax.Array:
  """`new` written into `cache` (rows first: [B, ...]) along `axis` (its length axis) from column
  `slot`: the same column for every row (a scalar), or each row's own (an int [B]: rows at different
  lengths, as continuous batching keeps them). One row's own column is a plain update too: vmapped,
  it became a scatter that XLA:CPU rewrote into a select over the whole buffer."""
  if jnp.ndim(slot) == 0 or jnp.shape(slot)[0] == 1:
    return jax.lax.dynamic_update_slice_in_dim(cache, new, jnp.reshape(slot, ())[()], axis)
  return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n, s, axis - 1))(cache, new, slot)


def embed(embedding_VD, tokens_BT) -> jax.Array:
  """The rows of the token embedding (an array or a QuantizedWeight) for tokens_BT: [B, T, D]."""
  if isinstance(embedding_VD, quantized.QuantizedWeight):
    return quantized.take_rows(embedding_VD, tokens_BT)
  return jnp.take(embedding_VD, tokens_BT, axis=0)


def make_param(module: nn.Module, name: str, shape, axes, std: float | None):
  """A parameter with logical axis names; std=None initialises to ones, 0 to zeros. A weight given as a
  QuantizedWeight (model/quantize.py) is returned as it is: `dense` and `embed` take it in place of an
  array (Flax's own check would compare its integer storage's shape with the declared one)."""
  if module.has_variable("params", name):
    given = module.get_variable("params", name)
    if isinstance(given, quantized.QuantizedWeight):
      return given
  if std is None:
    init = nn.initializers.ones
  elif std == 0:
    init = nn.initializers.zeros
  else:
    init = nn.initializers.normal(std)
  return module.param(
    name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(module.cfg.param_dtype)
  )


def lead(v: jax.Array, ndim: int) -> jax.Array:
  """`v` with leading unit axes up to rank `ndim`: explicit broadcasting of a [.., D] parameter
  against activations (tests run with jax_numpy_rank_promotion='raise')."""
  return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def dense(x, w, cfg: ModelConfig, in_dims: int = 1, out_dtype=None, w_is_NK: bool = False) -> jax.Array:
  """Contracts the last `in_dims` dims of x with the first `in_dims` of w, as one 2-D matmul.

  Flattening to [tokens, features] @ [features, out] matters on XLA:CPU: a dot
  that contracts over both batch and length (the weight gradient of a 3-D
  einsum) runs ~2x slower than the same matmul in 2-D. Operands are cast to
  `matmul_dtype` (default: the compute dtype) and accumulated in fp32, so bf16
  operands with fp32 activations are one setting: the matmuls run at the bf16
  rate while norms, softmax and the residual stream stay fp32. `w_is_NK`: w is
  [out, in] (the tied embedding as the output projection) and x contracts with
  its last dim. A QuantizedWeight w (ops/quantized.py) is dequantized inside an fp32 matmul.
  """
  lead_dims = x.shape[: x.ndim - in_dims]
  if isinstance(w, quantized.QuantizedWeight):
    out_dims = w.shape[:1] if w_is_NK else w.shape[in_dims:]
    y = quantized.matmul(x.reshape(-1, w.inputs), w)
    return y.reshape(*lead_dims, *out_dims).astype(out_dtype or cfg.dtype)
  operand_dtype = jnp.dtype(cfg.matmul_dtype or cfg.dtype)
  if w_is_NK:
    k, out_dims, w_2d = w.shape[1], w.shape[:1], w
  else:
    k, out_dims = int(np.prod(w.shape[:in_dims])), w.shape[in_dims:]
    w_2d = w.reshape(k, -1)
  y = matmul(x.reshape(-1, k), w_2d, operand_dtype, w_is_NK, impl=cfg.matmul_impl)
  return y.reshape(*lead_dims, *out_dims).astype(out_dtype or cfg.dtype)


def dense_shared_input(x, ws, cfg: ModelConfig) -> list[jax.Array]:
  """[dense(x, w, cfg) for w in ws] (one input dim each). Weights held for decoding (QuantizedWeights)
  go to `quantized.matmuls` together: a decode step reads a layer's q, k and v (or w1 and w3) in one
  kernel call, as one matrix (BUILD_NOTES: 210 -> 120 calls a SmolLM2 token)."""
  if not all(isinstance(w, quantized.QuantizedWeight) for w in ws):
    return [dense(x, w, cfg) for w in ws]
  ys = quantized.matmuls(x.reshape(-1, x.shape[-1]), ws)
  return [y.reshape(*x.shape[:-1], *w.shape[1:]).astype(cfg.dtype) for y, w in zip(ys, ws)]


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
    x = x * lead(make_param(self, "scale", (d,), ("embed",), None), x.ndim)
    if self.cfg.norm == "layernorm" and self.cfg.norm_bias:
      x = x + lead(make_param(self, "bias", (d,), ("embed",), 0), x.ndim)
    return x.astype(self.cfg.dtype)


class Attention(nn.Module):
  """Causal multi-head attention softmax(QK^T/sqrt(d_k))V with grouped KV heads.

  With `layer_cache=(k_BKHS, v_BKSH)` (model.init_cache's layouts) the new keys/values are written
  into the cache at slot `cache_end` and the queries attend over the whole cache (one query, a decode
  step: `cached_attention` on the cache as stored; more: `attention` as configured); the updated
  cache is returned (None without a cache).
  """

  cfg: ModelConfig
  deterministic: bool = True
  # True: plain causal self-attention (positions 0..T-1, no cache); False: the mask comes from the
  # positions (padding, caches).
  causal: bool = False

  @nn.compact
  def __call__(self, x_BTD, q_pos_BT, k_pos_BS, layer_cache=None, cache_end=None, segment_ids_BT=None):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    std = cfg.init_std * mup.hidden_init_mult(cfg)  # μP: hidden matrices start smaller when wider
    out_std = std / math.sqrt(2 * cfg.n_layers)

    names = ("wq", "wk", "wv")
    w_DKH = [
      make_param(self, name, (D, heads, H), ("embed", "heads", "kv"), std)
      for name, heads in zip(names, (N, K, K))
    ]
    if N == K and not isinstance(
      w_DKH[0], quantized.QuantizedWeight
    ):  # one [D, 3*N*H] matmul instead of three: small matmuls run far below peak
      qkv_BT3NH = dense(x_BTD, jnp.stack(w_DKH, axis=1), cfg)
      q_BTNH, k_BTKH, v_BTKH = (qkv_BT3NH[:, :, i] for i in range(3))
    else:
      q_BTNH, k_BTKH, v_BTKH = dense_shared_input(x_BTD, w_DKH, cfg)
    if cfg.attn_bias:
      q_BTNH, k_BTKH, v_BTKH = (
        y + lead(make_param(self, name + "_bias", (heads, H), ("heads", "kv"), 0), 4).astype(dtype)
        for y, name, heads in zip((q_BTNH, k_BTKH, v_BTKH), names, (N, K, K))
      )
    if mup.query_mult(cfg) != 1.0:  # μP: attention logits scale as 1/head_dim (model/mup.py)
      q_BTNH = q_BTNH * jnp.asarray(mup.query_mult(cfg), q_BTNH.dtype)
    if cfg.pos_encoding == "rope":
      q_BTNH = apply_rope(q_BTNH, q_pos_BT, cfg.rope_theta)
      k_BTKH = apply_rope(k_BTKH, q_pos_BT, cfg.rope_theta)
    operand_dtype = jnp.dtype(cfg.matmul_dtype or cfg.dtype)
    if layer_cache is not None:  # keys stored [B, K, H, S] and values [B, K, S, H]: see init_cache
      k_BKHS = write_cache(
        layer_cache[0], k_BTKH.astype(layer_cache[0].dtype).transpose(0, 2, 3, 1), cache_end, 3
      )
      v_BKSH = write_cache(
        layer_cache[1], v_BTKH.astype(layer_cache[1].dtype).transpose(0, 2, 1, 3), cache_end, 2
      )
      new_cache = (k_BKHS, v_BKSH)
    else:
      new_cache = None
    if layer_cache is not None and q_BTNH.shape[1] == 1:  # a decode step: the cache as stored
      out_BTNH = cached_attention(
        q_BTNH, k_BKHS, v_BKSH, q_pos_BT, k_pos_BS, cfg.sliding_window, operand_dtype
      )
    else:  # training, scoring and a prompt's prefill (keys as [B, S, K, H]: `attention_impl` applies)
      if layer_cache is not None:
        k_BTKH, v_BTKH = k_BKHS.transpose(0, 3, 1, 2), v_BKSH.transpose(0, 2, 1, 3)
      out_BTNH = attention(
        q_BTNH,
        k_BTKH,
        v_BTKH,
        q_pos_BT,
        k_pos_BS,
        causal=self.causal,
        window=cfg.sliding_window,
        dropout=Dropout(cfg.attn_dropout, deterministic=self.deterministic),
        operand_dtype=operand_dtype,
        impl=cfg.attention_impl,
        segment_ids_BT=segment_ids_BT,
      )

    wo_NHD = make_param(self, "wo", (N, H, D), ("heads", "kv", "embed"), out_std)
    out_BTD = dense(out_BTNH, wo_NHD, cfg, in_dims=2)
    if cfg.attn_bias:
      out_BTD = out_BTD + lead(make_param(self, "wo_bias", (D,), ("embed",), 0), 3).astype(dtype)
    return out_BTD, new_cache


class MLP(nn.Module):
  """relu: max(0, xW1+b1)W2+b2; gelu: GELU(xW1+b1)W2+b2; swiglu: (silu(xW1) * xW3)W2."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    D, F = cfg.d_model, cfg.d_ff
    std = cfg.init_std * mup.hidden_init_mult(cfg)
    out_std = std / math.sqrt(2 * cfg.n_layers)

    def bias(name, size, axis):
      return lead(make_param(self, name, (size,), (axis,), 0), 3).astype(dtype) if cfg.mlp_bias else 0

    # Created w1, b1, w3, b3: Flax draws init keys in creation order, so initial weights stay as they were.
    w_DF, b_F = [], []
    for name in ("w1", "w3") if cfg.mlp == "swiglu" else ("w1",):
      w_DF.append(make_param(self, name, (D, F), ("embed", "mlp"), std))
      b_F.append(bias(name.replace("w", "b"), F, "mlp"))
    h_BTF, *gate_BTF = (h + b for h, b in zip(dense_shared_input(x_BTD, w_DF, cfg), b_F))
    if cfg.mlp == "relu":
      h_BTF = jax.nn.relu(h_BTF)
    elif cfg.mlp == "gelu":
      h_BTF = jax.nn.gelu(h_BTF)
    else:
      h_BTF = jax.nn.silu(h_BTF) * gate_BTF[0]
    out_BTD = dense(h_BTF, make_param(self, "w2", (F, D), ("mlp", "embed"), out_std), cfg)
    return out_BTD + bias("b2", D, "embed")


class Block(nn.Module):
  """Pre-norm residual block: x + Attn(Norm(x)), then x + MLP(Norm(x)).

  The signature (carry, per-layer input, broadcast input) -> (carry, per-layer
  output) is the one `nn.scan` needs, so the same block runs scanned or unrolled.
  """

  cfg: ModelConfig
  deterministic: bool = True
  causal: bool = False

  @nn.compact
  def __call__(self, x_BTD, layer_cache, attn_inputs):
    q_pos_BT, k_pos_BS, cache_end, segment_ids_BT = attn_inputs
    drop = Dropout(self.cfg.dropout, deterministic=self.deterministic)
    h_BTD, new_cache = Attention(self.cfg, self.deterministic, self.causal, name="attn")(
      Norm(self.cfg, name="attn_norm")(x_BTD), q_pos_BT, k_pos_BS, layer_cache, cache_end, segment_ids_BT
    )
    x_BTD = x_BTD + drop(h_BTD)
    x_BTD = x_BTD + drop(MLP(self.cfg, name="mlp")(Norm(self.cfg, name="mlp_norm")(x_BTD)))
    return sharding.constrain(x_BTD, ACTIVATION_AXES), new_cache
