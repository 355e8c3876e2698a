"""The kernel seam (ops/): every attention and matmul implementation gives the reference's values and
gradients, and the model computes the same with any of them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmjax import model as M
from lmjax.ops import attention as attention_lib, matmul as matmul_lib


def qkv(n_heads=4, kv_heads=2, T=16, H=8, B=2, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(B, T, n_heads, H)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(B, T, kv_heads, H)), jnp.float32) for _ in range(2))
  return q, k, v


def values_and_grads(fn, q, k, v, seed=1):
  dout = jnp.asarray(np.random.default_rng(seed).normal(size=q.shape), jnp.float32)
  out, pullback = jax.vjp(fn, q, k, v)
  return (out, *pullback(dout))


def assert_close(got, expected, tol):
  for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
    np.testing.assert_allclose(g, e, rtol=0, atol=tol * float(jnp.abs(e).max()), err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("blocks", [1, 2, 4])
@pytest.mark.parametrize("kv_heads,window", [(4, None), (2, None), (1, 5)])
def test_blocked_causal_attention_matches_the_reference(blocks, kv_heads, window):
  """The xla_cpu block split (blocks above the diagonal skipped, its own VJP) against
  the reference implementation (jax.nn.dot_product_attention), values and gradients, with GQA/MQA and a
  sliding window."""
  q, k, v = qkv(kv_heads=kv_heads)
  pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
  common = dict(causal=True, window=window, dropout=None, operand_dtype=jnp.float32)
  got = jax.jit(
    lambda: values_and_grads(
      lambda q, k, v: attention_lib._blocked(q, k, v, pos, pos, blocks=blocks, **common), q, k, v
    )
  )()
  expected = jax.jit(
    lambda: values_and_grads(
      lambda q, k, v: attention_lib.attention(q, k, v, pos, pos, impl="reference", **common), q, k, v
    )
  )()
  assert_close(got, expected, 1e-5)


@pytest.mark.parametrize("operand_dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 0.03)])
def test_position_masked_attention_matches_the_reference(operand_dtype, tol):
  """Left padding (position -1) and a KV cache longer than the queries: the mask from positions."""
  q, k, v = qkv(T=16)
  q = q[:, -4:]  # 4 new queries over 16 cache slots
  k_pos = jnp.asarray([[-1] * 6 + list(range(10)), list(range(16))], jnp.int32)
  q_pos = k_pos[:, -4:]
  common = dict(causal=False, window=None, dropout=None, operand_dtype=operand_dtype)
  got, expected = (
    jax.jit(
      lambda impl=impl: values_and_grads(
        lambda q, k, v: attention_lib.attention(q, k, v, q_pos, k_pos, impl=impl, **common), q, k, v
      )
    )()
    for impl in ("xla_cpu", "reference")
  )
  assert_close(got, expected, tol)


@pytest.mark.parametrize("w_is_NK", [False, True])
def test_matmul_implementations_agree(w_is_NK):
  """matmul_fp32_accumulate (xla_cpu) against jnp.dot with fp32 accumulation and JAX's autodiff (xla),
  bf16 operands: the same values (to fp32 rounding); gradients within bf16 rounding of the cotangent."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 24)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 24) if w_is_NK else (24, 16)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)

  def run(impl):
    f = lambda x, w: matmul_lib.matmul(x, w, jnp.bfloat16, w_is_NK, impl=impl)
    out, pullback = jax.vjp(f, x, w)
    return (out, *pullback(g))

  got, expected = jax.jit(lambda: run("xla_cpu"))(), jax.jit(lambda: run("xla"))()
  np.testing.assert_allclose(got[0], expected[0], rtol=1e-6, atol=1e-6)  # fp32 sums in another order
  for name, a, b in zip(("dx", "dw"), got[1:], expected[1:]):
    np.testing.assert_allclose(a, b, rtol=0, atol=0.02 * float(jnp.abs(b).max()), err_msg=name)


@pytest.mark.slow
def test_the_model_computes_the_same_with_either_kernel():
  """The Transformer's logits and parameter gradients with the reference kernels (attention_impl
  'reference', matmul_impl 'xla') and with blockwise attention equal xla_cpu's (fp32: to rounding)."""
  base = dict(vocab_size=37, max_len=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 37)
  params = M.init_params(M.ModelConfig(**base), jax.random.key(1))

  def run(**impls):
    cfg = M.ModelConfig(**base, **impls)
    loss = lambda p: M.Transformer(cfg).apply({"params": p}, tokens).std()
    return jax.jit(jax.value_and_grad(loss))(params)

  a, grads_a = run(attention_impl="xla_cpu")
  for impls in (dict(attention_impl="reference", matmul_impl="xla"), dict(attention_impl="blockwise")):
    b, grads_b = run(**impls)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_causal_query_blocks_divide_the_sequence():
  assert [attention_lib.causal_query_blocks(t) for t in (8, 64, 127, 128, 192, 256, 1024, 4096)] == [
    1,
    1,
    1,
    2,
    3,
    4,
    8,
    8,
  ]


def test_unknown_kernels_are_refused():
  with pytest.raises(
    ValueError,
    match=r"model.attention_impl='flash' is not supported; allowed values: \['auto', 'blockwise', ",
  ):
    M.ModelConfig(attention_impl="flash")
  with pytest.raises(ValueError, match=r"model.matmul_impl='cublas' is not supported"):
    M.ModelConfig(matmul_impl="cublas")


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["auto", "xla_cpu", "reference", "blockwise", "flash_cpu", "splash"])
def test_every_kernel_lowers_for_gpu_and_tpu_from_this_host(impl):
  """jax.export of a bf16-matmul training gradient for cuda and tpu (splash: tpu only, its Pallas
  kernel): the XLA:CPU layout pins are chosen per lowering platform, so nothing CPU-only reaches an
  accelerator's program. cudnn cannot be traced without cuDNN (BUILD_NOTES)."""
  cfg = M.ModelConfig(
    vocab_size=64,
    max_len=128,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    d_ff=128,
    attention_impl=impl,
    matmul_impl=impl if impl in matmul_lib.MATMUL_IMPLS else "xla",
    matmul_dtype="bfloat16",
  )
  params = M.init_params(cfg, jax.random.key(0))
  grad = jax.jit(jax.grad(lambda p, t: M.Transformer(cfg).apply({"params": p}, t).mean()))
  # Packed documents: the segment mask and per-document positions lower too.
  packed = jax.jit(
    jax.grad(
      lambda p, t, s: M.Transformer(cfg).apply({"params": p}, t, positions_BT=t, segment_ids_BT=s).mean()
    )
  )
  tokens = jnp.zeros((2, 128), jnp.int32)
  for platform in ("tpu",) if impl == "splash" else ("cuda", "tpu"):
    exported = jax.export.export(grad, platforms=[platform])(params, tokens)
    assert exported.platforms == (platform,)
    assert jax.export.export(packed, platforms=[platform])(params, tokens, tokens).platforms == (platform,)


@pytest.mark.parametrize("kv_heads,window,segments", [(4, None, False), (2, None, True), (1, 9, True)])
def test_blockwise_attention_matches_the_reference_over_several_blocks(
  monkeypatch, kv_heads, window, segments
):
  """The blockwise (flash-style) implementation with 16-row tiles (4 query x 4 key blocks, causal
  blocks above the diagonal skipped) against the reference: values and gradients, with GQA/MQA,
  a sliding window and packed segments."""
  from lmjax.ops import blockwise_attention

  monkeypatch.setattr(blockwise_attention, "_MAX_BLOCK", 16)
  q, k, v = qkv(kv_heads=kv_heads, T=64)
  pos = jnp.broadcast_to(jnp.arange(64), (2, 64))
  seg = jnp.asarray(np.repeat([[1, 2, 3, 4], [1, 1, 2, 2]], [10, 20, 30, 4], axis=1)) if segments else None
  common = dict(causal=True, window=window, dropout=None, operand_dtype=jnp.float32, segment_ids_BT=seg)
  got, expected = (
    jax.jit(
      lambda impl=impl: values_and_grads(
        lambda q, k, v: attention_lib.attention(q, k, v, pos, pos, impl=impl, **common), q, k, v
      )
    )()
    for impl in ("blockwise", "reference")
  )
  assert_close(got, expected, 1e-5)


def test_blockwise_attention_with_padding_and_a_longer_key_cache(monkeypatch):
  """Position masks (left padding -1, 8 new queries over 48 keys) in 16-row tiles, fp32 and bf16."""
  from lmjax.ops import blockwise_attention

  monkeypatch.setattr(blockwise_attention, "_MAX_BLOCK", 16)
  q, k, v = qkv(T=48)
  q = q[:, -16:]
  k_pos = jnp.asarray([[-1] * 20 + list(range(28)), list(range(48))], jnp.int32)
  q_pos = k_pos[:, -16:]
  for operand_dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 0.03)):
    common = dict(causal=False, window=None, dropout=None, operand_dtype=operand_dtype)
    got, expected = (
      jax.jit(
        lambda impl=impl, common=common: values_and_grads(
          lambda q, k, v: attention_lib.attention(q, k, v, q_pos, k_pos, impl=impl, **common), q, k, v
        )
      )()
      for impl in ("blockwise", "reference")
    )
    assert_close(got, expected, tol)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["auto", "xla_cpu", "reference", "blockwise", "flash_cpu"])
def test_prefill_and_decode_lower_for_gpu_and_tpu_from_this_host(impl):
  """jax.export of the sampler's prefill (the KV cache filled from padded prompts) and its decode
  loop for cuda and tpu, so sampling on an accelerator meets no lowering error."""
  from lmjax.inference import sampler

  cfg = M.ModelConfig(
    vocab_size=64, max_len=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, attention_impl=impl
  )
  params = M.init_params(cfg, jax.random.key(0))
  tokens = jnp.zeros((2, 16), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  static = dict(num_new=8, sampling=sampler.SamplingConfig(temperature=0.8, top_k=5), eos_id=1, pad_id=0)
  state = sampler.prefill(cfg, params, tokens, positions, jax.random.PRNGKey(0), **static)
  del static["num_new"]
  for platform in ("cuda", "tpu"):
    exported = jax.export.export(
      jax.jit(lambda p, t, pos, r: sampler.prefill(cfg, p, t, pos, r, num_new=8, **static)),
      platforms=[platform],
    )(params, tokens, positions, jax.random.PRNGKey(0))
    assert exported.platforms == (platform,)
    exported = jax.export.export(
      jax.jit(lambda p, s: sampler.decode(cfg, p, s, 8, **static)), platforms=[platform]
    )(params, state)
    assert exported.platforms == (platform,)


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_chunked_cross_entropy_equals_the_full_logits_loss(monkeypatch, tie_embeddings):
  """The model's loss computed in 4 chunks of the sequence (logits remade in the backward) against
  optax's cross-entropy of the full logits: the same sum, count and parameter gradients."""
  from lmjax.model import chunked_loss

  cfg = M.ModelConfig(
    vocab_size=37, max_len=16, d_model=32, n_layers=2, n_heads=4, d_ff=48, tie_embeddings=tie_embeddings
  )
  params = M.init_params(cfg, jax.random.key(1))
  tokens, targets = jax.random.randint(jax.random.key(0), (2, 2, 16), 0, 37)
  mask = (jax.random.uniform(jax.random.key(2), (2, 16)) > 0.3).astype(jnp.float32)
  assert chunked_loss.chunk_length(2, 16, 37) == 16  # a small vocabulary is not chunked
  monkeypatch.setattr(chunked_loss, "MIN_VOCAB", 0)
  monkeypatch.setattr(chunked_loss, "MAX_CHUNK_LOGITS", 2 * 4 * 37)
  assert chunked_loss.chunk_length(2, 16, 37) == 4

  def chunked(p):
    return M.Transformer(cfg).apply({"params": p}, tokens, targets_BT=targets, loss_mask_BT=mask)

  def full(p):
    logits = M.Transformer(cfg).apply({"params": p}, tokens)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return (ce * mask).sum(), mask.sum()

  (got, count), grads = jax.jit(jax.value_and_grad(chunked, has_aux=True))(params)
  (expected, expected_count), expected_grads = jax.jit(jax.value_and_grad(full, has_aux=True))(params)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert count == expected_count
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, expected_grads)
