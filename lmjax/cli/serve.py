"""`lmjax-serve` (python -m lmjax.serve): an OpenAI-compatible HTTP server for a run or pretrained model,
with continuous batching (lmjax/inference/engine.py, server.py).

lmjax-serve --model=pretrained:smollm2-135m-instruct --dtype=int8
lmjax-serve --model=runs/my_run --port=8000 --api_key=secret --max_batch=16

Then any OpenAI client: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")`.
It listens on 127.0.0.1 only unless --host says otherwise.
"""

import os

from absl import app, flags

from lmjax import cli, pretrained
from lmjax.inference import engine, server
from lmjax.inference.language_model import LanguageModel

flags.DEFINE_string("model", None, "An lmjax run directory, or pretrained:NAME (registered, .gguf, HF dir).")
flags.DEFINE_enum(
  "dtype",
  None,
  list(pretrained.INFERENCE_DTYPES),
  "Weights' dtype (default: the model's own); int8/int4: quantized.",
)
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0 exposes the server to the network).")
flags.DEFINE_integer("port", 8000, "TCP port.")
flags.DEFINE_string(
  "api_key", None, "Require `Authorization: Bearer KEY` (default: $LMJAX_API_KEY, else none)."
)
flags.DEFINE_integer("max_batch", 8, "Requests decoded together (cache slots).", lower_bound=1)
flags.DEFINE_integer(
  "max_context", 512, "Longest prompt + max_tokens served (cache columns per slot).", lower_bound=2
)
flags.DEFINE_integer(
  "max_queue", 64, "Requests that may wait beyond the free slots; more get HTTP 429.", lower_bound=0
)
flags.DEFINE_integer(
  "prefill_chunk",
  engine.PREFILL_CHUNK,
  "Prompt tokens prefilled between two decode steps (chunked prefill): lower keeps running replies "
  "flowing while a long prompt arrives, higher prefills long prompts sooner.",
  lower_bound=16,
)
flags.DEFINE_integer(
  "prefix_cache",
  8,
  "Recent prompts and finished replies (with their prompts) whose KV caches are kept, so a prompt that "
  "begins as one of them (a chat's next turn, a repeated system prompt or document) is prefilled only "
  "from where they part; each costs one slot's cache memory; 0 keeps none.",
  lower_bound=0,
)


def main(argv):
  """Serves as the flags say until interrupted (`run()` parses them first)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logging()
  f = flags.FLAGS
  if not f.model:
    raise app.UsageError("give --model (a run directory or pretrained:NAME)")
  import uvicorn

  source = cli.model_source(f.model)
  lm = LanguageModel.from_pretrained(source, dtype=f.dtype)
  eng = engine.Engine(
    lm.cfg,
    lm.params,
    lm.tokenizer,
    f.max_batch,
    min(f.max_context, lm.cfg.max_len),
    f.max_queue,
    f.prefill_chunk,
    f.prefix_cache,
  )
  print(
    f"compiling the decode step for up to {f.max_batch} slots and the prefill of prompt pieces of up to "
    f"{f.prefill_chunk} tokens",
    flush=True,
  )
  eng.warmup()
  name = f.model.removeprefix("pretrained:")
  api = server.create_app(lm, name, eng, f.api_key or os.environ.get("LMJAX_API_KEY"))
  print(
    f"serving {name} on http://{f.host}:{f.port}/v1 ({f.max_batch} slots of {eng.max_context} tokens)",
    flush=True,
  )
  try:
    uvicorn.run(api, host=f.host, port=f.port, log_level="warning")
  finally:
    eng.close()


def run(argv=None) -> None:
  cli.run(main, argv)


if __name__ == "__main__":
  run()
