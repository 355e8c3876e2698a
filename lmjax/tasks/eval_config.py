"""The evaluators an experiment declares in `cfg.evals` (big_vision's style): {name: dict(kind=...,
every=N, options)}, built and checked before training starts, so a typo or a text the tokenizer
cannot read fails at once rather than at the first evaluation hours later.

Kinds (run/config.py's EVAL_OPTIONS lists their options; config.validate has checked them):
- perplexity (text_file, seq_len): evaluators.Perplexity of a UTF-8 text file;
- samples (count, prompt, length): evaluators.Samples into samples_NAME[_stepN].txt;
- task (task, num_examples): evaluators.TaskScores of a built-in task (generators.py, or "search");
- lm_eval (tasks, limit, num_fewshot, batch_size): evaluators.LmEval, lm-evaluation-harness tasks
  by name (comma-separated; the local lmjax_* tasks, or lm-eval's own, which download their data).
"""

from __future__ import annotations

import string

from lmjax import model
from lmjax.core import errors
from lmjax.tasks import evaluators, generators, harness


def _check_prompt(name: str, tokenizer, text: str, room: int) -> None:
  """ConfigError, before training, when `text` does not encode or leaves no room in the context."""
  try:
    ids = tokenizer.encode(text)
  except ValueError as err:
    raise errors.ConfigError(
      f"evals.{name}: its text cannot be encoded by the run's tokenizer: {err}"
    ) from None
  if len(ids) >= room:
    raise errors.ConfigError(
      f"evals.{name}: a prompt of {len(ids)} tokens leaves no room in a context of {room}"
    )


def _perplexity(name, spec, model_cfg, tokenizer, every) -> evaluators.Perplexity:
  try:
    with open(spec.text_file, encoding="utf-8") as f:
      text = f.read()
  except OSError as err:
    raise errors.ConfigError(f"evals.{name}.text_file={spec.text_file!r} cannot be read: {err}") from None
  seq_len = min(spec.get("seq_len", model_cfg.max_len - 1), model_cfg.max_len - 1)
  _check_prompt(name, tokenizer, text, room=len(text) + 2)  # encodes (any length is windowed)
  if len(tokenizer.encode(text)) < 2:
    raise errors.ConfigError(f"evals.{name}.text_file={spec.text_file!r} has fewer than 2 tokens")
  return evaluators.Perplexity(name, text, seq_len, model_cfg, tokenizer, every=every)


def _samples(name, spec, model_cfg, tokenizer, every, seed) -> evaluators.Samples:
  _check_prompt(name, tokenizer, spec.get("prompt", "\n"), room=model_cfg.max_len)
  return evaluators.Samples(
    spec.get("count", 3),
    spec.get("prompt", "\n"),
    spec.get("length", 200),
    seed,
    model_cfg,
    tokenizer,
    every=every,
    filename=f"samples_{name}.txt",
    name=name,
  )


def _task(name, spec, model_cfg, tokenizer, every) -> evaluators.TaskScores:
  if spec.task not in generators.GENERATORS and spec.task != "search":
    raise errors.ConfigError(
      f"evals.{name}.task={spec.task!r} is not a built-in task; known: "
      f"{sorted(generators.GENERATORS) + ['search']}"
    )
  count = spec.get("num_examples", 64)
  if spec.task == "search":
    examples = generators.search_set(count, generators.EVAL_SEED)[1]
  else:
    examples = generators.examples(spec.task, count, generators.EVAL_SEED)
  for example in examples:
    _check_prompt(name, tokenizer, example if spec.task == "search" else example.prompt, model_cfg.max_len)
  return evaluators.TaskScores(
    spec.task,
    examples,
    model_cfg,
    tokenizer,
    when=("after",),
    every=every,
    filename=f"task_eval_{name}",
    row_label="{}",
    name=name,
  )


def _lm_eval(name, spec, model_cfg, tokenizer, every) -> evaluators.LmEval:
  tasks = tuple(t.strip() for t in spec.tasks.split(",") if t.strip())
  try:  # a char tokenizer fitted on the training text would fail at the first evaluation instead
    tokenizer.encode(string.printable)
  except ValueError as err:
    raise errors.ConfigError(
      f"evals.{name} (kind 'lm_eval'): the run's tokenizer cannot encode every printable ASCII character "
      f"({err}), and lm-eval's tasks are arbitrary text; use data.tokenizer='byte', 'bpe' or 'bytelevel', "
      "or a pretrained model's tokenizer"
    ) from None
  try:
    manager = harness.task_manager(tasks)
  except errors.ConfigError as err:
    raise errors.ConfigError(f"evals.{name}.tasks={spec.tasks!r}: {err}") from None
  return evaluators.LmEval(
    name,
    tasks,
    manager,
    model_cfg,
    tokenizer,
    limit=spec.get("limit"),
    num_fewshot=spec.get("num_fewshot"),
    batch_size=spec.get("batch_size", 16),
    every=every,
  )


def from_config(evals_cfg, model_cfg: model.ModelConfig, tokenizer, seed: int) -> list:
  """The evaluators `cfg.evals` declares (module docstring), each run every `every` steps (0: at the
  end only) and at the end. Raises errors.ConfigError for a text file that cannot be read, a text or
  prompt the tokenizer cannot encode or that leaves no room in the context, an unknown built-in or
  lm-eval task, and an lm_eval evaluator on a tokenizer that cannot encode arbitrary text."""
  built = []
  for name, spec in evals_cfg.items():
    every = spec.get("every", 0)
    if spec.kind == "perplexity":
      built.append(_perplexity(name, spec, model_cfg, tokenizer, every))
    elif spec.kind == "samples":
      built.append(_samples(name, spec, model_cfg, tokenizer, every, seed))
    elif spec.kind == "task":
      built.append(_task(name, spec, model_cfg, tokenizer, every))
    else:
      built.append(_lm_eval(name, spec, model_cfg, tokenizer, every))
  return built
