"""`lmjax-sample` (python -m lmjax.cli.sample): text from a run, a checkpoint or a pretrained model.

lmjax-sample --workdir=runs/shakespeare_char --prompt="ROMEO:" --stream
lmjax-sample --pretrained=smollm2-135m-instruct --chat --prompt="What is the capital of France?"
lmjax-sample --pretrained=/path/to/hf_model_dir --prompt="Once upon a time"
"""

import os

from absl import app, flags

from lmjax import cli, pretrained
from lmjax.core import errors
from lmjax.data import tokenizer_base
from lmjax.inference import sampler
from lmjax.inference.language_model import LanguageModel

flags.DEFINE_string("workdir", None, "A training run: sample from its latest checkpoint.")
flags.DEFINE_string("checkpoint", None, "One checkpoint step directory (<workdir>/checkpoints/<step>).")
flags.DEFINE_string(
  "pretrained",
  None,
  "A registered name (smollm2-135m-instruct), a .gguf file, a Hugging Face directory or a run.",
)
flags.DEFINE_enum(
  "dtype",
  None,
  list(pretrained.INFERENCE_DTYPES),
  "Parameter/compute dtype (default: the model's own; fp32 for GGUF/HF files); int8/int4: quantized "
  "weights, fp32 activations (GGUF Q8_0 / Q4_0 / Q4_1 blocks are kept as they are).",
)
flags.DEFINE_bool("chat", False, "Wrap each prompt in the model's chat template (instruct models).")
flags.DEFINE_string("system", None, "System message for --chat (default: the template's own).")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
flags.DEFINE_string("prompt_file", None, "A file with one prompt per line.")
flags.DEFINE_integer(
  "max_new_tokens",
  200,
  "Tokens to generate per sample (past the context too: see --past_context).",
  lower_bound=1,
)
flags.DEFINE_enum(
  "past_context",
  "auto",
  list(sampler.PAST_CONTEXT),
  "Past the model's context, predict from the last max_len tokens by nanoGPT's crop (a forward pass "
  "of the window per token) or a rolling KV cache (RoPE models; one cached step per token); auto: "
  "rolling for RoPE models, crop otherwise.",
)
flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.", lower_bound=0)
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).", lower_bound=0)
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
flags.DEFINE_float("repetition_penalty", 1.0, "Penalise tokens already present (1 = off).")
flags.DEFINE_integer("num_samples", 1, "Samples per prompt.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Sampling seed (same seed, same samples).")
flags.DEFINE_bool(
  "stream", False, "Print text as it is generated, whole characters only (one prompt, one sample)."
)
flags.DEFINE_multi_string(
  "stop",
  [],
  "Stop a sample when its text contains this string (repeatable); the printed text ends before it.",
)


def main(argv):
  """Samples as the flags say (`run()` parses them first; call `run([...])` from Python)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logging()
  f = flags.FLAGS
  if sum(bool(x) for x in (f.workdir, f.checkpoint, f.pretrained)) != 1:
    raise app.UsageError("give exactly one of --workdir, --checkpoint or --pretrained")
  if not 0 < f.top_p <= 1:
    raise errors.UserError(f"--top_p={f.top_p}: give a probability mass in (0, 1] (1 = off)")
  if f.repetition_penalty <= 0:
    raise errors.UserError(f"--repetition_penalty={f.repetition_penalty}: give a factor above 0 (1 = off)")
  if f.prompt_file and not os.path.isfile(f.prompt_file):
    raise errors.UserError(f"--prompt_file={f.prompt_file}: no such file")
  if f.temperature == 0 and (f.top_k or f.top_p < 1):
    raise errors.UserError(
      f"--top_k={f.top_k} / --top_p={f.top_p} filter sampling, but --temperature=0 is greedy and "
      "would ignore them: set --temperature > 0, or drop --top_k/--top_p"
    )
  if f.pretrained:
    lm = LanguageModel.from_pretrained(f.pretrained, dtype=f.dtype)
  else:
    lm = LanguageModel.from_checkpoint(f.workdir or f.checkpoint, dtype=f.dtype)
  try:
    sampler.rolling_config(lm.cfg, f.past_context)
  except ValueError as err:
    raise errors.UserError(f"--past_context: {err}") from None
  prompts = list(f.prompt)
  if f.prompt_file:
    with open(f.prompt_file, encoding="utf-8") as fh:
      prompts += [line.rstrip("\n") for line in fh if line.strip()]
  # Shells pass "\n" literally; a prompt like "ROMEO:\n" means a newline.
  prompts = [p.replace("\\n", "\n").replace("\\t", "\t") for p in prompts] or ["\n"]
  try:
    encoded = [lm.tokenizer.encode(lm.chat_prompt(p, f.system) if f.chat else p) for p in prompts]
  except ValueError as err:  # e.g. a character the run's char tokenizer never saw
    raise errors.UserError(f"a prompt cannot be encoded: {err}") from None
  kwargs = dict(
    max_new_tokens=f.max_new_tokens,
    temperature=f.temperature,
    top_k=f.top_k,
    top_p=f.top_p,
    repetition_penalty=f.repetition_penalty,
    do_sample=f.temperature > 0,
    seed=f.seed,
    stop_sequences=f.stop,
    past_context=f.past_context,
  )
  if f.stream:
    if len(prompts) != 1 or f.num_samples != 1:
      raise app.UsageError("--stream prints one sample of one prompt")
    stream, shown, hold = tokenizer_base.TextStream(lm.tokenizer), "", max([len(s) - 1 for s in f.stop] + [0])
    print(prompts[0] if not f.chat else f"> {prompts[0]}\n", end="", flush=True)

    def show(text, final=False):  # text that could still begin a stop string is held back
      nonlocal shown
      visible = tokenizer_base.cut_at_stop(text, f.stop)
      end = len(visible) if final or len(visible) < len(text) else max(len(shown), len(text) - hold)
      print(visible[len(shown) : end], end="", flush=True)
      shown = visible[:end]

    def on_token(token_B):
      stream.push(token_B[0])
      show(stream.released)

    _generate(lm, encoded[0], on_token=on_token, **kwargs)
    stream.flush()
    show(stream.released, final=True)
    print()
    return
  outputs = _generate(lm, encoded, num_return_sequences=f.num_samples, **kwargs)
  for i, out in enumerate(outputs):
    print(f"===== prompt {i // f.num_samples + 1}, sample {i % f.num_samples + 1} =====")
    continuation = tokenizer_base.cut_at_stop(
      lm.tokenizer.decode(out[len(encoded[i // f.num_samples]) :]), f.stop
    )
    if f.chat:  # show the question and the answer, not the template's markup
      print(f"> {prompts[i // f.num_samples]}")
      print(continuation.strip())
    else:
      print(prompts[i // f.num_samples] + continuation)


def _generate(lm, prompts, **kwargs):
  """lm.generate, its ValueErrors (a prompt empty or too long for the context) the user's to fix."""
  try:
    return lm.generate(prompts, **kwargs)
  except ValueError as err:
    raise errors.UserError(f"cannot sample: {err}") from None


def run(argv=None):
  """The console script: parses `argv` (default sys.argv) and runs `main`."""
  cli.run(main, argv)


if __name__ == "__main__":
  run()
