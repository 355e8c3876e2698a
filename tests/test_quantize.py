"""int8/int4 weight-only quantization (ops/quantized.py, model/quantize.py, GGUF blocks in gguf.py),
against numpy re-implementations of the formulas and against the `gguf` package's own dequantizer."""

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pretrained import needs_smollm2

from lmjax import model, pretrained
from lmjax.inference import sampler
from lmjax.model import quantize
from lmjax.ops import decode_kernels, quantized
from lmjax.pretrained import gguf as gguf_loader


def np_unpack_int4(packed_NB: np.ndarray) -> np.ndarray:
  """Two's-complement nibbles, element 2i low and 2i+1 high, written out with integer arithmetic."""
  b = packed_NB.astype(np.int16) & 0xFF
  lo, hi = b & 0xF, b >> 4
  lo, hi = np.where(lo >= 8, lo - 16, lo), np.where(hi >= 8, hi - 16, hi)
  out = np.empty((*packed_NB.shape[:-1], packed_NB.shape[-1] * 2), np.int16)
  out[..., 0::2], out[..., 1::2] = lo, hi
  return out


def np_dequantize(w: quantized.QuantizedWeight) -> np.ndarray:
  q = np_unpack_int4(np.asarray(w.values)) if w.bits == 4 else np.asarray(w.values, np.int16)
  scale = np.repeat(np.asarray(w.scale, np.float64), w.group_size, axis=-1)
  offset = 0 if w.offset is None else np.repeat(np.asarray(w.offset, np.float64), w.group_size, axis=-1)
  return q * scale + offset


@pytest.mark.parametrize(
  "bits,group,asymmetric", [(8, None, False), (8, 32, False), (4, 32, False), (4, 64, True), (8, 64, True)]
)
def test_quantized_matmul_equals_numpy_dequantize_then_matmul(bits, group, asymmetric):
  rng = np.random.default_rng(bits + (group or 0))
  w_NK = rng.normal(size=(48, 128)).astype(np.float32)
  w = quantized.quantize(w_NK, bits, group, (128, 48), 1, asymmetric)
  q = np_unpack_int4(np.asarray(w.values)) if bits == 4 else np.asarray(w.values)
  half = 2 ** (bits - 1)
  if asymmetric:  # each group's smallest and largest weights land on the end levels
    assert (q.min(), q.max()) == (-half, half - 1)
    np.testing.assert_allclose(np_dequantize(w).min(-1), w_NK.min(-1), atol=1e-5)
  else:  # the largest |w| lands on the top level
    assert np.abs(q).max() == half - 1
  assert w.scale.shape == (48, 128 // (group or 128))
  # Round to nearest: no weight is more than half a step from its level.
  step = np.repeat(np.asarray(w.scale), group or 128, axis=-1)
  assert np.all(np.abs(np_dequantize(w) - w_NK) <= step / 2 + 1e-6)
  # XLA's dot and the decode kernel (CPU) equal dequantize-then-matmul, except that the kernel may take
  # its integer path, which also rounds x to int8 (test_decode_kernels checks it exactly): here within 1%
  # of the output's scale.
  for M in (1, 5):
    x_MK = rng.normal(size=(M, 128)).astype(np.float32)
    want = x_MK @ np_dequantize(w).T
    np.testing.assert_allclose(jax.jit(quantized._xla_matmul)(x_MK, w), want, rtol=1e-5, atol=1e-4)
    got = np.asarray(jax.jit(quantized.matmul)(jnp.asarray(x_MK), w))
    if decode_kernels.rounds_int8_activations():  # every group here is a multiple of 32
      assert np.abs(got - want).max() <= 0.01 * np.abs(want).max()
    else:
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_int4_packing_layout():
  q = np.array([[1, -2, -8, 7]], np.int8)
  packed = np.asarray(quantized.pack_int4(q))
  # byte 0: low nibble 1, high nibble -2 (0xE) -> 0xE1; byte 1: low -8 (0x8), high 7 -> 0x78
  assert packed.view(np.uint8).tolist() == [[0xE1, 0x78]]
  assert np.asarray(quantized.unpack_int4(packed)).tolist() == q.tolist()


def test_bad_quantization_settings_are_named():
  with pytest.raises(ValueError, match="bits=3 is not supported"):
    quantized.quantize(np.ones((4, 8)), 3, None, (8, 4), 1)
  with pytest.raises(ValueError, match="group_size=3 must divide the input dimension 8"):
    quantized.quantize(np.ones((4, 8)), 8, 3, (8, 4), 1)
  with pytest.raises(ValueError, match="quantized dtype 'int2' is not supported"):
    quantize.quantize_params({}, "int2")


CONFIGS = {
  "scan-tied-gqa": dict(scan_layers=True, tie_embeddings=True, n_kv_heads=2),
  "unrolled-untied-mha": dict(scan_layers=False, tie_embeddings=False, n_kv_heads=None),
}


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("layout", list(CONFIGS))
def test_quantized_transformer_computes_the_dequantized_model(dtype, layout):
  cfg = model.ModelConfig(
    vocab_size=96, d_model=64, n_layers=2, n_heads=4, d_ff=128, mlp="swiglu", **CONFIGS[layout]
  )
  params = model.init_params(cfg, jax.random.key(1))
  params_q = quantize.quantize_params(params, dtype)
  assert quantize.is_quantized(params_q)
  float_params = quantize.dequantize_params(params_q)
  # Every matrix was quantized (its dequantized copy differs from the original, within the steps) and
  # norms were not.
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_d = dict(jax.tree_util.tree_flatten_with_path(float_params)[0])
  for path, w in flat:
    changed = not np.array_equal(np.asarray(w), np.asarray(flat_d[path]))
    assert changed == (getattr(path[-1], "key", "") in quantize.MATRICES), path
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 12)), jnp.int32)
  apply = jax.jit(lambda p, t: model.Transformer(cfg).apply({"params": p}, t))
  np.testing.assert_allclose(apply(params_q, tokens), apply(float_params, tokens), rtol=1e-5, atol=1e-5)
  # Greedy decoding with the KV cache picks the same tokens as the float model it stands for.
  prompts = [[3, 4, 5], [7, 8]]
  greedy = sampler.SamplingConfig(temperature=0.0)
  out_q = sampler.generate_tokens(cfg, params_q, prompts, 10, greedy, eos_id=-1).tokens
  out_f = sampler.generate_tokens(cfg, float_params, prompts, 10, greedy, eos_id=-1).tokens
  assert out_q == out_f


@pytest.mark.parametrize("dtype", ["float32", "int8", "int4", "bfloat16", "fp32-weights-bf16-compute"])
@pytest.mark.parametrize("layout", list(CONFIGS))
def test_decoding_layout_computes_the_same_model(dtype, layout):
  """for_decoding: layers unrolled (one KV buffer per layer), fp32 matrices stored [N, K] (their
  transposes, unscaled), others as they were; logits, cached decoding and the declared weights (through
  dequantize_params and a re-stack) are the original model's."""
  cfg = model.ModelConfig(
    vocab_size=96, d_model=64, n_layers=2, n_heads=4, d_ff=128, mlp="swiglu", **CONFIGS[layout]
  )
  params = model.init_params(cfg, jax.random.key(1))
  if dtype == "fp32-weights-bf16-compute":  # matrices stay as declared: bf16 matmuls, unchanged
    cfg = dataclasses.replace(cfg, dtype="bfloat16")
  if dtype in ("int8", "int4"):
    params = quantize.quantize_params(params, dtype)
  elif dtype == "bfloat16":
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  cfg_d, params_d = quantize.for_decoding(cfg, params)
  assert not cfg_d.scan_layers and "blocks" not in params_d
  wq = params_d["block_1"]["attn"]["wq"]
  layer_1 = jax.tree.map(lambda a: a[1], params["blocks"]) if cfg.scan_layers else params["block_1"]
  wq_1 = layer_1["attn"]["wq"]
  if dtype == "float32":  # [D, N, H] declared -> [N*H, D] stored
    assert not wq.is_integer and wq.values.shape == (64, 64)
    np.testing.assert_array_equal(np.asarray(wq.values), np.asarray(wq_1).reshape(64, 64).T)
  elif dtype in ("int8", "int4"):  # in tiles where the kernel reads them (tests/test_tiled_weights.py)
    np.testing.assert_array_equal(np.asarray(quantized.row_values(wq)), np.asarray(wq_1.values))
  else:
    assert wq.dtype == wq_1.dtype and wq.shape == wq_1.shape
  assert quantize.is_quantized(params_d) == (dtype in ("int8", "int4"))
  cfg_again, params_again = quantize.for_decoding(cfg_d, params_d)  # a second call changes nothing
  assert cfg_again == cfg_d
  assert jax.tree.structure(params_again) == jax.tree.structure(params_d)
  assert all(a is b for a, b in zip(jax.tree.leaves(params_again), jax.tree.leaves(params_d)))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 12)), jnp.int32)
  logits = model.Transformer(cfg).apply({"params": params}, tokens)
  logits_d = model.Transformer(cfg_d).apply({"params": params_d}, tokens)
  tol = 1e-5 if cfg.dtype == "float32" and dtype != "bfloat16" else 2e-2
  # int8 and int4 products of a few rows (a decode step; from weights in tiles up to MAX_TILED_ROWS)
  # may round x to int8 too (the decode kernel's integer path, as llama.cpp's): within 5% of the logits'
  # scale; its exact values are checked in test_decode_kernels and test_tiled_weights.
  rounds = dtype in ("int8", "int4") and decode_kernels.rounds_int8_activations()
  rounded_tol = 0.05 * float(np.abs(np.asarray(logits)).max()) if rounds else tol
  np.testing.assert_allclose(
    np.asarray(logits_d, np.float32), np.asarray(logits, np.float32), atol=rounded_tol, rtol=tol
  )
  if dtype in ("int8", "int4"):  # more rows: XLA's exact dequantize-then-dot, from rows or tiles alike
    longer = jnp.asarray(np.random.default_rng(1).integers(0, 96, (2, 40)), jnp.int32)
    np.testing.assert_allclose(
      np.asarray(model.Transformer(cfg_d).apply({"params": params_d}, longer)),
      np.asarray(model.Transformer(cfg).apply({"params": params}, longer)),
      atol=tol,
      rtol=tol,
    )
  cache = model.init_cache(cfg_d, 2, 16)
  assert isinstance(cache["k"], tuple) and len(cache["k"]) == 2
  _, cache = model.Transformer(cfg_d).apply({"params": params_d}, tokens[:, :11], cache=cache)
  last, cache = model.Transformer(cfg_d).apply({"params": params_d}, tokens[:, 11:], cache=cache)
  step_tol = 0.05 * float(np.abs(np.asarray(logits)).max()) if dtype in ("int8", "int4") else tol
  np.testing.assert_allclose(
    np.asarray(last[:, 0], np.float32), np.asarray(logits[:, 11], np.float32), atol=step_tol, rtol=tol
  )
  if dtype == "float32":
    declared = quantize.dequantize_params(params_d)["block_0"]["mlp"]["w2"]
    original = params["blocks"]["mlp"]["w2"][0] if cfg.scan_layers else params["block_0"]["mlp"]["w2"]
    np.testing.assert_array_equal(np.asarray(declared), np.asarray(original))
    # quantizing the decoding layout quantizes its float matrices (not kept as "already quantized")
    assert quantize.is_quantized(quantize.quantize_params(params_d, "int8"))


def gguf_tensor(kind: str, w_OI: np.ndarray):
  """A reader-like tensor: `w_OI` encoded by the gguf package's own quantizer."""
  from gguf import GGMLQuantizationType, quants

  qtype = GGMLQuantizationType[kind]
  return SimpleNamespace(name="t", tensor_type=qtype, data=quants.quantize(w_OI, qtype))


@pytest.mark.parametrize("kind,bits", [("Q8_0", 8), ("Q4_0", 4), ("Q4_1", 4)])
def test_gguf_blocks_keep_the_files_integers(kind, bits):
  from gguf import quants

  w_OI = np.random.default_rng(3).normal(size=(6, 96)).astype(np.float32)
  tensor = gguf_tensor(kind, w_OI)
  w = gguf_loader.blocks_to_quantized(tensor, (96, 6), 1)
  assert (w.bits, w.group_size, w.offset is not None) == (bits, 32, kind == "Q4_1")
  reference = quants.dequantize(tensor.data, tensor.tensor_type).reshape(6, 96)  # llama.cpp's formulas
  np.testing.assert_allclose(np_dequantize(w), reference, rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(quantized.dequantize(w)), reference, rtol=0, atol=1e-6)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_int4_keeps_the_files_q4_1_blocks_and_int8_stays_close():
  cfg, params, tokenizer = pretrained.load("smollm2-135m-instruct")
  _, params_int4, _ = pretrained.load("smollm2-135m-instruct", dtype="int4")
  # The file's layers are Q4_1: int4 keeps their integers, so they stand for exactly the fp32 weights
  # that gguf's dequantizer gives (only the Q8_0 embedding is re-quantized to 4 bits).
  for name in ("attn", "mlp"):
    fp32 = params["blocks"][name]
    kept = quantize.dequantize_params(params_int4["blocks"][name])
    for a, b in zip(jax.tree.leaves(fp32), jax.tree.leaves(kept)):
      np.testing.assert_allclose(np.asarray(b), a, rtol=0, atol=2e-6)
  _, params_int8, _ = pretrained.load("smollm2-135m-instruct", dtype="int8")
  text = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and"
  tokens = jnp.asarray([tokenizer.encode(text)], jnp.int32)
  apply = jax.jit(lambda p, t: jax.nn.log_softmax(model.Transformer(cfg).apply({"params": p}, t)))
  logp, logq = (
    np.asarray(apply(params, tokens), np.float64),
    np.asarray(apply(params_int8, tokens), np.float64),
  )
  kl_per_token = (np.exp(logp) * (logp - logq)).sum(-1)
  assert kl_per_token.mean() <= 0.01  # issue 24's bound for int8
