"""lmjax-serve under load: 16 chat requests of 128 greedy tokens to SmolLM2-135M on loopback, one at a
time and all at once (continuous batching), through the `openai` client with streaming, from a process
of its own (a load generator's).

Prints total completion tokens/s both ways and their ratio, p50/p95 time to first token of the
concurrent run, and whether every concurrent reply equals LanguageModel.generate's greedy text for
the same chat prompt.

  python benchmarks/serve_throughput.py --dtype=float32
  python benchmarks/serve_throughput.py --dtype=int8 --max_batch=16
  python benchmarks/serve_throughput.py --dtype=float32 --top_logprobs=5   # what logprobs cost
"""

from lmjax.core import hugepages

if __name__ == "__main__":  # huge pages as lmjax's commands have them; before JAX is imported
  hugepages.reexec_with_huge_pages()

import asyncio
import multiprocessing
import socket
import threading
import time

import numpy as np
import openai
import uvicorn
from absl import app, flags

from lmjax.inference import engine as engine_lib, server
from lmjax.inference.language_model import LanguageModel

_DTYPE = flags.DEFINE_string("dtype", "float32", "Weights: float32, bfloat16, int8 or int4.")
_REQUESTS = flags.DEFINE_integer("requests", 16, "Chat requests.")
_TOKENS = flags.DEFINE_integer("max_tokens", 128, "Tokens per reply (ignore_eos: exactly this many).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Engine slots.")
_CONTEXT = flags.DEFINE_integer("max_context", 256, "Engine cache columns per slot.")
_LOGPROBS = flags.DEFINE_integer(
  "top_logprobs", -1, "Ask every request for logprobs with this many alternatives (-1: no logprobs)."
)
_TOPICS = [
  "the sea",
  "a lighthouse",
  "mountains",
  "a library",
  "the moon",
  "a bakery",
  "rain",
  "a train",
  "a garden",
  "winter",
  "a violin",
  "the desert",
  "a city at night",
  "a river",
  "an old map",
  "a fox",
]


async def _ask(client, question: str, max_tokens: int, top_logprobs: int) -> tuple:
  """One streamed chat request: (its text, completion tokens, seconds to its first text)."""
  start, first, text, tokens = time.perf_counter(), None, [], 0
  stream = await client.chat.completions.create(
    model="smollm2",
    messages=[{"role": "user", "content": question}],
    max_tokens=max_tokens,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
    extra_body={"ignore_eos": True},
    **({"logprobs": True, "top_logprobs": top_logprobs} if top_logprobs >= 0 else {}),
  )
  async for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
      first = first or time.perf_counter()
      text.append(chunk.choices[0].delta.content)
    if chunk.usage:
      tokens = chunk.usage.completion_tokens
  return "".join(text), tokens, (first or time.perf_counter()) - start


def generate_load(port: int, questions: list, max_tokens: int, top_logprobs: int) -> tuple:
  """The questions one at a time, then all at once: (seconds, results, seconds, results)."""

  async def load():
    client = openai.AsyncOpenAI(
      base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600
    )
    ask = lambda q: _ask(client, q, max_tokens, top_logprobs)
    await ask(questions[0])  # the server's first request
    start = time.perf_counter()
    one_by_one = [await ask(q) for q in questions]
    sequential_s = time.perf_counter() - start
    start = time.perf_counter()
    together = await asyncio.gather(*(ask(q) for q in questions))
    return sequential_s, one_by_one, time.perf_counter() - start, list(together)

  return asyncio.run(load())


def main(_):
  lm = LanguageModel.from_pretrained(
    "smollm2-135m-instruct", dtype=None if _DTYPE.value == "float32" else _DTYPE.value
  )
  eng = engine_lib.Engine(lm.cfg, lm.params, lm.tokenizer, _MAX_BATCH.value, _CONTEXT.value, max_queue=256)
  eng.warmup()  # as lmjax-serve does before serving
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  uv = uvicorn.Server(
    uvicorn.Config(server.create_app(lm, "smollm2", eng), host="127.0.0.1", port=port, log_level="error")
  )
  threading.Thread(target=uv.run, daemon=True).start()
  while not uv.started:
    time.sleep(0.05)
  questions = [f"Write a short poem about {_TOPICS[i % len(_TOPICS)]}." for i in range(_REQUESTS.value)]
  # The clients run in a process of their own, as a load generator does: in this one, 16 streaming
  # clients' Python (SSE parsing, the openai client's models) took the GIL from the server.
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    sequential_s, one_by_one, concurrent_s, together = pool.apply(
      generate_load, (port, questions, _TOKENS.value, _LOGPROBS.value)
    )
  seq_rate = sum(t for _, t, _ in one_by_one) / sequential_s
  conc_rate = sum(t for _, t, _ in together) / concurrent_s
  ttft = np.array([f for _, _, f in together])
  print(
    f"SmolLM2 {_DTYPE.value}, {len(questions)} chat requests x {_TOKENS.value} tokens, "
    f"{_MAX_BATCH.value} slots:"
  )
  print(f"  one at a time: {sequential_s:.1f} s, {seq_rate:.1f} tokens/s")
  print(f"  concurrent:    {concurrent_s:.1f} s, {conc_rate:.1f} tokens/s ({conc_rate / seq_rate:.2f}x)")
  print(
    f"  time to first token, concurrent: p50 {np.median(ttft):.2f} s, p95 {np.percentile(ttft, 95):.2f} s"
  )
  prompts = [lm.tokenizer.encode(lm.chat_prompt(q)) for q in questions]
  reference = lm.generate(prompts, max_new_tokens=_TOKENS.value, do_sample=False, eos_token_id=-1)
  same = sum(lm.tokenizer.decode(r[len(p) :]) == t for r, p, (t, _, _) in zip(reference, prompts, together))
  print(f"  greedy replies equal to LanguageModel.generate: {same}/{len(questions)}")
  uv.should_exit = True
  eng.close()


if __name__ == "__main__":
  app.run(main)
