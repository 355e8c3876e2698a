"""flash_cpu, the C++ FlashAttention-2 kernel for CPUs: values and gradients against the float64 numpy
reference (fp32 to 1e-5 of the largest, bf16 to its rounding), its masks (GQA, packed segments whose
boundaries fall inside and between tiles, sliding windows), the calls it hands to xla_cpu, what `auto`
picks, and its export for accelerators (the CPU kernel must not reach a GPU or TPU lowering)."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention_impls import numpy_attention_vjp

from lmjax.ops import attention as attention_lib, decode_kernels, flash_attention_cpu

pytestmark = pytest.mark.skipif(
  os.environ.get("LMJAX_DECODE_KERNEL") == "0" or "float32" not in decode_kernels.flash_attention_dtypes(),
  reason="the flash attention kernel needs the C++ kernels built with AVX-512",
)
needs_bf16 = pytest.mark.skipif(
  "bfloat16" not in decode_kernels.flash_attention_dtypes(), reason="bf16 needs AVX-512 BF16"
)


def inputs(T, N, K, H, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(2, T, N, H)).astype(np.float32)
  k, v = (rng.normal(size=(2, T, K, H)).astype(np.float32) for _ in range(2))
  dout = rng.normal(size=(2, T, N, H)).astype(np.float32)
  return q, k, v, dout


def visible_of(T, segments, window):
  """[B, T, S] float64-reference mask of causal self-attention with segments and a window."""
  index = np.arange(T)
  visible = index[None, :] <= index[:, None]
  if window:
    visible &= index[:, None] - index[None, :] < window
  return visible[None] & (segments[:, :, None] == segments[:, None, :])


def flash_vjp(q, k, v, dout, segments, window, dtype):
  def attend(q, k, v):
    return flash_attention_cpu.flash(q, k, v, jnp.asarray(segments), window, dtype)

  out, pullback = jax.jit(lambda q, k, v: jax.vjp(attend, q, k, v))(q, k, v)
  return (out, *pullback(jnp.asarray(dout)))


SEGMENTS = {
  "one document": lambda T: np.zeros((2, T), np.int32),
  # Boundaries inside tiles (row 0) and on tile edges, where whole tiles are skipped (row 1).
  "packed": lambda T: np.stack(
    [np.repeat([1, 2, 3], [10, T - 10 - T // 3, T // 3]), np.repeat([5, 6], [64, T - 64])]
  ),
}


@pytest.mark.parametrize("segments", SEGMENTS)
@pytest.mark.parametrize("window", [None, 70, 5, 200])
@pytest.mark.parametrize(
  "shape", [(192, 4, 2, 64), (128, 3, 1, 16), (128, 2, 2, 48), (64, 2, 1, 128), (512, 2, 1, 16)]
)
def test_fp32_values_and_gradients_equal_numpy(shape, window, segments):
  """T (1-8 tiles), N query heads over K KV heads (GQA, MQA, plain), head dims 16-128 (128: two
  column blocks of the tile matmul); window 200 leaves whole tiles inside it at T = 512."""
  T, N, K, H = shape
  q, k, v, dout = inputs(T, N, K, H)
  ids = SEGMENTS[segments](T)
  got = flash_vjp(q, k, v, dout, ids, window, jnp.float32)
  expected = numpy_attention_vjp(q, k, v, visible_of(T, ids, window), dout)
  for what, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
    np.testing.assert_allclose(g, e, rtol=0, atol=1e-5 * np.abs(e).max(), err_msg=what)


@needs_bf16
@pytest.mark.parametrize("window", [None, 70])
def test_bf16_operands_equal_numpy_to_their_rounding(window):
  """bf16 q, k, v and dO with fp32 sums: within 2% of the largest value of the numpy reference taken
  over the same rounded inputs (P and dS are rounded to bf16 for their matmuls, as xla_cpu rounds them)."""
  T, N, K, H = 192, 4, 2, 64
  q, k, v, dout = (np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)) for x in inputs(T, N, K, H))
  ids = SEGMENTS["packed"](T)
  got = flash_vjp(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, dout)), ids, window, jnp.bfloat16)
  expected = numpy_attention_vjp(q, k, v, visible_of(T, ids, window), dout)
  for what, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
    assert g.dtype == jnp.bfloat16, what
    np.testing.assert_allclose(g.astype(np.float32), e, rtol=0, atol=2e-2 * np.abs(e).max(), err_msg=what)


@pytest.mark.parametrize("T, causal", [(128, True), (100, True), (64, False)])
def test_attention_routes_calls_the_kernel_cannot_take_to_xla_cpu(T, causal):
  """impl="flash_cpu": a kernel call for causal T % 64 == 0; T = 100 (not a multiple of 64) and
  attention by positions (not causal, as over a KV cache) run xla_cpu and still equal numpy."""
  q, k, v, dout = inputs(T, 2, 1, 16)
  pos = jnp.broadcast_to(jnp.arange(T), (2, T))

  def attend(q, k, v):
    return attention_lib.attention(
      q, k, v, pos, pos, causal=causal, impl="flash_cpu", operand_dtype=jnp.float32
    )

  hlo = jax.jit(attend).lower(q, k, v).as_text()
  assert ("lmjax_flash_forward" in hlo) == (T == 128 and causal)
  out, pullback = jax.vjp(attend, q, k, v)
  expected = numpy_attention_vjp(q, k, v, visible_of(T, np.zeros((2, T)), None), dout)
  for g, e in zip((out, *pullback(jnp.asarray(dout))), expected):
    np.testing.assert_allclose(g, e, rtol=0, atol=1e-5 * np.abs(e).max())


def test_auto_takes_the_kernel_from_1024_positions_where_the_build_takes_the_dtype(monkeypatch):
  choose = attention_lib.auto_impl
  flash_from = attention_lib.CPU_FLASH_FROM
  monkeypatch.setattr(decode_kernels, "flash_attention_dtypes", lambda: ("float32", "bfloat16"))
  assert choose("cpu", flash_from, 64, True, False, "bfloat16") == "flash_cpu"
  assert choose("cpu", 16384, 64, True, False, "float32") == "flash_cpu"
  assert choose("cpu", flash_from - 64, 64, True, False, "bfloat16") == "xla_cpu"  # short: no gain
  assert choose("cpu", flash_from + 1, 64, True, False, "bfloat16") == "xla_cpu"  # not a multiple of 64
  assert choose("cpu", flash_from, 64, True, True, "bfloat16") == "xla_cpu"  # attention dropout
  assert choose("cpu", 16384, 8, True, False, "bfloat16") == "blockwise"  # head dim 8: O(T) memory still
  assert choose("gpu", 2048, 64, True, False, "bfloat16") == "cudnn"
  assert choose("cpu", 16384, 64, True, False, "float16") == "blockwise"  # a dtype the build lacks
  monkeypatch.setattr(jax, "device_count", lambda: 8)  # a mesh: the kernel has no sharding rule
  assert choose("cpu", flash_from, 64, True, False, "bfloat16") == "xla_cpu"
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  monkeypatch.setattr(decode_kernels, "flash_attention_dtypes", lambda: ("float32",))  # no AVX-512 BF16
  assert choose("cpu", flash_from, 64, True, False, "bfloat16") == "xla_cpu"


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_exports_for_accelerators_without_the_cpu_kernel(platform):
  """The kernel is the CPU branch of a platform_dependent: an accelerator export lowers xla_cpu."""
  T, N, H = 128, 2, 16
  q = jax.ShapeDtypeStruct((1, T, N, H), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(T), (1, T))

  def loss(q, k, v):
    out = attention_lib.attention(
      q, k, v, pos, pos, causal=True, impl="flash_cpu", operand_dtype=jnp.bfloat16
    )
    return out.sum()

  exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=[platform])(q, q, q)
  assert "lmjax_flash" not in exported.mlir_module()


def largest_score_block(mlir: str) -> int:
  """The largest a x b over the float tensors of an exported program, a and b its two trailing dims:
  the biggest block of attention scores it holds at once."""
  blocks = [int(a) * int(b) for a, b in re.findall(r"tensor<(?:\d+x)*(\d+)x(\d+)x(?:f32|bf16|f16)>", mlir)]
  return max(blocks, default=0)


def test_accelerator_branch_of_long_sequences_is_blockwise():
  """flash_cpu's non-CPU branch from CPU_BLOCKWISE_FROM positions is blockwise (O(T) memory: 512 x 512
  score tiles), not xla_cpu's [1024, S] score blocks. The same measure on xla_cpu's export shows what it
  tells apart."""
  T = attention_lib.CPU_BLOCKWISE_FROM
  q = jax.ShapeDtypeStruct((1, T, 1, 16), jnp.bfloat16)
  pos = jnp.broadcast_to(jnp.arange(T), (1, T))

  def exported(impl):
    def out(q):
      return attention_lib.attention(q, q, q, pos, pos, causal=True, impl=impl, operand_dtype=jnp.bfloat16)

    return jax.export.export(jax.jit(out), platforms=["cuda"])(q).mlir_module()

  assert largest_score_block(exported("xla_cpu")) >= 1024 * T
  assert largest_score_block(exported("flash_cpu")) <= 512 * 512


@pytest.mark.parametrize("scan_layers, remat", [(True, "full"), (False, "none")])
def test_the_model_trains_the_same_with_flash_cpu(scan_layers, remat):
  """The Transformer's loss and parameter gradients, plain and over packed documents, with flash_cpu
  equal xla_cpu's (fp32, to rounding), scanned with full remat and unrolled."""
  from lmjax import model as M

  base = dict(vocab_size=37, max_len=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96)
  base.update(scan_layers=scan_layers, remat=remat)
  tokens = jax.random.randint(jax.random.key(0), (2, 128), 0, 37)
  segments = jnp.asarray(SEGMENTS["packed"](128))
  positions = jnp.concatenate([jnp.arange(10), jnp.arange(76), jnp.arange(42)])[None].repeat(2, 0)
  params = M.init_params(M.ModelConfig(**base), jax.random.key(1))

  def run(impl, **packing):
    cfg = M.ModelConfig(**base, attention_impl=impl)
    loss = lambda p: M.Transformer(cfg).apply({"params": p}, tokens, **packing).std()
    step = jax.jit(jax.value_and_grad(loss))
    assert ("lmjax_flash_backward" in step.lower(params).as_text()) == (impl == "flash_cpu")
    return step(params)

  for packing in ({}, dict(positions_BT=positions, segment_ids_BT=segments)):
    a, grads_a = run("xla_cpu", **packing)
    b, grads_b = run("flash_cpu", **packing)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_flash_refuses_an_operand_dtype_the_build_lacks():
  q = jnp.zeros((1, 64, 2, 16), jnp.float16)
  with pytest.raises(
    ValueError, match="takes operand dtypes .* not float16; use model.attention_impl='xla_cpu'"
  ):
    flash_attention_cpu.flash(q, q, q, None, None, jnp.float16)


def test_the_kernel_refuses_operands_in_the_wrong_layout():
  """Packed K/V swapped (by row where by dim belongs): the kernel's shape check, not wrong values."""
  T, H = 128, 32
  q = jnp.zeros((1, T, 2, H), jnp.float32)
  k = jnp.zeros((1, T, 1, H), jnp.float32)
  results = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((1, 2, T), jnp.float32))
  call = jax.ffi.ffi_call("lmjax_flash_forward", results, vmap_method="sequential")
  ids = jnp.zeros((1, T), jnp.int32)
  swapped = (flash_attention_cpu._by_row(k), flash_attention_cpu._by_dim(k))
  with pytest.raises(Exception, match="by dim is not"):
    jax.block_until_ready(call(q, *swapped, ids, window=np.int64(0)))
