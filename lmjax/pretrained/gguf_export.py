"""Write a Llama-style lmjax model as a GGUF file that llama.cpp (and ollama, LM Studio) run.

    gguf_export.export(cfg, params, tokenizer, "model.gguf", dtype="q8_0")

The file is written by the `gguf` package's GGUFWriter with llama.cpp's tensor names and `llama.*`
metadata (what convert_hf_to_gguf.py writes for a LlamaForCausalLM), the tokenizer as
`tokenizer.ggml.*` (data/hf_tokenizer.to_gguf_metadata) and the chat template. q and k rows are
permuted into llama.cpp's interleaved RoPE layout (the inverse of gguf.unpermute_rope_rows). Norms
stay F32 (llama.cpp requires it); matrices are F32, F16, or Q8_0 blocks made by the `gguf` package's
quantizer (a matrix whose rows do not split into blocks of 32 falls back to F16, as llama.cpp's
converter does).
"""

from __future__ import annotations

import jax
import numpy as np

from lmjax import model
from lmjax.data import hf_tokenizer
from lmjax.model import quantize

EXPORT_DTYPES = ("f32", "f16", "q8_0")
# What a GGUF `llama` model computes: anything else would be another model.
_LLAMA = {"pos_encoding": "rope", "mlp": "swiglu", "norm": "rmsnorm", "scale_embeddings": False}
_LLAMA_FALSE = ("attn_bias", "mlp_bias")


def permute_rope_rows(w_OI: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's `permute`: rotate-half rows (j, j + H/2) to interleaved pairs (2j, 2j + 1)."""
  out, inp = w_OI.shape
  return w_OI.reshape(n_heads, 2, out // n_heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def check_exportable(cfg: model.ModelConfig) -> None:
  """Raises ValueError naming every ModelConfig option a GGUF `llama` model cannot express."""
  differ = {k: getattr(cfg, k) for k, v in _LLAMA.items() if getattr(cfg, k) != v}
  differ.update({k: True for k in _LLAMA_FALSE if getattr(cfg, k)})
  if cfg.sliding_window is not None:
    differ["sliding_window"] = cfg.sliding_window
  if cfg.parametrization != "sp":  # μP's attention and output multipliers have no GGUF field
    differ["parametrization"] = cfg.parametrization
  if differ:
    raise ValueError(
      f"model options {differ} have no GGUF 'llama' equivalent (it needs {_LLAMA}, no biases, no "
      "sliding window); exporting would give a model with other outputs"
    )


def export(cfg: model.ModelConfig, params, tokenizer, path: str, dtype: str = "f32") -> None:
  """Writes `params` (scanned or unrolled; quantized ones are dequantized first) and `tokenizer` as a
  GGUF file at `path`, matrices in `dtype` (EXPORT_DTYPES).

  Raises ValueError for a dtype not in EXPORT_DTYPES, options llama.cpp cannot express
  (check_exportable), or a tokenizer it would tokenize differently (to_gguf_metadata: byte-level BPEs
  with GPT-2's or SmolLM's split, as pretrained models have; lmjax's own `char`, `byte`, `bpe` and
  `bytelevel` kinds have no llama.cpp equivalent: `bytelevel` splits whitespace runs apart from GPT-2's
  regex, bytelevel_bpe.PATTERN). `path` is written only after every check.
  """
  import gguf

  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"GGUF export dtype {dtype!r} is not supported; allowed: {list(EXPORT_DTYPES)}")
  check_exportable(cfg)
  if tokenizer.kind != "hf":
    raise ValueError(
      f"its tokenizer (data.tokenizer={tokenizer.kind!r}, fitted by lmjax) has no llama.cpp equivalent, "
      "so llama.cpp would read other tokens: export it for Hugging Face instead (lmjax-export --format=hf, "
      "hf.export_llama; transformers reads the tokenizer), or fine-tune a pretrained model, whose "
      "tokenizer GGUF keeps"
    )
  vocab = hf_tokenizer.to_gguf_metadata(tokenizer)
  if len(vocab["tokens"]) != cfg.vocab_size:
    raise ValueError(f"the tokenizer has {len(vocab['tokens'])} ids, the model {cfg.vocab_size} embeddings")
  tensors = _tensors(cfg, quantize.dequantize_params(params))

  writer = gguf.GGUFWriter(path, "llama")
  writer.add_context_length(cfg.max_len)
  writer.add_embedding_length(cfg.d_model)
  writer.add_block_count(cfg.n_layers)
  writer.add_feed_forward_length(cfg.d_ff)
  writer.add_head_count(cfg.n_heads)
  writer.add_head_count_kv(cfg.kv_heads)
  writer.add_rope_dimension_count(cfg.dim_per_head)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_layer_norm_rms_eps(cfg.norm_eps)
  writer.add_vocab_size(cfg.vocab_size)
  if cfg.dim_per_head != cfg.d_model // cfg.n_heads:
    writer.add_key_length(cfg.dim_per_head)
    writer.add_value_length(cfg.dim_per_head)
  writer.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[dtype])  # llama.cpp's LLAMA_FTYPE_ALL_F32, ...
  writer.add_tokenizer_model(vocab["model_kind"])
  writer.add_tokenizer_pre(vocab["pre"])
  writer.add_token_list(vocab["tokens"])
  writer.add_token_types(vocab["token_types"])
  writer.add_token_merges(vocab["merges"])
  for add, token_id in (
    (writer.add_bos_token_id, vocab["bos_id"]),
    (writer.add_eos_token_id, vocab["eos_id"]),
    (writer.add_pad_token_id, vocab["pad_id"]),
  ):
    if token_id is not None:
      add(token_id)
  writer.add_add_bos_token(False)  # lmjax's prompts carry their own special tokens (chat template)
  if vocab["chat_template"]:
    writer.add_chat_template(vocab["chat_template"])
  for name, w in tensors.items():
    _add_tensor(writer, name, w, dtype, gguf)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def _tensors(cfg: model.ModelConfig, params) -> dict:
  """llama.cpp tensor name -> fp32 numpy array in its [out, in] (PyTorch) layout."""
  D, N, K, H = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
  p = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  blocks = p.get("blocks") or jax.tree.map(
    lambda *x: np.stack(x), *[p[f"block_{i}"] for i in range(cfg.n_layers)]
  )
  t = {"token_embd.weight": p["embedding"], "output_norm.weight": p["final_norm"]["scale"]}
  if not cfg.tie_embeddings:
    t["output.weight"] = p["lm_head"].T
  for i in range(cfg.n_layers):
    a, m = (jax.tree.map(lambda x, i=i: x[i], blocks[name]) for name in ("attn", "mlp"))
    t.update(
      {
        f"blk.{i}.attn_norm.weight": blocks["attn_norm"]["scale"][i],
        f"blk.{i}.attn_q.weight": permute_rope_rows(a["wq"].reshape(D, N * H).T, N),
        f"blk.{i}.attn_k.weight": permute_rope_rows(a["wk"].reshape(D, K * H).T, K),
        f"blk.{i}.attn_v.weight": a["wv"].reshape(D, K * H).T,
        f"blk.{i}.attn_output.weight": a["wo"].reshape(N * H, D).T,
        f"blk.{i}.ffn_norm.weight": blocks["mlp_norm"]["scale"][i],
        f"blk.{i}.ffn_gate.weight": m["w1"].T,
        f"blk.{i}.ffn_up.weight": m["w3"].T,
        f"blk.{i}.ffn_down.weight": m["w2"].T,
      }
    )
  return t


def _add_tensor(writer, name: str, w_OI: np.ndarray, dtype: str, gguf) -> None:
  w_OI = np.ascontiguousarray(w_OI, np.float32)
  if w_OI.ndim == 1 or dtype == "f32":
    writer.add_tensor(name, w_OI)
  elif dtype == "q8_0" and w_OI.shape[-1] % 32 == 0:
    q8 = gguf.GGMLQuantizationType.Q8_0
    writer.add_tensor(name, gguf.quants.quantize(w_OI, q8), raw_dtype=q8)
  else:
    writer.add_tensor(name, w_OI.astype(np.float16))
