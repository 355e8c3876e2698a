"""Sampler tests: cached decoding against full forward passes, sampling filters against numpy."""

import dataclasses
import functools
import os
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from lmjax import model, train
from lmjax.data import tokenizers
from lmjax.inference import LanguageModel, sampler

from conftest import REPO, run_lmjax, tiny_config

V = 23


def tiny_model(pos="rope", n_kv_heads=2, seed=0, max_len=48):
  cfg = model.ModelConfig(
    vocab_size=V,
    max_len=max_len,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=n_kv_heads,
    d_ff=48,
    pos_encoding=pos,
    scan_layers=pos == "rope",
  )
  # Larger weights than the default init give peaked, prompt-dependent distributions.
  params = jax.tree.map(lambda p: p * 4, model.init_params(cfg, jax.random.key(seed)))
  return cfg, params


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens):
  return model.Transformer(cfg).apply({"params": params}, tokens)


def step_logits(cfg, params, prompt, tokens):
  """Logits that predicted each of `tokens`, from ONE full forward pass over prompt + tokens (no cache)."""
  seq = np.asarray([list(prompt) + list(tokens)], np.int32)
  logits = np.asarray(_forward(cfg, params, seq)[0])
  return logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]


@pytest.mark.slow
@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_greedy_equals_argmax_of_full_forward_with_matching_logprobs(pos):
  cfg, params = tiny_model(pos)
  result = sampler.generate_tokens(cfg, params, PROMPTS, 12, sampler.SamplingConfig(temperature=0.0))
  for prompt, tokens, logprobs in zip(PROMPTS, result.tokens, result.logprobs):
    assert len(tokens) == 12
    logits = step_logits(cfg, params, prompt, tokens)
    np.testing.assert_array_equal(tokens, np.argmax(logits, -1))
    # The cache path's log-probabilities equal the full forward's (fp32, < 1e-4).
    chosen = np.take_along_axis(log_softmax(logits), np.asarray(tokens)[:, None], -1)[:, 0]
    assert np.abs(np.asarray(logprobs) - chosen).max() < 1e-4


def sampled_rows(cfg, params, sampling, seed=0, rows=24, steps=6):
  prompts = [[1 + (i % 5), 2 + (i % 3)] for i in range(rows)]
  result = sampler.generate_tokens(cfg, params, prompts, steps, sampling, seed=seed)
  return prompts, result.tokens


@pytest.mark.slow
def test_top_k_never_leaves_the_top_k():
  cfg, params = tiny_model()
  prompts, outputs = sampled_rows(cfg, params, sampler.SamplingConfig(temperature=1.5, top_k=3))
  for prompt, tokens in zip(prompts, outputs):
    for token, logits in zip(tokens, step_logits(cfg, params, prompt, tokens)):
      assert token in np.argsort(-logits)[:3]


@pytest.mark.slow
def test_top_p_never_leaves_the_nucleus():
  cfg, params = tiny_model()
  temperature, top_p = 1.3, 0.6
  prompts, outputs = sampled_rows(cfg, params, sampler.SamplingConfig(temperature=temperature, top_p=top_p))
  for prompt, tokens in zip(prompts, outputs):
    for token, logits in zip(tokens, step_logits(cfg, params, prompt, tokens)):
      probs = np.exp(log_softmax(logits / temperature))
      order = np.argsort(-probs)
      mass_before = np.cumsum(probs[order]) - probs[order]
      nucleus = set(order[mass_before < top_p].tolist())  # smallest prefix reaching top_p
      assert token in nucleus


@pytest.mark.slow
def test_seed_reproducible_and_different_seeds_differ():
  cfg, params = tiny_model()
  sampling = sampler.SamplingConfig(temperature=1.0)
  _, a = sampled_rows(cfg, params, sampling, seed=1)
  _, b = sampled_rows(cfg, params, sampling, seed=1)
  _, c = sampled_rows(cfg, params, sampling, seed=2)
  assert a == b and a != c


@pytest.mark.slow
def test_eos_stops_one_row_while_others_continue():
  cfg, params = tiny_model()
  greedy = sampler.SamplingConfig(temperature=0.0)
  free = sampler.generate_tokens(cfg, params, PROMPTS, 10, greedy).tokens
  # An id that row 0 emits at step j but the other rows never emit becomes EOS.
  candidates = [(j, t) for j, t in enumerate(free[0]) if all(t not in row for row in free[1:])]
  assert candidates, "test model too uniform"
  j, eos = candidates[0]
  stopped = sampler.generate_tokens(cfg, params, PROMPTS, 10, greedy, eos_id=eos).tokens
  assert stopped[0] == free[0][: j + 1]  # stops right after EOS (kept)
  assert stopped[1:] == free[1:]


@pytest.mark.slow
def test_stop_at_ends_a_row_where_it_says():
  cfg, params = tiny_model()
  greedy = sampler.SamplingConfig(temperature=0.0)
  free = sampler.generate_tokens(cfg, params, PROMPTS, 20, greedy).tokens
  # Row 0 stops once 11 tokens exist (checked every STOP_CHECK_EVERY tokens), keeping 5; row 1 runs on.
  seen = []
  stop_at = lambda row, ids: (seen.append(len(ids)), 5 if row == 0 and len(ids) >= 11 else None)[1]
  stopped = sampler.generate_tokens(cfg, params, PROMPTS, 20, greedy, stop_at=stop_at).tokens
  assert stopped[0] == free[0][:5] and stopped[1:] == free[1:]
  assert seen[0] == 1 and all(b - a <= sampler.STOP_CHECK_EVERY for a, b in zip(seen, seen[1:]))


@pytest.mark.slow
def test_repetition_penalty_avoids_seen_tokens():
  cfg, params = tiny_model()
  prompt = [1, 2, 3]
  tokens = sampler.generate_tokens(
    cfg, params, [prompt], 12, sampler.SamplingConfig(temperature=0.0, repetition_penalty=1e6)
  ).tokens[0]
  assert len(set(tokens)) == len(tokens) and not set(tokens) & set(prompt)


@pytest.mark.slow
def test_prompt_errors():
  cfg, params = tiny_model(max_len=20)
  with pytest.raises(ValueError, match="model's context is 20 tokens"):
    sampler.generate_tokens(cfg, params, [list(range(20))], 1)
  with pytest.raises(ValueError, match="prompt is empty"):
    sampler.generate_tokens(cfg, params, [[]], 1)


def crop_and_generate(cfg, params, prompt, num_new):
  """nanoGPT's `generate`, greedy: each next token is the argmax of a full forward pass over the last
  max_len tokens (positions 0..), no cache."""
  ids = list(prompt)
  for _ in range(num_new):
    window = ids[-cfg.max_len :]
    ids.append(next_greedy(cfg, params, window, cfg.max_len))
  return ids[len(prompt) :]


def next_greedy(cfg, params, ids, length):
  """argmax of the logits after `ids`, from a forward pass of them right-padded to `length` (causal:
  padding after the last token does not change its logits; one shape, one compilation)."""
  padded = np.zeros((1, length), np.int32)
  padded[0, : len(ids)] = ids
  return int(np.argmax(np.asarray(_forward(cfg, params, padded))[0, len(ids) - 1]))


def window_and_generate(cfg, params, prompt, num_new):
  """A rolling cache's greedy reference: each next token is the argmax of one full forward pass (no
  cache) over ALL tokens so far at positions 0.., with attention limited to the last max_len positions
  (a sliding window; RoPE does not depend on max_len, so a longer one serves the same weights)."""
  window = min(cfg.sliding_window or cfg.max_len, cfg.max_len)
  long_cfg = dataclasses.replace(cfg, max_len=len(prompt) + num_new, sliding_window=window)
  ids = list(prompt)
  for _ in range(num_new):
    ids.append(next_greedy(long_cfg, params, ids, long_cfg.max_len))
  return ids[len(prompt) :]


PAST_CONTEXT_CASES = [  # model, how past_context is asked for, the reference it must equal
  ("learned", "auto", crop_and_generate),
  ("rope", "crop", crop_and_generate),
  ("rope", "auto", window_and_generate),
  ("rope-window6", "rolling", window_and_generate),
]


@pytest.mark.slow
@pytest.mark.parametrize("pos, past_context, reference", PAST_CONTEXT_CASES)
def test_generation_past_the_context(pos, past_context, reference):
  """max_new_tokens beyond the context keeps generating, without a warning: crop gives the same tokens
  as nanoGPT's crop-and-generate, a rolling cache those of sliding-window attention over the whole
  sequence; for rows of different prompt lengths, all at once and streamed."""
  cfg, params = tiny_model(pos=pos.split("-")[0], max_len=16)
  if pos == "rope-window6":  # a sliding-window model: the rolling cache is its training computation
    cfg = dataclasses.replace(cfg, sliding_window=6)
  prompts, greedy = (
    # the longest leaves one slot: a ring of exactly max_len (bucket 15 + 1)
    [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11, 12, 13, 14], list(range(1, 16))],
    sampler.SamplingConfig(temperature=0.0),
  )
  expected = [reference(cfg, params, p, 30) for p in prompts]
  generate = functools.partial(
    sampler.generate_tokens, cfg, params, prompts, 30, greedy, past_context=past_context
  )
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert generate().tokens == expected
  streamed = []
  result = generate(on_token=lambda ids: streamed.append(ids))
  assert result.tokens == expected and [list(t) for t in zip(*streamed)] == expected


def test_rolling_cache_needs_rope():
  cfg, params = tiny_model(pos="learned", max_len=16)
  with pytest.raises(ValueError, match="past_context='rolling' needs a RoPE model"):
    sampler.generate_tokens(cfg, params, [[1, 2]], 20, past_context="rolling")
  with pytest.raises(ValueError, match="choose one of"):
    sampler.generate_tokens(cfg, params, [[1, 2]], 20, past_context="slide")


@pytest.mark.slow
def test_prompt_lengths_share_bucketed_compilations():
  cfg, params = tiny_model(seed=5)
  greedy = sampler.SamplingConfig(temperature=0.0)
  before = sampler.prefill._cache_size()
  for length in (3, 5, 9, 14, 30):  # buckets: 16, 16, 16, 16, 32
    sampler.generate_tokens(cfg, params, [list(range(1, length + 1))], 4, greedy)
  assert sampler.prefill._cache_size() - before == 2


@pytest.mark.slow
def test_new_max_new_tokens_values_reuse_the_compiled_prefill_and_decode():
  """max_new_tokens 5, 9, 12 and 16 share one compiled prefill and one decode loop (the cache and the
  output buffer are powers of two); each greedy result is the first tokens of the longest one."""
  cfg, params = tiny_model(seed=6)
  greedy = sampler.SamplingConfig(temperature=0.0)
  compiled = lambda: (sampler.prefill._cache_size(), sampler.decode._cache_size())
  longest = sampler.generate_tokens(cfg, params, [[1, 2, 3]], 16, greedy).tokens[0]
  before = compiled()
  for new in (5, 9, 12):
    assert sampler.generate_tokens(cfg, params, [[1, 2, 3]], new, greedy).tokens[0] == longest[:new]
  assert compiled() == before


@pytest.mark.slow
def test_generate_api_and_cli_on_a_trained_run(tmp_path, corpus_file):
  workdir = str(tmp_path / "run")
  train.train(tiny_config(corpus_file, str(tmp_path / "tfds"), steps=20, num_samples=0), workdir)
  lm = LanguageModel.from_workdir(workdir)
  input_ids = lm.tokenizer.encode("ROMEO:")
  out = lm.generate(input_ids, max_length=20, num_return_sequences=2, seed=1)
  assert len(out) == 2 and all(len(o) == 20 and list(o[:6]) == input_ids for o in out)
  assert lm.tokenizer.decode(out[0], skip_special_tokens=True).startswith("ROMEO:")
  texts = lm.generate_text(["JULIET:"], max_new_tokens=5, do_sample=False)
  assert len(texts) == 1 and len(texts[0]) == 5

  result = run_lmjax(
    "sample",
    f"--workdir={workdir}",
    "--prompt=ROMEO:",
    "--prompt=JULIET:",
    "--max_new_tokens=8",
    "--num_samples=2",
    "--seed=3",
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  # User errors: one line and exit status 2, with a hint that is true of sampling.
  unknown = run_lmjax("sample", f"--workdir={workdir}", "--prompt=snow \u2603", timeout=120)
  assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
  assert "use only characters of the training text" in unknown.stderr
  greedy = run_lmjax("sample", f"--workdir={workdir}", "--temperature=0", "--top_k=5", timeout=120)
  assert greedy.returncode == 2 and "set --temperature > 0, or drop --top_k/--top_p" in greedy.stderr
  assert result.stdout.count("=====") == 8 and "ROMEO:" in result.stdout and "JULIET:" in result.stdout
  streamed = run_lmjax(
    "sample",
    f"--workdir={workdir}",
    "--prompt=ROMEO:",
    "--max_new_tokens=8",
    "--temperature=0",
    "--stream",
    timeout=120,
  )
  assert streamed.returncode == 0, streamed.stderr
  greedy = lm.generate_text(["ROMEO:"], max_new_tokens=8, do_sample=False)[0]
  assert streamed.stdout.strip("\n") == ("ROMEO:" + greedy).strip("\n")


@pytest.mark.slow
def test_tokenizer_checkpoint_mismatch_is_a_clear_error(tmp_path, corpus_file):
  workdir = str(tmp_path / "run")
  train.train(tiny_config(corpus_file, str(tmp_path / "tfds"), steps=2, num_samples=0, ckpt_every=2), workdir)
  lm = LanguageModel.from_workdir(workdir)
  with pytest.raises(ValueError, match="tokenizer/checkpoint mismatch"):
    LanguageModel(lm.cfg, lm.params, tokenizers.ByteTokenizer())
  with pytest.raises(FileNotFoundError, match="no checkpoint for step 7"):
    LanguageModel.from_workdir(workdir, step=7)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))


_SHARDED_SCRIPT = """
import jax, numpy as np
from lmjax import model
from lmjax import train
from lmjax.core import sharding
from lmjax.data import tokenizers
from lmjax.inference import sampler
cfg = model.ModelConfig(vocab_size=24, max_len=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
params = jax.tree.map(lambda p: p * 4, model.init_params(cfg, jax.random.key(0)))
prompts = [[1, 2, 3], [4, 5, 6, 7], [8], [9, 10]]
greedy = sampler.SamplingConfig(temperature=0.0)
single = sampler.generate_tokens(cfg, params, prompts, 8, greedy).tokens
mesh = sharding.make_mesh((2, 2, 2))
rules = sharding.DEFAULT_RULES
boxed = model.boxed_param_shapes(cfg)
sharded_params = jax.device_put(params, sharding.logical_shardings(boxed, mesh, rules))
sharded = sampler.generate_tokens(cfg, sharded_params, prompts, 8, greedy, mesh_rules=(mesh, rules)).tokens
assert sharded == single, (sharded, single)
tokens = np.zeros((4, 16), np.int32); positions = np.tile(np.arange(16), (4, 1))
state = sampler.prefill(cfg, sharded_params, tokens, positions, jax.random.key(0), num_new=4, sampling=greedy,
                       eos_id=-1, pad_id=0, mesh_rules=(mesh, rules))
print("cache", state.cache["k"].sharding.spec, state.cache["k"].addressable_shards[0].data.shape)
import dataclasses  # unrolled layers: one cache buffer per layer, sharded alike
cfg = dataclasses.replace(cfg, scan_layers=False)
params = jax.tree.map(lambda p: p * 4, model.init_params(cfg, jax.random.key(0)))
single = sampler.generate_tokens(cfg, params, prompts, 8, greedy).tokens
boxed = model.boxed_param_shapes(cfg)
sharded_params = jax.device_put(params, sharding.logical_shardings(boxed, mesh, rules))
sharded = sampler.generate_tokens(cfg, sharded_params, prompts, 8, greedy, mesh_rules=(mesh, rules)).tokens
assert sharded == single, (sharded, single)
state = sampler.prefill(cfg, sharded_params, tokens, positions, jax.random.key(0), num_new=4, sampling=greedy,
                       eos_id=-1, pad_id=0, mesh_rules=(mesh, rules))
print("layer cache", state.cache["v"][1].sharding.spec, state.cache["v"][1].addressable_shards[0].data.shape)
"""


@pytest.mark.slow
def test_sampling_on_a_mesh_matches_one_device_and_shards_the_cache():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
    [sys.executable, "-c", _SHARDED_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-3000:]
  # k: [layers, batch, kv heads, head_dim, length] -> batch over (data, fsdp) = 4, kv heads over tensor = 2.
  assert "cache P(None, ('data', 'fsdp'), 'tensor') (2, 1, 1, 8, 20)" in result.stdout
  # v of one unrolled layer: [batch, kv heads, length, head_dim].
  assert "layer cache P(('data', 'fsdp'), 'tensor') (1, 1, 20, 8)" in result.stdout
