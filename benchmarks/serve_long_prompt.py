"""Chunked prefill under load: while `--running` greedy requests stream from SmolLM2-135M-Instruct, a
prompt of `--prompt_tokens` tokens (Shakespeare) arrives. For each `--chunks` value of the engine's
prefill_chunk (max_context: the whole prompt at once) prints the longest wait between two tokens of a
running request after the long prompt came (and their median gap before it), the long request's time
to first token, and the running requests' tokens/s over the whole round. Rounds interleave the
settings (this machine is noisy).

  python benchmarks/serve_long_prompt.py --dtype=float32
  python benchmarks/serve_long_prompt.py --dtype=int8 --chunks=2048,256,64 --rounds=3
"""

from lmjax.core import hugepages

if __name__ == "__main__":  # huge pages as lmjax's commands have them; before JAX is imported
  hugepages.reexec_with_huge_pages()

import threading
import time

import numpy as np
from absl import app, flags

from lmjax.data import shakespeare
from lmjax.inference import engine as engine_lib
from lmjax.inference.language_model import LanguageModel

_DTYPE = flags.DEFINE_string("dtype", "float32", "Weights: float32, bfloat16, int8 or int4.")
_RUNNING = flags.DEFINE_integer("running", 4, "Requests streaming when the long prompt arrives.")
_TOKENS = flags.DEFINE_integer("max_tokens", 160, "Tokens per running request (ignore_eos).")
_PROMPT = flags.DEFINE_integer("prompt_tokens", 1536, "Tokens of the long prompt.")
_CONTEXT = flags.DEFINE_integer("max_context", 2048, "Engine cache columns per slot.")
_CHUNKS = flags.DEFINE_list("chunks", ["2048", "512", "256", "128"], "prefill_chunk values to compare.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Interleaved rounds over the settings.")


def one_round(lm, prefill_chunk: int, long_ids: list) -> dict:
  """Starts the running requests, sends the long prompt once each has 8 tokens, waits for all."""
  eng = engine_lib.Engine(
    lm.cfg, lm.params, lm.tokenizer, _RUNNING.value + 1, _CONTEXT.value, prefill_chunk=prefill_chunk
  )
  times = [[] for _ in range(_RUNNING.value + 1)]  # each request's token times
  finished = [threading.Event() for _ in times]

  def request(i, ids, max_tokens):
    def emit(delta, finish):
      times[i].append(time.perf_counter())
      if finish:
        finished[i].set()

    return engine_lib.Request(ids, max_tokens, emit, temperature=0, ignore_eos=True)

  try:
    start = time.perf_counter()
    for i in range(_RUNNING.value):
      eng.submit(request(i, lm.tokenizer.encode(lm.chat_prompt(f"Tell story {i}.")), _TOKENS.value))
    deadline = time.perf_counter() + 600
    while min(len(t) for t in times[:-1]) < 8:
      if any(f.is_set() for f in finished) or time.perf_counter() > deadline:
        raise RuntimeError("a running request ended or stalled before the long prompt was sent")
      time.sleep(0.001)
    arrival = time.perf_counter()
    eng.submit(request(_RUNNING.value, long_ids, 1))
    assert all(f.wait(600) for f in finished)
    end = time.perf_counter()
  finally:
    eng.close()
  gaps = [(b - a, b > arrival) for t in times[:-1] for a, b in zip(t, t[1:])]
  return {
    "step": float(np.median([g for g, after in gaps if not after])),
    "stall": max(g for g, after in gaps if after),
    "ttft": times[-1][0] - arrival,
    "rate": _RUNNING.value * _TOKENS.value / (end - start),
  }


def main(_):
  lm = LanguageModel.from_pretrained(
    "smollm2-135m-instruct", dtype=None if _DTYPE.value == "float32" else _DTYPE.value
  )
  long_ids = lm.tokenizer.encode(shakespeare.shakespeare_text()[:20_000])[: _PROMPT.value]
  chunks = [int(c) for c in _CHUNKS.value]
  for chunk in chunks:  # compile every prefill bucket and decode size once
    one_round(lm, chunk, long_ids)
  results = {chunk: [] for chunk in chunks}
  for _ in range(_ROUNDS.value):
    for chunk in chunks:
      results[chunk].append(one_round(lm, chunk, long_ids))
  print(
    f"SmolLM2 {_DTYPE.value}: a {len(long_ids)}-token prompt arrives while {_RUNNING.value} requests "
    f"stream {_TOKENS.value} tokens each ({_ROUNDS.value} rounds, values per round)"
  )
  for chunk, rounds in results.items():
    show = lambda key, unit, rounds=rounds: " / ".join(f"{r[key]:.2f}" for r in rounds) + unit
    label = "whole" if chunk >= _CONTEXT.value else str(chunk)
    print(
      f"  prefill_chunk {label:>5}: longest gap between tokens {show('stall', ' s')} (median before the "
      f"prompt {show('step', ' s')}), long prompt's first token {show('ttft', ' s')}, running requests "
      f"{show('rate', ' tokens/s')}"
    )


if __name__ == "__main__":
  app.run(main)
