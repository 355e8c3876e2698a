"""`lmjax-evaluate` (python -m lmjax.cli.evaluate): task metrics and perplexity of any run or model.

  lmjax-evaluate --workdir=runs/ft_qa --task=qa
  lmjax-evaluate --pretrained=smollm2-135m-instruct --task=translate --num_examples=64
  lmjax-evaluate --workdir=runs/shakespeare_char --text_file=some.txt

Results are printed and written as JSON and as a markdown table (--output).
"""

import json

from absl import app, flags

from lmjax import cli
from lmjax.core import files
from lmjax.inference.language_model import LanguageModel
from lmjax.tasks import evaluators, generators

flags.DEFINE_string("workdir", None, "A training or fine-tuning run (latest checkpoint).")
flags.DEFINE_string("pretrained", None, "A registered name, a .gguf file, a Hugging Face directory or a run.")
flags.DEFINE_enum("task", None, sorted(generators.GENERATORS) + ["search"], "A built-in task to score.")
flags.DEFINE_integer("num_examples", 64, "Task examples to score.")
flags.DEFINE_string("text_file", None, "A UTF-8 text to compute perplexity on.")
flags.DEFINE_integer("seq_len", 256, "Window length for perplexity.")
flags.DEFINE_string("output", None, "Write OUTPUT.json and OUTPUT.md.")


def main(argv):
  """Evaluates as the flags say; prints JSON and a markdown table, writes them with --output."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logging()
  f = flags.FLAGS
  if bool(f.workdir) == bool(f.pretrained):
    raise app.UsageError("give exactly one of --workdir or --pretrained")
  lm = LanguageModel.from_workdir(f.workdir) if f.workdir else LanguageModel.from_pretrained(f.pretrained)
  results = {}
  if f.task == "search":
    results["search"] = evaluators.evaluate_search(lm.cfg, lm.params, lm.tokenizer, f.num_examples)
  elif f.task:
    results[f.task] = evaluators.evaluate_task(
      lm.cfg,
      lm.params,
      lm.tokenizer,
      f.task,
      generators.examples(f.task, f.num_examples, generators.EVAL_SEED),
    )
  if f.text_file:
    with open(f.text_file, encoding="utf-8") as fh:
      results["text"] = evaluators.perplexity(
        lm.cfg, lm.params, lm.tokenizer, fh.read(), min(f.seq_len, lm.cfg.max_len - 1)
      )
  if not results:
    raise app.UsageError("nothing to evaluate: give --task and/or --text_file")
  print(json.dumps(results, indent=2, ensure_ascii=False))
  print(evaluators.markdown_table(results))
  if f.output:
    files.write_json(f.output + ".json", results)
    files.write_atomic(f.output + ".md", evaluators.markdown_table(results))


def run(argv=None):
  """The console script: parses `argv` (default sys.argv) and runs `main`."""
  cli.run(main, argv)


if __name__ == "__main__":
  run()
