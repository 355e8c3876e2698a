"""`lmjax-evaluate` (python -m lmjax.cli.evaluate): task metrics and perplexity of any run or model.

  lmjax-evaluate --workdir=runs/ft_qa --task=qa
  lmjax-evaluate --pretrained=smollm2-135m-instruct --task=translate --num_examples=64
  lmjax-evaluate --workdir=runs/shakespeare_char --text_file=some.txt
  lmjax-evaluate --model=pretrained:smollm2-135m-instruct --tasks=lmjax_qa_mc,lmjax_shakespeare_ppl
  lmjax-evaluate --model=runs/my_run --tasks=hellaswag,arc_easy --num_fewshot=0 --limit=100

Results are printed and written as JSON and as a markdown table (--output). With --tasks the model
runs under EleutherAI's lm-evaluation-harness (tasks/harness.py): any of its tasks by name (they
download their datasets: a machine with internet), and the local tasks lmjax_qa_mc, lmjax_qa_gen and
lmjax_shakespeare_ppl (tasks/harness_tasks.py, offline); lm-eval's results JSON and its table go
to --output, default <run>/lm_eval/results.{json,md} for a run.
"""

import json
import os

from absl import app, flags
from lm_eval import utils as lm_eval_utils

from lmjax import cli, pretrained
from lmjax.core import errors, files
from lmjax.inference.language_model import LanguageModel
from lmjax.run import rundir
from lmjax.tasks import evaluators, generators, harness

flags.DEFINE_string("workdir", None, "A training or fine-tuning run (latest checkpoint).")
flags.DEFINE_string("pretrained", None, "A registered name, a .gguf file, a Hugging Face directory or a run.")
flags.DEFINE_enum(
  "dtype",
  None,
  list(pretrained.INFERENCE_DTYPES),
  "Parameter/compute dtype to evaluate in (default: the model's own); int8/int4: quantized weights.",
)
flags.DEFINE_enum("task", None, sorted(generators.GENERATORS) + ["search"], "A built-in task to score.")
flags.DEFINE_integer("num_examples", 64, "Task examples to score.")
flags.DEFINE_string("text_file", None, "A UTF-8 text to compute perplexity on.")
flags.DEFINE_integer("seq_len", 256, "Window length for perplexity.", lower_bound=2)
flags.DEFINE_string("output", None, "Write OUTPUT.json and OUTPUT.md.")
flags.DEFINE_string(
  "model", None, "lm-eval: a run directory, or pretrained:NAME (registered name, .gguf, HF dir)."
)
flags.DEFINE_list("tasks", None, "lm-eval task names (comma-separated); lmjax_* tasks are local.")
flags.DEFINE_integer("num_fewshot", None, "lm-eval: few-shot examples per prompt (default: the task's).")
flags.DEFINE_float("limit", None, "lm-eval: documents per task (an integer), or a fraction below 1.")
flags.DEFINE_integer("batch_size", 16, "lm-eval: sequences per forward pass (requests share and pack them).")


def main(argv):
  """Evaluates as the flags say; prints JSON and a markdown table, writes them with --output."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logging()
  f = flags.FLAGS
  if f.tasks or f.model:
    return _harness(f)
  if bool(f.workdir) == bool(f.pretrained):
    raise app.UsageError("give exactly one of --workdir or --pretrained")
  if f.text_file and not os.path.isfile(f.text_file):
    raise errors.UserError(f"--text_file={f.text_file}: no such file")
  lm = LanguageModel.from_pretrained(f.workdir or f.pretrained, dtype=f.dtype)
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
    try:
      with open(f.text_file, encoding="utf-8") as fh:
        text = fh.read()
      results["text"] = evaluators.perplexity(
        lm.cfg, lm.params, lm.tokenizer, text, min(f.seq_len, lm.cfg.max_len - 1)
      )
    except ValueError as err:  # not UTF-8, too short, or a character the run's tokenizer never saw
      raise errors.UserError(f"--text_file={f.text_file}: {err}") from None
  if not results:
    raise app.UsageError("nothing to evaluate: give --task and/or --text_file")
  print(json.dumps(results, indent=2, ensure_ascii=False))
  print(evaluators.markdown_table(results))
  if f.output:
    files.write_json(f.output + ".json", results)
    files.write_atomic(f.output + ".md", evaluators.markdown_table(results))


def _harness(f) -> None:
  """--model/--tasks: the model under lm-eval (harness.evaluate), local tasks written first."""
  if not (f.model and f.tasks):
    raise app.UsageError("lm-eval needs both --model (a run or pretrained:NAME) and --tasks")
  if f.workdir or f.pretrained or f.task or f.text_file:
    raise app.UsageError(
      "--model/--tasks (lm-eval) and --workdir/--pretrained/--task/--text_file are two modes"
    )
  name = cli.model_source(f.model)
  manager = harness.task_manager(f.tasks)
  lm = LanguageModel.from_pretrained(name, dtype=f.dtype)
  limit = None if f.limit is None else (int(f.limit) if f.limit >= 1 else f.limit)
  results = harness.evaluate(lm, f.tasks, manager, limit, f.num_fewshot, f.batch_size)
  dtype = f.dtype or lm.cfg.dtype  # the compute dtype, recorded as lm-eval records a model's arguments
  results.setdefault("config", {})["model_args"] = f"model={f.model},dtype={dtype}"
  output = f.output or (os.path.join(name, "lm_eval", "results") if rundir.is_run(name) else None)
  if output:
    print(harness.write_results(results, output))
    print(f"wrote {output}.json and {output}.md")
  else:
    print(lm_eval_utils.make_table(results))


def run(argv=None):
  """The console script: parses `argv` (default sys.argv) and runs `main`."""
  cli.run(main, argv)


if __name__ == "__main__":
  run()
