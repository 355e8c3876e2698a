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


def read_params(reader, cfg: model.ModelConfig) -> dict:
  """lmjax params (scanned layout: per-layer weights stacked on a leading axis), fp32 numpy."""
  raw = {t.name: t for t in reader.tensors}
  D, N, K, H = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head

  used = set()

  def get(name):
    if name not in raw:
      raise ValueError(f"the GGUF file has no tensor {name!r}; is it a complete Llama-architecture model?")
    used.add(name)
    return tensor_to_numpy(raw[name])

  def layer(i):
    wq = unpermute_rope_rows(get(f"blk.{i}.attn_q.weight"), N)  # [N*H, D] (out, in)
    wk = unpermute_rope_rows(get(f"blk.{i}.attn_k.weight"), K)
    return {
      "attn": {
        "wq": wq.T.reshape(D, N, H),
        "wk": wk.T.reshape(D, K, H),
        "wv": get(f"blk.{i}.attn_v.weight").T.reshape(D, K, H),
        "wo": get(f"blk.{i}.attn_output.weight").T.reshape(N, H, D),
      },
      "attn_norm": {"scale": get(f"blk.{i}.attn_norm.weight")},
      "mlp": {
        "w1": get(f"blk.{i}.ffn_gate.weight").T,
        "w3": get(f"blk.{i}.ffn_up.weight").T,
        "w2": get(f"blk.{i}.ffn_down.weight").T,
      },
      "mlp_norm": {"scale": get(f"blk.{i}.ffn_norm.weight")},
    }

  layers = [layer(i) for i in range(cfg.n_layers)]
  params = {
    "embedding": get("token_embd.weight"),
    "final_norm": {"scale": get("output_norm.weight")},
    "blocks": jax.tree.map(lambda *xs: np.stack(xs), *layers),
  }
  if not cfg.tie_embeddings:
    params["lm_head"] = get("output.weight").T
  unused = sorted(set(raw) - used)
  if unused:  # e.g. rope_freqs.weight (scaled RoPE) or q/k/v biases: dropping them would change the model
    raise ValueError(
      f"the GGUF file has tensors lmjax does not use: {unused[:8]}{' ...' if len(unused) > 8 else ''}; "
      "loading it without them would compute another model"
    )
  return params


def load(path: str):
  """(ModelConfig, fp32 numpy params with scanned layers, tokenizer) from a Llama-architecture GGUF file.

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
  return cfg, read_params(reader, cfg), tokenizer
