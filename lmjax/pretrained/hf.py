"""Hugging Face checkpoints (config.json + *.safetensors) in and out of lmjax.

Import: `LlamaForCausalLM` (Llama, SmolLM), `MistralForCausalLM` (with its
sliding window) and `GPT2LMHeadModel`. Export: lmjax Llama-style models (RoPE,
RMSNorm, SwiGLU) to a `LlamaForCausalLM` directory that `transformers` loads.
HF stores Linear weights as [out, in] (GPT-2's Conv1D as [in, out]); lmjax as
[in, ...out]. Both use the rotate-half RoPE layout, so q/k need no permutation.

A model file means what it says, both ways: every config.json field is either
read into the ModelConfig, known not to change the forward pass (metadata,
training-only settings), or refused with a message naming it; an lmjax option
that the HF architecture cannot express (e.g. scale_embeddings) refuses export.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from lmjax import model
from lmjax.core import files
from lmjax.data import hf_export, hf_tokenizer


def _read_tensors(directory: str) -> dict:
  from safetensors.numpy import load_file

  # listdir, not glob: a directory named like `model [v1]` is a path, not a pattern
  files = sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(
      f"no *.safetensors files in {directory} (PyTorch .bin checkpoints are not supported; "
      "convert them with `transformers` save_pretrained(safe_serialization=True))"
    )
  tensors = {}
  for path in files:
    tensors.update({k: v.astype(np.float32) for k, v in load_file(path).items()})
  return tensors


def _stack(layers: list) -> dict:
  return jax.tree.map(lambda *xs: np.stack(xs), *layers)


# config.json fields that do not change the forward pass: bookkeeping, tokens' ids, training-time
# settings (dropout, init), runtime switches, and fields transformers itself ignores for these models.
# fmt: off
# (pretraining_tp splits the projections' matmuls, same result; is_llama_config and rope_interleaved are
# nanotron's notes in SmolLM configs, which HF Llama reads neither of)
_NO_EFFECT = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "use_cache", "initializer_range",
    "attention_dropout", "pretraining_tp", "is_llama_config", "rope_interleaved", "resid_pdrop",
    "embd_pdrop", "attn_pdrop", "summary_type", "summary_use_proj", "summary_activation",
    "summary_proj_to_labels", "summary_first_dropout", "task_specific_params", "n_ctx",
    "reorder_and_upcast_attn", "output_attentions", "output_hidden_states", "return_dict",
    "tokenizer_class", "id2label", "label2id", "torchscript", "n_special", "predict_special_tokens",
    "gradient_checkpointing", "output_past", "_num_labels", "_attn_implementation_autoset",
    "_attn_implementation", "attn_implementation", "transformers.js_config", "use_return_dict",
    "finetuning_task", "problem_type", "is_decoder", "is_encoder_decoder", "add_cross_attention",
    "tie_encoder_decoder", "prefix", "decoder_start_token_id", "use_bfloat16", "pruned_heads",
    "tf_legacy_loss", "chunk_size_feed_forward", "max_length"
}
_LLAMA_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias", "tie_word_embeddings"
}
_GPT2_FIELDS = {
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
    "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "tie_word_embeddings"
}
# fmt: on


def _check_fields(config: dict, read: set, architecture: str) -> None:
  """Refuses fields neither read nor known to leave the outputs alone (a null value sets nothing)."""
  unknown = sorted(k for k in set(config) - read - _NO_EFFECT if config[k] is not None)
  if unknown:
    raise ValueError(
      f"config.json fields {unknown} of this {architecture} are not supported by lmjax's importer: it "
      "cannot tell whether they change the model's outputs, so it refuses rather than ignore them"
    )


def _rope_theta(config: dict) -> float:
  """RoPE base from transformers v4 (`rope_theta`, `rope_scaling`) or v5 (`rope_parameters`) layouts;
  scaled RoPE (linear, dynamic, YaRN, Llama 3) is refused."""
  parameters = config.get("rope_parameters") or {}
  for scaling in (config.get("rope_scaling"), parameters):
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind != "default":
      raise ValueError(f"rope scaling {scaling} is not supported (plain RoPE only)")
  theta = config.get("rope_theta")
  if theta is None:
    theta = parameters.get("rope_theta", 10000.0)
  elif parameters.get("rope_theta") not in (None, theta):
    raise ValueError(f"rope_theta={theta} and rope_parameters.rope_theta={parameters['rope_theta']} disagree")
  return float(theta)


def _llama(config: dict, t: dict):
  mistral = (config.get("architectures") or [""])[0] == "MistralForCausalLM"
  _check_fields(
    config,
    _LLAMA_FIELDS | ({"sliding_window"} if mistral else set()),
    "MistralForCausalLM" if mistral else "LlamaForCausalLM",
  )
  D, N = config["hidden_size"], config["num_attention_heads"]
  K = config.get("num_key_value_heads") or N
  H = config.get("head_dim") or D // N
  if config.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={config['hidden_act']!r} is not supported for Llama (silu only)")
  cfg = model.ModelConfig(
    vocab_size=config["vocab_size"],
    max_len=config.get("max_position_embeddings", 2048),
    d_model=D,
    n_layers=config["num_hidden_layers"],
    n_heads=N,
    n_kv_heads=K,
    head_dim=H,
    d_ff=config["intermediate_size"],
    pos_encoding="rope",
    rope_theta=_rope_theta(config),
    mlp="swiglu",
    norm="rmsnorm",
    norm_eps=float(config.get("rms_norm_eps", 1e-6)),
    attn_bias=bool(config.get("attention_bias", False)),
    mlp_bias=bool(config.get("mlp_bias", False)),
    tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    sliding_window=config.get("sliding_window") if mistral else None,
  )
  pre = "model.layers.{}."

  def layer(i):
    w = lambda name: t[pre.format(i) + name]
    attn = {
      "wq": w("self_attn.q_proj.weight").T.reshape(D, N, H),
      "wk": w("self_attn.k_proj.weight").T.reshape(D, K, H),
      "wv": w("self_attn.v_proj.weight").T.reshape(D, K, H),
      "wo": w("self_attn.o_proj.weight").T.reshape(N, H, D),
    }
    if cfg.attn_bias:
      attn.update(
        wq_bias=w("self_attn.q_proj.bias").reshape(N, H),
        wk_bias=w("self_attn.k_proj.bias").reshape(K, H),
        wv_bias=w("self_attn.v_proj.bias").reshape(K, H),
        wo_bias=w("self_attn.o_proj.bias"),
      )
    mlp = {
      "w1": w("mlp.gate_proj.weight").T,
      "w3": w("mlp.up_proj.weight").T,
      "w2": w("mlp.down_proj.weight").T,
    }
    if cfg.mlp_bias:
      mlp.update(b1=w("mlp.gate_proj.bias"), b3=w("mlp.up_proj.bias"), b2=w("mlp.down_proj.bias"))
    return {
      "attn": attn,
      "mlp": mlp,
      "attn_norm": {"scale": w("input_layernorm.weight")},
      "mlp_norm": {"scale": w("post_attention_layernorm.weight")},
    }

  params = {
    "embedding": t["model.embed_tokens.weight"],
    "final_norm": {"scale": t["model.norm.weight"]},
    "blocks": _stack([layer(i) for i in range(cfg.n_layers)]),
  }
  if not cfg.tie_embeddings:
    params["lm_head"] = t["lm_head.weight"].T
  return cfg, params


def _gpt2(config: dict, t: dict):
  _check_fields(config, _GPT2_FIELDS, "GPT2LMHeadModel")
  D, N = config["n_embd"], config["n_head"]
  H = D // N
  if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
    raise ValueError(
      f"activation_function={config['activation_function']!r} is not supported (gelu_new only)"
    )
  for field, supported in (
    ("scale_attn_weights", True),
    ("scale_attn_by_inverse_layer_idx", False),
    ("tie_word_embeddings", True),
  ):
    if config.get(field, supported) != supported:
      raise ValueError(f"{field}={config[field]} is not supported (only {supported}, GPT-2's)")
  cfg = model.ModelConfig(
    vocab_size=config["vocab_size"],
    max_len=config["n_positions"],
    d_model=D,
    n_layers=config["n_layer"],
    n_heads=N,
    d_ff=config.get("n_inner") or 4 * D,
    pos_encoding="learned",
    mlp="gelu",
    norm="layernorm",
    norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
    attn_bias=True,
    mlp_bias=True,
    tie_embeddings=True,
  )
  prefix = "transformer." if "transformer.wte.weight" in t else ""

  def layer(i):
    w = lambda name: t[f"{prefix}h.{i}.{name}"]
    q, k, v = np.split(w("attn.c_attn.weight"), 3, axis=1)  # Conv1D: [in, out]
    qb, kb, vb = np.split(w("attn.c_attn.bias"), 3)
    return {
      "attn": {
        "wq": q.reshape(D, N, H),
        "wk": k.reshape(D, N, H),
        "wv": v.reshape(D, N, H),
        "wo": w("attn.c_proj.weight").reshape(N, H, D),
        "wq_bias": qb.reshape(N, H),
        "wk_bias": kb.reshape(N, H),
        "wv_bias": vb.reshape(N, H),
        "wo_bias": w("attn.c_proj.bias"),
      },
      "mlp": {
        "w1": w("mlp.c_fc.weight"),
        "b1": w("mlp.c_fc.bias"),
        "w2": w("mlp.c_proj.weight"),
        "b2": w("mlp.c_proj.bias"),
      },
      "attn_norm": {"scale": w("ln_1.weight"), "bias": w("ln_1.bias")},
      "mlp_norm": {"scale": w("ln_2.weight"), "bias": w("ln_2.bias")},
    }

  params = {
    "embedding": t[prefix + "wte.weight"],
    "pos_embedding": t[prefix + "wpe.weight"],
    "final_norm": {"scale": t[prefix + "ln_f.weight"], "bias": t[prefix + "ln_f.bias"]},
    "blocks": _stack([layer(i) for i in range(cfg.n_layers)]),
  }
  return cfg, params


_IMPORTERS = {"LlamaForCausalLM": _llama, "MistralForCausalLM": _llama, "GPT2LMHeadModel": _gpt2}


def load(directory: str):
  """(ModelConfig with scanned layers, fp32 numpy params) from a Hugging Face model directory.

  Raises ValueError for an unsupported architecture, a config.json field that would change the outputs
  and that lmjax cannot express, or a missing tensor (each named)."""
  with open(os.path.join(directory, "config.json")) as f:
    config = json.load(f)
  architecture = (config.get("architectures") or ["?"])[0]
  if architecture not in _IMPORTERS:
    raise ValueError(f"architecture {architecture!r} is not supported; supported: {sorted(_IMPORTERS)}")
  try:
    return _IMPORTERS[architecture](config, _read_tensors(directory))
  except KeyError as err:
    raise ValueError(f"{directory}: tensor {err} is missing for a {architecture} checkpoint") from None


def export_llama(cfg: model.ModelConfig, params, directory: str, tokenizer=None) -> None:
  """Writes an lmjax Llama-style model as a Hugging Face `LlamaForCausalLM` directory: config.json,
  model.safetensors, generation_config.json (the special ids generation stops and pads with) and,
  given its tokenizer, tokenizer.json + tokenizer_config.json (hf_export.as_hf: pretrained
  byte-level BPEs and lmjax's char, byte and bytelevel kinds; ValueError for SentencePiece `bpe`).

  Raises ValueError for any ModelConfig option Llama cannot express (the exported model would load
  and compute something else): a non-Llama architecture, scale_embeddings, sliding_window.
  """
  expressible = {
    "pos_encoding": "rope",
    "mlp": "swiglu",
    "norm": "rmsnorm",
    "scale_embeddings": False,
    "sliding_window": None,
    "parametrization": "sp",  # μP's attention and output multipliers have no config.json field
  }
  differ = {k: getattr(cfg, k) for k, v in expressible.items() if getattr(cfg, k) != v}
  if differ:
    raise ValueError(
      f"model options {differ} have no LlamaForCausalLM equivalent (it needs {expressible}); "
      "exporting would give a model with other outputs"
    )
  from safetensors.numpy import save_file

  D, N, K, H = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
  params = model.quantize.dequantize_params(params)  # int8/int4 or decoding-layout weights: as declared
  p = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  blocks = p["blocks"] if "blocks" in p else _stack([p[f"block_{i}"] for i in range(cfg.n_layers)])
  t = {"model.embed_tokens.weight": p["embedding"], "model.norm.weight": p["final_norm"]["scale"]}
  for i in range(cfg.n_layers):
    a, m = (jax.tree.map(lambda x, i=i: x[i], blocks[name]) for name in ("attn", "mlp"))
    pre = f"model.layers.{i}."
    t.update(
      {
        pre + "self_attn.q_proj.weight": a["wq"].reshape(D, N * H).T,
        pre + "self_attn.k_proj.weight": a["wk"].reshape(D, K * H).T,
        pre + "self_attn.v_proj.weight": a["wv"].reshape(D, K * H).T,
        pre + "self_attn.o_proj.weight": a["wo"].reshape(N * H, D).T,
        pre + "mlp.gate_proj.weight": m["w1"].T,
        pre + "mlp.up_proj.weight": m["w3"].T,
        pre + "mlp.down_proj.weight": m["w2"].T,
        pre + "input_layernorm.weight": blocks["attn_norm"]["scale"][i],
        pre + "post_attention_layernorm.weight": blocks["mlp_norm"]["scale"][i],
      }
    )
    if cfg.attn_bias:
      t.update(
        {
          pre + "self_attn.q_proj.bias": a["wq_bias"].reshape(-1),
          pre + "self_attn.k_proj.bias": a["wk_bias"].reshape(-1),
          pre + "self_attn.v_proj.bias": a["wv_bias"].reshape(-1),
          pre + "self_attn.o_proj.bias": a["wo_bias"],
        }
      )
    if cfg.mlp_bias:
      t.update(
        {
          pre + "mlp.gate_proj.bias": m["b1"],
          pre + "mlp.up_proj.bias": m["b3"],
          pre + "mlp.down_proj.bias": m["b2"],
        }
      )
  if not cfg.tie_embeddings:
    t["lm_head.weight"] = p["lm_head"].T
  os.makedirs(directory, exist_ok=True)
  save_file(
    {k: np.ascontiguousarray(v) for k, v in t.items()},
    os.path.join(directory, "model.safetensors"),
    metadata={"format": "pt"},
  )
  config = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": cfg.vocab_size,
    "hidden_size": D,
    "intermediate_size": cfg.d_ff,
    "num_hidden_layers": cfg.n_layers,
    "num_attention_heads": N,
    "num_key_value_heads": K,
    "head_dim": H,
    "hidden_act": "silu",
    "max_position_embeddings": cfg.max_len,
    "rms_norm_eps": cfg.norm_eps,
    "rope_theta": cfg.rope_theta,
    "tie_word_embeddings": cfg.tie_embeddings,
    "attention_bias": cfg.attn_bias,
    "mlp_bias": cfg.mlp_bias,
    "torch_dtype": "float32",
  }
  generation = {"_from_model_config": True}
  if tokenizer is not None:
    config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    hf_tokenizer.save_hf_directory(hf_export.as_hf(tokenizer), directory)
    special = {
      "bos_token_id": tokenizer.bos_id,
      "eos_token_id": tokenizer.eos_id,
      "pad_token_id": tokenizer.pad_id,
    }
    generation.update({k: v for k, v in special.items() if v is not None})
  files.write_json(os.path.join(directory, "generation_config.json"), generation)
  files.write_json(os.path.join(directory, "config.json"), config)
