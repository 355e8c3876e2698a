"""Load a Llama-architecture GGUF file (llama.cpp's format) as lmjax config, params and tokenizer.

Tensors are dequantized to fp32 numpy (formats below), mapped to lmjax's
parameter names and stacked over layers. llama.cpp's converter permutes the
rows of the q and k projections so that its interleaved-pair RoPE reproduces
Hugging Face's rotate-half RoPE; lmjax uses the rotate-half layout (model/layers.py),
so the permutation is undone here.
"""

from __future__ import annotations

import jax
import numpy as np
from gguf import quants

from lmjax import model
from lmjax.data import hf_tokenizer
from lmjax.model import quantize
from lmjax.ops import quantized


def tensor_to_numpy(tensor) -> np.ndarray:
  """A gguf ReaderTensor -> fp32 array in row-major [rows, ..., columns] (= the HF/PyTorch layout).

  Dequantized by the `gguf` package's `quants.dequantize` (llama.cpp's reference formulas in numpy:
  F32, F16, BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, the K-quants Q2_K-Q6_K, ...). Raises ValueError for a
  type it cannot dequantize, naming it.
  """
  shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists the fastest dim first
  try:
    values = quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError:
    raise ValueError(
      f"tensor {tensor.name} is quantized as {tensor.tensor_type.name}, which the installed gguf "
      "package cannot dequantize; re-quantize the model with llama.cpp (e.g. Q8_0, Q4_K) or use "
      "an F16/F32 GGUF"
    ) from None
  return np.asarray(values, np.float32).reshape(shape)


# GGUF block formats kept as they are (ggml-common.h): name -> bits; and bytes per block of 32 weights.
DIRECT_BLOCKS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4}
_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def blocks_to_quantized(tensor, shape: tuple, in_dims: int) -> quantized.QuantizedWeight:
  """A Q8_0, Q4_0 or Q4_1 tensor's own integers and scales as a QuantizedWeight (rows = the file's
  [out, in] rows, group 32), numpy arrays.

  Blocks (ggml-common.h): Q8_0 = f16 d, 32 int8 q: w = d*q. Q4_0 = f16 d, 16 bytes whose low nibbles
  are weights 0-15 and high nibbles 16-31: w = d*(q - 8). Q4_1 = f16 d, f16 m, the same 16 bytes:
  w = d*q + m, kept as d*(q - 8) + (m + 8d) so the nibbles are signed as in ops/quantized.py.
  """
  kind = tensor.tensor_type.name
  data = np.asarray(tensor.data, np.uint8)
  rows = data.shape[0]
  blocks = data.reshape(rows, -1, _BLOCK_BYTES[kind])
  d = blocks[..., :2].copy().view(np.float16)[..., 0]
  if kind == "Q8_0":
    q = blocks[..., 2:].copy().view(np.int8).reshape(rows, -1)
    return quantized.QuantizedWeight(q, d, None, shape, in_dims, 8, 32)
  qs = blocks[..., 4:] if kind == "Q4_1" else blocks[..., 2:]
  q = np.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(np.int8) - 8  # [rows, blocks, 32] in order
  offset = None
  if kind == "Q4_1":
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    offset = m.astype(np.float32) + 8 * d.astype(np.float32)
  values = np.asarray(quantized.pack_int4(q.reshape(rows, -1)))
  return quantized.QuantizedWeight(values, d, offset, shape, in_dims, 4, 32)


def unpermute_rope_rows(w_OI: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's `permute`: interleaved (pairs 2j, 2j+1) rows back to rotate-half order."""
  out, inp = w_OI.shape
  return w_OI.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _field(reader, key, default=None):
  field = reader.fields.get(key)
  if field is None:
    if default is None:
      raise ValueError(f"the GGUF file has no metadata field {key!r}")
    return default
  from gguf import GGUFValueType

  if field.types[0] == GGUFValueType.STRING:
    return bytes(field.parts[field.data[0]]).decode("utf-8")
  if field.types[0] == GGUFValueType.ARRAY:
    if field.types[1] == GGUFValueType.STRING:
      return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    return [field.parts[i].tolist()[0] for i in field.data]
  return field.parts[field.data[0]].tolist()[0]


# Metadata read into the ModelConfig / tokenizer, or checked to hold the value lmjax computes with.
_READ = {
  "llama.block_count",
  "llama.context_length",
  "llama.embedding_length",
  "llama.feed_forward_length",
  "llama.attention.head_count",
  "llama.attention.head_count_kv",
  "llama.rope.freq_base",
  "llama.attention.layer_norm_rms_epsilon",
  "llama.rope.dimension_count",
  "llama.vocab_size",
  "tokenizer.ggml.model",
  "tokenizer.ggml.pre",
  "tokenizer.ggml.tokens",
  "tokenizer.ggml.token_type",
  "tokenizer.ggml.merges",
  "tokenizer.ggml.bos_token_id",
  "tokenizer.ggml.eos_token_id",
  "tokenizer.ggml.padding_token_id",
  "tokenizer.chat_template",
}
# Metadata that must have this value (absent is fine): anything else changes what llama.cpp computes.
_REQUIRED = {
  "llama.rope.scaling.type": "none",
  "llama.rope.scaling.factor": 1.0,
  "llama.expert_count": 0,
  "llama.expert_used_count": 0,
  "tokenizer.ggml.add_space_prefix": False,
  "tokenizer.ggml.add_bos_token": False,
  "tokenizer.ggml.add_eos_token": False,
}
# File bookkeeping, and token ids for tasks lmjax does not run (fill-in-the-middle, classification):
# the model's outputs and the tokenizer's text are the same whatever they say.
_NO_EFFECT_PREFIXES = (
  "GGUF.",
  "general.",
  "split.",
  "quantize.",
  "tokenizer.ggml.scores",
  "tokenizer.chat_template.",
  "tokenizer.ggml.unknown_token_id",
  "tokenizer.ggml.eot_token_id",
  "tokenizer.ggml.eom_token_id",
  "tokenizer.ggml.sep_token_id",
  "tokenizer.ggml.cls_token_id",
  "tokenizer.ggml.mask_token_id",
  "tokenizer.ggml.fim_",
  "tokenizer.ggml.add_sep_token",
)


def check_metadata(reader) -> None:
  """Every metadata field is read, holds the one value lmjax supports, or does not change the model
  (file bookkeeping, names, licences); otherwise ValueError naming the fields."""
  head_dim = None
  if "llama.attention.head_count" in reader.fields:
    head_dim = int(_field(reader, "llama.rope.dimension_count", 0)) or (
      int(_field(reader, "llama.embedding_length")) // int(_field(reader, "llama.attention.head_count"))
    )
  required = {**_REQUIRED, "llama.attention.key_length": head_dim, "llama.attention.value_length": head_dim}
  wrong = {k: _field(reader, k) for k, v in required.items() if k in reader.fields and _field(reader, k) != v}
  unknown = sorted(
    k for k in reader.fields if k not in _READ and k not in required and not k.startswith(_NO_EFFECT_PREFIXES)
  )
  if wrong or unknown:
    raise ValueError(
      f"this GGUF file sets {wrong or ''}{' and ' if wrong and unknown else ''}"
      f"{'fields ' + str(unknown) if unknown else ''}, which lmjax does not support "
      f"(supported values: {required}); loading it anyway would compute another model"
    )


def read_config(reader) -> model.ModelConfig:
  """The ModelConfig a Llama-architecture GGUF file describes (its `llama.*` metadata; check_metadata has
  refused any key that would change the outputs)."""
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(
      f"GGUF architecture {arch!r} is not supported; supported: ['llama'] (Llama, SmolLM, Mistral-"
      "style models)"
    )
  check_metadata(reader)
  if "llama.vocab_size" in reader.fields and int(_field(reader, "llama.vocab_size")) != len(
    _field(reader, "tokenizer.ggml.tokens")
  ):
    raise ValueError("llama.vocab_size differs from the number of tokenizer.ggml.tokens")
  d_model = int(_field(reader, "llama.embedding_length"))
  n_heads = int(_field(reader, "llama.attention.head_count"))
  tensors = {t.name for t in reader.tensors}
  return model.ModelConfig(
    vocab_size=len(_field(reader, "tokenizer.ggml.tokens")),
    max_len=int(_field(reader, "llama.context_length")),
    d_model=d_model,
    n_layers=int(_field(reader, "llama.block_count")),
    n_heads=n_heads,
    n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
    head_dim=int(_field(reader, "llama.rope.dimension_count", d_model // n_heads)),
    d_ff=int(_field(reader, "llama.feed_forward_length")),
    pos_encoding="rope",
    rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
    mlp="swiglu",
    norm="rmsnorm",
    norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
    attn_bias=False,
    mlp_bias=False,
    tie_embeddings="output.weight" not in tensors,
    scan_layers=True,
  )


def read_params(reader, cfg: model.ModelConfig, quantized_dtype: str | None = None) -> dict:
  """lmjax params (scanned layout: per-layer weights stacked on a leading axis), fp32 numpy. With
  `quantized_dtype` ('int8' or 'int4'), a matrix stored in blocks of the bits that dtype gives it
  (DIRECT_BLOCKS; model.quantize.scheme) is kept as a QuantizedWeight holding the file's own integers
  and scales; the rest stay fp32 (model.quantize.quantize_params takes them)."""
  raw = {t.name: t for t in reader.tensors}
  D, N, K, H, F = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, cfg.d_ff

  used = set()

  def tensor(name):
    if name not in raw:
      raise ValueError(f"the GGUF file has no tensor {name!r}; is it a complete Llama-architecture model?")
    used.add(name)
    return raw[name]

  def get(name):
    return tensor_to_numpy(tensor(name))

  def matrix(name, shape, in_dims, rope_heads=None, param="matrix"):
    """A weight stored [out, in] in the file, as lmjax declares it (`shape`, `in_dims`: see
    ops/quantized.py; `param`: its lmjax name), unpermuting RoPE rows when `rope_heads` is given."""
    t = tensor(name)
    unpermute = (lambda a: unpermute_rope_rows(a, rope_heads)) if rope_heads else (lambda a: a)
    bits = quantize.scheme(quantized_dtype, param)[0] if quantized_dtype else None
    if bits is not None and DIRECT_BLOCKS.get(t.tensor_type.name) == bits:
      return jax.tree.map(unpermute, blocks_to_quantized(t, shape, in_dims))
    w_OI = unpermute(tensor_to_numpy(t))
    return w_OI if in_dims == -1 else w_OI.T.reshape(shape)

  def layer(i):
    return {
      "attn": {
        "wq": matrix(f"blk.{i}.attn_q.weight", (D, N, H), 1, rope_heads=N),
        "wk": matrix(f"blk.{i}.attn_k.weight", (D, K, H), 1, rope_heads=K),
        "wv": matrix(f"blk.{i}.attn_v.weight", (D, K, H), 1),
        "wo": matrix(f"blk.{i}.attn_output.weight", (N, H, D), 2),
      },
      "attn_norm": {"scale": get(f"blk.{i}.attn_norm.weight")},
      "mlp": {
        "w1": matrix(f"blk.{i}.ffn_gate.weight", (D, F), 1),
        "w3": matrix(f"blk.{i}.ffn_up.weight", (D, F), 1),
        "w2": matrix(f"blk.{i}.ffn_down.weight", (F, D), 1),
      },
      "mlp_norm": {"scale": get(f"blk.{i}.ffn_norm.weight")},
    }

  layers = [layer(i) for i in range(cfg.n_layers)]
  params = {
    "embedding": matrix("token_embd.weight", (cfg.vocab_size, D), -1, param="embedding"),
    "final_norm": {"scale": get("output_norm.weight")},
    "blocks": jax.tree.map(lambda *xs: np.stack(xs), *layers),
  }
  if not cfg.tie_embeddings:
    params["lm_head"] = matrix("output.weight", (D, cfg.vocab_size), 1, param="lm_head")
  unused = sorted(set(raw) - used)
  if unused:  # e.g. rope_freqs.weight (scaled RoPE) or q/k/v biases: dropping them would change the model
    raise ValueError(
      f"the GGUF file has tensors lmjax does not use: {unused[:8]}{' ...' if len(unused) > 8 else ''}; "
      "loading it without them would compute another model"
    )
  return params


def load(path: str, quantized_dtype: str | None = None):
  """(ModelConfig, fp32 numpy params with scanned layers, tokenizer) from a Llama-architecture GGUF file.
  `quantized_dtype` ('int8', 'int4'): keep matrices stored in blocks of its bits quantized (read_params).

  Raises ValueError for metadata that would change the outputs (named), a tensor type the gguf package
  cannot dequantize, or tensors lmjax would not use."""
  from gguf import GGUFReader

  reader = GGUFReader(path)
  cfg = read_config(reader)
  tokenizer = hf_tokenizer.from_gguf_metadata(
    tokens=_field(reader, "tokenizer.ggml.tokens"),
    token_types=_field(reader, "tokenizer.ggml.token_type"),
    merges=_field(reader, "tokenizer.ggml.merges"),
    model_kind=_field(reader, "tokenizer.ggml.model"),
    pre=_field(reader, "tokenizer.ggml.pre", "default"),
    bos_id=_field(reader, "tokenizer.ggml.bos_token_id", -1),
    eos_id=_field(reader, "tokenizer.ggml.eos_token_id", -1),
    pad_id=_field(reader, "tokenizer.ggml.padding_token_id", -1),
    chat_template=_field(reader, "tokenizer.chat_template", ""),
  )
  return cfg, read_params(reader, cfg, quantized_dtype), tokenizer
