"""The continuous-batching engine alone (no HTTP): `--requests` SmolLM2 chat prompts submitted at once,
`--max_tokens` greedy tokens each. Prints, per round, the wall time, tokens/s, and the seconds spent
in prefill and in decode steps (the engine thread's `_prefill` and `_step`), so the prefill's share of a
burst shows without the server's and clients' overheads (benchmarks/serve_throughput.py has those).

  python benchmarks/engine_burst.py --dtype=float32
"""

from lmjax.core import hugepages

if __name__ == "__main__":  # huge pages as lmjax's commands have them; before JAX is imported
  hugepages.reexec_with_huge_pages()

import collections
import threading
import time

from absl import app, flags

from lmjax.inference import engine as engine_lib
from lmjax.inference.language_model import LanguageModel

_DTYPE = flags.DEFINE_string("dtype", "float32", "Weights: float32, bfloat16, int8 or int4.")
_REQUESTS = flags.DEFINE_integer("requests", 16, "Chat prompts submitted at once.")
_TOKENS = flags.DEFINE_integer("max_tokens", 128, "Tokens per reply (ignore_eos).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Engine slots.")
_CONTEXT = flags.DEFINE_integer("max_context", 256, "Engine cache columns per slot.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Bursts, one after another in the same engine.")


def main(_):
  lm = LanguageModel.from_pretrained(
    "smollm2-135m-instruct", dtype=None if _DTYPE.value == "float32" else _DTYPE.value
  )
  eng = engine_lib.Engine(lm.cfg, lm.params, lm.tokenizer, _MAX_BATCH.value, _CONTEXT.value, max_queue=256)
  eng.warmup()
  spent = collections.Counter()
  for name in ("_prefill", "_step"):  # the engine thread's two phases, timed in place
    run = getattr(eng, name)

    def timed(run=run, name=name):
      start = time.perf_counter()
      run()
      spent[name] += time.perf_counter() - start

    setattr(eng, name, timed)
  prompts = [
    lm.tokenizer.encode(lm.chat_prompt(f"Write a short poem about topic {i}."))
    for i in range(_REQUESTS.value)
  ]
  for round_ in range(_ROUNDS.value):
    spent.clear()
    done = [threading.Event() for _ in prompts]
    requests = [
      engine_lib.Request(p, _TOKENS.value, lambda d, f, e=e: f and e.set(), temperature=0, ignore_eos=True)
      for p, e in zip(prompts, done)
    ]
    start = time.perf_counter()
    with eng._wake:  # admitted together
      for request in requests:
        eng.submit(request)
    for event in done:
      event.wait()
    wall = time.perf_counter() - start
    print(
      f"round {round_}: {wall:.2f} s, {len(prompts) * _TOKENS.value / wall:.1f} tokens/s; "
      f"prefill {spent['_prefill']:.2f} s, decode steps {spent['_step']:.2f} s"
    )
  eng.close()


if __name__ == "__main__":
  app.run(main)
