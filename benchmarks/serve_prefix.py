"""Automatic prefix caching: the same document asked about twice. SmolLM2-135M-Instruct's engine gets a
chat prompt of a `--document_tokens`-token Shakespeare passage and a first question, then the same
passage with a second question (a chat's next turn, or RAG over one document, shares its first tokens
the same way). Prints the second request's time to first token with the engine's prefix cache
(`--prefix_cache` prompts kept) and without (0), rounds interleaving the two (this machine is noisy),
and whether their greedy replies were the same. Then a request for `--choices` replies to the first
prompt (an API request's `n`; the cache emptied first): the time until every choice has its first token,
with the cache (the choices after the first start from its kept prompt) and without (each prefills all).

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
_CHOICES = flags.DEFINE_integer("choices", 4, "Replies asked for at once in the second measurement.")
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


def ask_choices(eng, ids: list, n: int) -> tuple[float, list]:
  """(seconds until each of `n` choices of one request has its first token, their 16 greedy tokens)."""
  finished = threading.Semaphore(0)
  choices = [
    engine_lib.Request(ids, 16, lambda d, f: f and finished.release(), temperature=0) for _ in range(n)
  ]
  start = time.perf_counter()
  eng.submit(*choices)
  while not all(c.output_ids for c in choices):
    time.sleep(0.0005)
  first = time.perf_counter() - start
  for _ in choices:
    finished.acquire(timeout=120)
  return first, [c.output_ids for c in choices]


def interleaved(engines: dict, once, what: str) -> None:
  """Runs `once(engine)` -> (seconds, replies) on each engine in turn for --rounds rounds, each from an
  empty prefix cache, and prints the seconds' range and whether the replies agreed."""
  seconds, replies = {kept: [] for kept in engines}, {kept: [] for kept in engines}
  for r in range(_ROUNDS.value):
    for kept, eng in engines.items():
      eng.prefixes.clear()
      took, reply = once(eng)
      seconds[kept].append(took)
      replies[kept].append(reply)
    print(f"round {r + 1}: " + ", ".join(f"kept {k}: {v[-1] * 1e3:.0f} ms" for k, v in seconds.items()))
  for kept, took in seconds.items():
    reused = engines[kept].prefixes.reused_tokens
    print(
      f"prefix_cache={kept}: {what} {min(took) * 1e3:.0f}-{max(took) * 1e3:.0f} ms (median "
      f"{np.median(took) * 1e3:.0f}); tokens reused so far {reused}"
    )
  print(f"greedy replies with and without the cache the same: {replies[_KEPT.value] == replies[0]}")


def main(_):
  lm = LanguageModel.from_pretrained("smollm2-135m-instruct", dtype=_DTYPE.value)
  passage = lm.tokenizer.decode(
    lm.tokenizer.encode(shakespeare.shakespeare_text()[:20000])[: _DOCUMENT.value]
  )
  prompts = [lm.tokenizer.encode(lm.chat_prompt(f"{passage}\n\n{q}")) for q in _QUESTIONS]
  shared = next(i for i, (a, b) in enumerate(zip(*prompts)) if a != b)
  print(f"SmolLM2 {_DTYPE.value}: prompts of {len(prompts[0])} and {len(prompts[1])} tokens, {shared} shared")
  engines = {
    kept: engine_lib.Engine(
      lm.cfg, lm.params, lm.tokenizer, _CHOICES.value, _CONTEXT.value, prefix_cache=kept
    )
    for kept in (_KEPT.value, 0)
  }
  try:
    for eng in engines.values():
      eng.warmup()
    second = lambda eng: (ask(eng, prompts[0]), ask(eng, prompts[1]))[1]
    interleaved(engines, second, "second request's time to first token")
    choices = lambda eng: ask_choices(eng, prompts[0], _CHOICES.value)
    interleaved(engines, choices, f"{_CHOICES.value} choices' time to all first tokens")
  finally:
    for eng in engines.values():
      eng.close()


if __name__ == "__main__":
  app.run(main)
