"""Every attention implementation against a float64 numpy reference (values and gradients), what
`auto` chooses, and cuDNN's arguments (the kernel itself needs a GPU: BUILD_NOTES)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import model as M
from lmjax.ops import accelerator_attention, attention as attention_lib, blockwise_attention, decode_kernels

B, N, H, T = 2, 4, 8, 128  # splash needs multiples of 128 positions


def numpy_attention_vjp(q, k, v, visible_BTS, dout):
  """softmax(q k^T / sqrt(H), masked) v and its gradients for `dout`, in float64 numpy with the kv
  heads repeated for their query heads (Vaswani et al. 2017 eq. 1; the softmax VJP
  dS = P * (dP - rowsum(dP * P)))."""
  q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
  G = q.shape[2] // k.shape[2]
  k_rep, v_rep = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  scale = q.shape[-1] ** -0.5
  s = np.einsum("btnh,bsnh->bnts", q, k_rep) * scale
  s = np.where(visible_BTS[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bnts,bsnh->btnh", p, v_rep)
  dv = np.einsum("bnts,btnh->bsnh", p, dout)
  dp = np.einsum("btnh,bsnh->bnts", dout, v_rep)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  dq = np.einsum("bnts,bsnh->btnh", ds, k_rep) * scale
  dk = np.einsum("bnts,btnh->bsnh", ds, q) * scale
  fold = lambda x: x.reshape(*x.shape[:2], -1, G, x.shape[-1]).sum(3)  # query heads -> their kv head
  return out, dq, fold(dk), fold(dv)


def case(name):
  """(q, k, v, q_pos, k_pos, keyword arguments, visible [B, T, S]) of one mask kind."""
  rng = np.random.default_rng(0)
  kv_heads = {"causal_gqa_segments": 2, "causal_mqa_window": 1, "padded_cache": 4}[name]
  q = rng.normal(size=(B, T, N, H)).astype(np.float32)
  k, v = (rng.normal(size=(B, T, kv_heads, H)).astype(np.float32) for _ in range(2))
  index = np.arange(T)
  pos = np.broadcast_to(index, (B, T))
  causal_TS = index[None, :] <= index[:, None]
  if name == "causal_gqa_segments":
    seg = np.repeat([[1, 2, 3, 4], [1, 1, 2, 2]], [10, 50, 60, 8], axis=1)
    kwargs = dict(causal=True, window=None, segment_ids_BT=jnp.asarray(seg, jnp.int32))
    return q, k, v, pos, pos, kwargs, causal_TS[None] & (seg[:, :, None] == seg[:, None, :])
  if name == "causal_mqa_window":
    window_TS = index[:, None] - index[None, :] < 20
    return q, k, v, pos, pos, dict(causal=True, window=20), np.broadcast_to(causal_TS & window_TS, (B, T, T))
  # 16 new queries over a 128-slot KV cache whose first row is left-padded (position -1).
  k_pos = np.stack([np.r_[[-1] * 40, np.arange(88)], index])
  q_pos = k_pos[:, -16:]
  visible = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])
  return q[:, -16:], k, v, q_pos, k_pos, dict(causal=False, window=None), visible


SPLASH = pytest.param("splash", marks=pytest.mark.slow)  # Pallas's interpreter: seconds per case


@pytest.mark.parametrize("impl", ["xla_cpu", "reference", "blockwise", "auto", SPLASH])
@pytest.mark.parametrize("name", ["causal_gqa_segments", "causal_mqa_window", "padded_cache"])
def test_every_implementation_matches_numpy(monkeypatch, impl, name):
  """fp32 values and gradients to 1e-5 of the largest: causal masks, GQA/MQA, a sliding window,
  packed segments, left padding over a KV cache. blockwise runs in 32-row tiles (4 x 4 blocks)."""
  monkeypatch.setattr(blockwise_attention, "_MAX_BLOCK", 32)
  q, k, v, q_pos, k_pos, kwargs, visible = case(name)
  dout = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)

  def attend(q, k, v):
    return attention_lib.attention(
      q, k, v, jnp.asarray(q_pos), jnp.asarray(k_pos), impl=impl, operand_dtype=jnp.float32, **kwargs
    )

  out, pullback = jax.jit(lambda q, k, v: jax.vjp(attend, q, k, v))(q, k, v)
  got = (out, *pullback(jnp.asarray(dout)))
  for what, g, e in zip(("out", "dq", "dk", "dv"), got, numpy_attention_vjp(q, k, v, visible, dout)):
    np.testing.assert_allclose(g, e, rtol=0, atol=1e-5 * np.abs(e).max(), err_msg=what)


@pytest.mark.parametrize("name", ["causal_gqa_segments", "causal_mqa_window", "padded_cache"])
def test_cudnn_arguments_describe_the_same_mask(name):
  """What `cudnn` passes to jax.nn.dot_product_attention (is_causal, local_window_size, a boolean
  mask) means the same mask: run through JAX's XLA implementation it matches numpy."""
  q, k, v, q_pos, k_pos, kwargs, visible = case(name)
  arguments = accelerator_attention.cudnn_arguments(
    q, k, v, jnp.asarray(q_pos), jnp.asarray(k_pos), operand_dtype=jnp.float32, **kwargs
  )
  out = jax.nn.dot_product_attention(**arguments, implementation="xla")
  expected = numpy_attention_vjp(q, k, v, visible, np.zeros(q.shape))[0]
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_auto_chooses_per_backend_and_shape(monkeypatch):
  """Without the flash_cpu kernel (its own choices: test_flash_attention_cpu.py)."""
  monkeypatch.setattr(decode_kernels, "flash_attention_dtypes", lambda: ())
  choose = attention_lib.auto_impl
  short, long = attention_lib.CPU_BLOCKWISE_FROM - 1, attention_lib.CPU_BLOCKWISE_FROM
  assert choose("cpu", short, 64, True, False, "bfloat16") == "xla_cpu"
  assert choose("cpu", long, 64, True, False, "bfloat16") == "blockwise"
  assert choose("gpu", 2048, 64, True, True, "bfloat16") == "xla_cpu"  # dropout: the only one with it
  assert choose("gpu", 2048, 64, True, False, "bfloat16") == "cudnn"
  assert choose("gpu", 2048, 64, True, False, "float32") == "blockwise"  # cuDNN: bf16/fp16 only
  assert choose("gpu", 2048, 60, True, False, "bfloat16") == "blockwise"  # head dim not a multiple of 8
  assert choose("gpu", 1, 64, False, False, "bfloat16") == "reference"  # decode over a KV cache
  assert choose("tpu", 2048, 64, True, False, "bfloat16") == "splash"
  assert choose("tpu", 2000, 64, True, False, "bfloat16") == "blockwise"  # not a multiple of 128
  assert choose("tpu", 1, 64, False, False, "bfloat16") == "reference"


def test_implementations_refuse_what_they_cannot_do_when_the_config_is_made():
  small = dict(vocab_size=8, d_model=32, n_layers=1, n_heads=2)
  with pytest.raises(ValueError, match="attention_impl='cudnn' needs bf16 or fp16 matmul operands"):
    M.ModelConfig(**small, attention_impl="cudnn")
  with pytest.raises(ValueError, match="attention_impl='cudnn' needs a head dim that is a multiple of 8"):
    M.ModelConfig(**small, head_dim=12, attention_impl="cudnn", dtype="bfloat16")
  for impl in ("reference", "blockwise", "cudnn", "splash"):
    with pytest.raises(ValueError, match=f"attention_impl='{impl}' has no attention dropout"):
      M.ModelConfig(**small, attn_dropout=0.1, attention_impl=impl, dtype="bfloat16")
  M.ModelConfig(**small, attn_dropout=0.1)  # auto: xla_cpu, which has dropout


@pytest.mark.parametrize("T", [1, 3])  # T=1: a decode step, the C++ kernel on a CPU
@pytest.mark.parametrize("window", [None, 3])
def test_cached_attention_equals_numpy_over_the_cache_layouts(window, T):
  """cached_attention over keys [B, K, H, S] and values [B, K, S, H] (GQA: 4 query heads on 2 KV heads),
  empty slots (position -1) and a ring's out-of-order positions, against a numpy softmax per head."""
  rng = np.random.default_rng(0)
  B, N, K, H, S = 2, 4, 2, 8, 7
  q = rng.normal(size=(B, T, N, H)).astype(np.float32)
  k_BSKH, v_BSKH = (rng.normal(size=(B, S, K, H)).astype(np.float32) for _ in range(2))
  k_pos = np.array([[0, 1, 2, 3, 4, -1, -1], [7, 8, 2, 3, 4, 5, 6]], np.int32)
  q_pos = np.array([[2, 3, 4], [6, 7, 8]], np.int32)[:, :T]  # T=1: filled slots after the query too
  got = attention_lib.cached_attention(
    jnp.asarray(q),
    jnp.asarray(k_BSKH.transpose(0, 2, 3, 1)),
    jnp.asarray(v_BSKH.transpose(0, 2, 1, 3)),
    jnp.asarray(q_pos),
    jnp.asarray(k_pos),
    window,
  )
  want = np.zeros_like(q)
  for b, t, n in np.ndindex(B, T, N):
    visible = (k_pos[b] >= 0) & (k_pos[b] <= q_pos[b, t])
    if window is not None:
      visible &= q_pos[b, t] - k_pos[b] < window
    scores = k_BSKH[b, :, n // (N // K)] @ q[b, t, n] / np.sqrt(H)
    p = np.where(visible, np.exp(scores - scores[visible].max()), 0.0)
    want[b, t, n] = (p / p.sum()) @ v_BSKH[b, :, n // (N // K)]
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)
