"""Automatic prefix caching: the same document asked about twice. SmolLM2-135M-Instruct's engine gets a
chat prompt of a `--document_tokens`-token Shakespeare passage and a first question, then the same
passage with a second question (a chat's next turn, or RAG over one document, shares its first tokens
the same way). Prints the second request's time to first token with the engine's prefix cache
(`--prefix_cache` prompts kept) and without (0), rounds interleaving the two (this machine is noisy),
and whether their greedy replies were the same.

  python benchmarks/serve_prefix.py --dtype=float32
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
_DOCUMENT = flags.DEFINE_integer("document_tokens", 900, "Tokens of the shared passage.")
_CONTEXT = flags.DEFINE_integer("max_context", 1024, "Engine cache columns per slot.")
_KEPT = flags.DEFINE_integer("prefix_cache", 8, "Prompts the caching engine keeps.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")
_QUESTIONS = ("Who speaks first in this passage?", "Summarise the passage in one sentence.")


def ask(eng, ids: list) -> tuple[float, list]:
  """(seconds to the first token, the 16 greedy tokens) of one request."""
  done = threading.Event()
  request = engine_lib.Request(ids, 16, lambda d, f: f and done.set(), temperature=0)
  start = time.perf_counter()
  eng.submit(request)
  while not request.output_ids:
    time.sleep(0.0005)
  first = time.perf_counter() - start
  done.wait(120)
  return first, request.output_ids


def main(_):
  lm = LanguageModel.from_pretrained("smollm2-135m-instruct", dtype=_DTYPE.value)
  passage = lm.tokenizer.decode(
    lm.tokenizer.encode(shakespeare.shakespeare_text()[:20000])[: _DOCUMENT.value]
  )
  prompts = [lm.tokenizer.encode(lm.chat_prompt(f"{passage}\n\n{q}")) for q in _QUESTIONS]
  shared = next(i for i, (a, b) in enumerate(zip(*prompts)) if a != b)
  print(f"SmolLM2 {_DTYPE.value}: prompts of {len(prompts[0])} and {len(prompts[1])} tokens, {shared} shared")
  engines = {
    kept: engine_lib.Engine(lm.cfg, lm.params, lm.tokenizer, 1, _CONTEXT.value, prefix_cache=kept)
    for kept in (_KEPT.value, 0)
  }
  try:
    for eng in engines.values():
      eng.warmup()
    first_token, replies = {kept: [] for kept in engines}, {kept: [] for kept in engines}
    for r in range(_ROUNDS.value):
      for kept, eng in engines.items():
        eng.prefixes.clear()  # each round from an empty cache
        ask(eng, prompts[0])
        seconds, reply = ask(eng, prompts[1])
        first_token[kept].append(seconds)
        replies[kept].append(reply)
      print(f"round {r + 1}: " + ", ".join(f"kept {k}: {v[-1] * 1e3:.0f} ms" for k, v in first_token.items()))
    for kept, seconds in first_token.items():
      reused = engines[kept].prefixes.reused_tokens
      print(
        f"prefix_cache={kept}: second request's time to first token {min(seconds) * 1e3:.0f}-"
        f"{max(seconds) * 1e3:.0f} ms (median {np.median(seconds) * 1e3:.0f}); tokens reused in all {reused}"
      )
    same = replies[_KEPT.value] == replies[0]
    print(f"greedy replies with and without the cache the same: {same}")
  finally:
    for eng in engines.values():
      eng.close()


if __name__ == "__main__":
  app.run(main)
