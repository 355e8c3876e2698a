"""SmolLM2-135M batch-1 greedy decode: lmjax fp32 / int8 / int4 weights against llama.cpp, in one run.

Each round measures, interleaved: a jitted sum's read bandwidth (the weight-bandwidth limit is that
rate over the bytes of weights a token reads), lmjax decode tokens/s for each dtype, and llama.cpp's
decode tokens/s on the same GGUF file (llama-cpp-python in another interpreter, its own
`llama_perf_context` timings, 2 threads). Then the quantized models' quality: mean KL(fp32 || q) per
token, in nats, on a Shakespeare passage none of them was tuned on. The fp32 reference is the GGUF
file dequantized (its layers are Q4_1), so int4 as loaded keeps exactly those layers.

  python benchmarks/quantized_decode.py --llama_python=/tmp/llvenv/bin/python
  (build it with: python -m venv /tmp/llvenv && /tmp/llvenv/bin/pip install llama-cpp-python)
"""

from lmjax.core import hugepages

if __name__ == "__main__":  # huge pages as lmjax's commands have them; before JAX is imported
  hugepages.reexec_with_huge_pages()

import json
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lmjax import model, pretrained
from lmjax.data import shakespeare
from lmjax.inference import sampler
from lmjax.model import quantize
from lmjax.ops import quantized

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Greedy tokens decoded per measurement.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "int8", "int4"], "lmjax weight dtypes.")
_LLAMA = flags.DEFINE_string("llama_python", None, "A Python with llama_cpp installed (None: skip).")
_KL_TOKENS = flags.DEFINE_integer("kl_tokens", 1024, "Held-out tokens for the KL measurement.")
_NAME = "smollm2-135m-instruct"
_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."

# The prompt goes in one token at a time (n_batch=1): llama-cpp-python 0.3.36 built on an Intel Xeon
# with AVX-512 VNNI/AMX (2026-12-01) segfaulted on batched prompts. t_eval times only the generated
# tokens, one per step either way.
_LLAMA_SCRIPT = """
import json, sys, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_threads=2, n_ctx=512, n_batch=1, n_ubatch=1, verbose=False)
out = llm.create_completion(sys.argv[2], max_tokens=int(sys.argv[3]), temperature=0,
                            logit_bias={llm.token_eos(): -1e9})
perf = llama_cpp.llama_perf_context(llm.ctx)
print(json.dumps({"n_eval": perf.n_eval, "t_eval_ms": perf.t_eval_ms}))
"""


def sum_bandwidth() -> float:
  """GB/s a jitted sum reads from a 512 MiB fp32 array (best of 5)."""
  x = jnp.ones((128, 1 << 20), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  best = min(_timed(lambda: total(x).block_until_ready()) for _ in range(5))
  return x.nbytes / best / 1e9


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def weight_bytes_per_token(params) -> int:
  """Bytes of all weights: what one decode step of a tied-embedding model (SmolLM2) reads, as its head
  reads the whole embedding."""
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, quantized.QuantizedWeight))
  return sum(w.nbytes for w in leaves)


def lmjax_decode(cfg, params, prompt_ids) -> float:
  """Decode tokens/s of one greedy row after its prompt (compiled before timing)."""
  tokens = jnp.asarray([prompt_ids], jnp.int32)
  positions = jnp.arange(tokens.shape[1])[None]
  args = dict(sampling=sampler.SamplingConfig(temperature=0.0), eos_id=-1, pad_id=0)
  state = sampler.prefill(cfg, params, tokens, positions, jax.random.key(0), num_new=_NEW.value, **args)
  run = lambda: jax.block_until_ready(sampler.decode(cfg, params, state, jnp.int32(_NEW.value), **args))
  run()
  return (_NEW.value - 1) / min(_timed(run) for _ in range(2))


def llama_decode(path: str) -> float:
  out = subprocess.run(
    [_LLAMA.value, "-c", _LLAMA_SCRIPT, path, _PROMPT, str(_NEW.value)],
    capture_output=True,
    text=True,
    check=True,
  )
  perf = json.loads(out.stdout.strip().splitlines()[-1])
  return perf["n_eval"] / perf["t_eval_ms"] * 1e3


def _kl_window(tokens: int) -> int:
  """Tokens a forward of the KL measurement takes: 512, or fewer (one window) for --kl_tokens below it."""
  return min(512, tokens)


def mean_kl(cfg, params, params_q, ids) -> float:
  """Mean over tokens of KL(p_fp32 || p_q) of the next-token distributions, nats."""
  apply = jax.jit(lambda p, t: jax.nn.log_softmax(model.Transformer(cfg).apply({"params": p}, t)))
  width = _kl_window(len(ids))
  windows = np.asarray(ids[: len(ids) // width * width]).reshape(-1, width)
  kls = []
  for row in windows:
    logp = np.asarray(apply(params, jnp.asarray(row[None])), np.float64)
    logq = np.asarray(apply(params_q, jnp.asarray(row[None])), np.float64)
    kls.append((np.exp(logp) * (logp - logq)).sum(-1).ravel())
  return float(np.concatenate(kls).mean())


def decode_step_kl(cfg, params, cfg_q, params_q, ids) -> float:
  """Mean KL(p_fp32 || p_q) where p_q comes from one-token decode steps over a KV cache (cfg_q /
  params_q in the decoding layout: on a CPU the C++ decode kernels, whose int8 products also round x
  to int8), p_fp32 from one fp32 forward over the same tokens. nats."""
  logp = np.asarray(
    jax.nn.log_softmax(model.Transformer(cfg).apply({"params": params}, ids[None])), np.float64
  )
  step = jax.jit(
    lambda p, cache, token: model.Transformer(cfg_q).apply({"params": p}, token[None, None], cache=cache)
  )
  cache = model.init_cache(cfg_q, 1, len(ids))
  kls = []
  for t, token in enumerate(ids):
    logits, cache = step(params_q, cache, jnp.int32(token))
    logq = np.asarray(jax.nn.log_softmax(logits[0, 0]), np.float64)
    kls.append((np.exp(logp[0, t]) * (logp[0, t] - logq)).sum())
  return float(np.mean(kls))


def main(_):
  models = {
    dtype: pretrained.load(_NAME, dtype=None if dtype == "float32" else dtype) for dtype in _DTYPES.value
  }
  # as LanguageModel holds them: unrolled layers, fp32 matrices [N, K] (model.quantize.for_decoding)
  decoding = {dtype: quantize.for_decoding(cfg, params) for dtype, (cfg, params, _) in models.items()}
  tokenizer = models[_DTYPES.value[0]][2]
  prompt_ids = tokenizer.encode(_PROMPT)
  print(f"prompt {len(prompt_ids)} tokens, {_NEW.value} greedy tokens, batch 1")
  results = {name: [] for name in ["sum GB/s", *_DTYPES.value] + (["llama.cpp"] if _LLAMA.value else [])}
  for r in range(_ROUNDS.value):
    results["sum GB/s"].append(sum_bandwidth())
    for dtype in _DTYPES.value:
      results[dtype].append(lmjax_decode(*decoding[dtype], prompt_ids))
    if _LLAMA.value:
      results["llama.cpp"].append(llama_decode(pretrained.resolve(_NAME)))
    print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in results.items()), flush=True)
  bandwidth = np.median(results["sum GB/s"]) * 1e9
  for name, values in results.items():
    line = f"{name:10s} {min(values):7.1f} - {max(values):7.1f}"
    if name in models:
      per_token = weight_bytes_per_token(models[name][1])
      limit = bandwidth / per_token
      line += f" tok/s; weights {per_token / 1e6:6.1f} MB/token, limit {limit:6.1f} tok/s at the median sum"
      line += f" bandwidth: {np.median(values) / limit:5.1%} of it"
      # The sum's rate moves between rounds on a shared host: each round against its own sum too.
      rounds = [v * per_token / (sum_gbs * 1e9) for v, sum_gbs in zip(values, results["sum GB/s"])]
      line += "; by round " + ", ".join(f"{r:.0%}" for r in rounds)
    print(line)
  text_ids = tokenizer.encode(shakespeare.shakespeare_text()[-40000:])[: _KL_TOKENS.value]
  window = _kl_window(len(text_ids))
  cfg, params, _ = models.get("float32") or pretrained.load(_NAME)
  for dtype in _DTYPES.value:
    if dtype in quantize.QUANTIZED_DTYPES:
      loaded = mean_kl(cfg, params, models[dtype][1], text_ids)
      ours = mean_kl(cfg, params, quantize.quantize_params(params, dtype), text_ids)
      print(
        f"mean KL(fp32 || {dtype}) per token over {len(text_ids) // window * window} Shakespeare tokens: "
        f"{loaded:.5f} nats as loaded (the file's blocks kept where their bits match), {ours:.5f} "
        "with every matrix quantized by lmjax"
      )
      steps = decode_step_kl(cfg, params, *decoding[dtype], jnp.asarray(text_ids[:256]))
      first = f"first {min(256, len(text_ids))} tokens"
      print(f"  through one-token decode steps (the decode kernels), {first}, as loaded: {steps:.5f}")


if __name__ == "__main__":
  app.run(main)
