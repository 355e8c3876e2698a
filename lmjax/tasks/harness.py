"""lmjax as an lm-evaluation-harness model (EleutherAI's lm-eval, `lm_eval.api.model.TemplateLM`),
registered under the name "lmjax": pass `LmjaxLM.from_name("smollm2-135m-instruct")` (or
`LmjaxLM(language_model)`) as `model=` to `lm_eval.simple_evaluate`, or run
`python -m lmjax.evaluate --model=RUN|pretrained:NAME --tasks=...`. The three request kinds:

- `loglikelihood` (multiple choice, LAMBADA): TemplateLM splits each (context, continuation) as
  lm-eval's `hf` backend does: trailing spaces of the context move to the continuation, the whole
  text is encoded and the continuation is what follows the context's tokens (so a first token that
  merges across the boundary belongs to the continuation); an empty context is the prefix token.
  Scoring shares and packs rows (loglikelihood.score).
- `loglikelihood_rolling` (perplexity): lm-eval's disjoint rolling windows of max_len tokens over
  each document, the first conditioned on the prefix token (`lm_eval.utils.get_rolling_token_windows`,
  context_len 1); the document's log-likelihood is the sum over its windows.
- `generate_until`: lmjax's sampler with the task's `until` strings (the text ends before the first)
  and `max_gen_toks`; greedy unless the task asks to sample (`do_sample` with a temperature > 0).
  The prompt keeps its last max_len - max_gen_toks tokens when it is longer (as the `hf` backend).

The prefix token (before an empty context and a document's first window) is the tokenizer's BOS,
else its EOS, as for the `hf` backend; a character-level tokenizer with neither uses the id of "\\n".
"""

from __future__ import annotations

import collections
import json
import os

from lm_eval import utils as lm_eval_utils
from lm_eval.api import model as lm_eval_model
from lm_eval.api.registry import register_model

from lmjax.core import errors, files
from lmjax.data import tokenizer_base
from lmjax.inference.language_model import LanguageModel
from lmjax.tasks import harness_tasks, loglikelihood


@register_model("lmjax")
class LmjaxLM(lm_eval_model.TemplateLM):
  """A LanguageModel behind lm-eval's LM interface (module docstring). `batch_size`: log-likelihood
  sequences per forward pass (each as long as the longest request, holding one or more requests:
  loglikelihood.score), prompts per generate_until batch; `max_gen_toks`: generate_until's default
  length."""

  def __init__(self, lm: LanguageModel | None = None, pretrained: str = "", batch_size=16, max_gen_toks=256):
    super().__init__()
    if (lm is None) == (not pretrained):
      raise ValueError("give a LanguageModel or pretrained= (a run directory, registered name or model file)")
    self.lm = lm or LanguageModel.from_pretrained(pretrained)
    self.tokenizer = self.lm.tokenizer
    self.batch_size = int(batch_size)
    self.max_gen_toks = int(max_gen_toks)

  @classmethod
  def from_name(cls, name: str, **kwargs) -> "LmjaxLM":
    """A run directory, registered name, GGUF file or Hugging Face directory (pretrained.load)."""
    return cls(pretrained=name, **kwargs)

  @property
  def max_length(self) -> int:
    return self.lm.cfg.max_len

  @property
  def eot_token_id(self) -> int:
    return self._special(self.tokenizer.eos_id, self.tokenizer.bos_id)

  @property
  def prefix_token_id(self) -> int:
    return self._special(self.tokenizer.bos_id, self.tokenizer.eos_id)  # the hf backend's order

  def _special(self, *candidates) -> int:
    for special in candidates:
      if special is not None:
        return special
    try:
      return self.tokenizer.encode("\n")[0]
    except ValueError:
      raise ValueError(
        "the tokenizer has no EOS or BOS and no newline to start an empty context or a document's first "
        "window with; evaluate a model whose tokenizer has one"
      ) from None

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list:
    del add_special_tokens, kwargs  # lmjax's tokenizers add no special tokens to plain text
    return list(self.tokenizer.encode(string))

  def tok_decode(self, tokens) -> str:
    return self.tokenizer.decode(tokens)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list:
    """requests: [((context, continuation), context ids, continuation ids)] (TemplateLM's split)."""
    results = loglikelihood.score(
      self.lm.cfg, self.lm.params, [(c, x) for _, c, x in requests], self.batch_size
    )
    for (key, _, _), result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", key, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
    windows, owner = [], []
    for doc, request in enumerate(requests):
      tokens = self.tok_encode(request.args[0])
      rolling = lm_eval_utils.get_rolling_token_windows(
        token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
      )
      for window in map(lm_eval_utils.make_disjoint_window, rolling):
        windows.append(window)
        owner.append(doc)
    scores = loglikelihood.score(self.lm.cfg, self.lm.params, windows, self.batch_size)
    totals = [0.0] * len(requests)
    for doc, (logprob, _) in zip(owner, scores):
      totals[doc] += logprob
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list:
    by_kwargs = collections.defaultdict(list)  # one sampler call per distinct generation setting
    for i, request in enumerate(requests):
      context, gen_kwargs = request.args
      by_kwargs[repr(sorted(gen_kwargs.items()))].append((i, context, gen_kwargs))
    outputs = [None] * len(requests)
    for group in by_kwargs.values():
      gen_kwargs = dict(group[0][2])
      until = gen_kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      length = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
      temperature = float(gen_kwargs.pop("temperature", 0.0))
      sample = bool(gen_kwargs.pop("do_sample", False)) and temperature > 0
      room = max(1, self.max_length - length)
      prompts = [self.tok_encode(context)[-room:] for _, context, _ in group]
      for start in range(0, len(prompts), self.batch_size):
        chunk = prompts[start : start + self.batch_size]
        sequences = self.lm.generate(
          chunk, max_new_tokens=length, do_sample=sample, temperature=temperature or 1.0, stop_sequences=until
        )
        for (i, context, kwargs), prompt, seq in zip(group[start : start + len(chunk)], chunk, sequences):
          text = self.tokenizer.decode(seq[len(prompt) :])
          outputs[i] = tokenizer_base.cut_at_stop(text, until)
          self.cache_hook.add_partial("generate_until", (context, kwargs), outputs[i])
    return outputs


def task_manager(tasks) -> object:
  """lm-eval's TaskManager for `tasks` (names), with the local tasks written (harness_tasks.write).
  lm-eval's own index of its ~15k standard tasks takes ~12 s to build on this CPU, so it is read only
  when a task is not one of the local ones. Raises errors.ConfigError naming the unknown tasks."""
  from lm_eval.tasks import TaskManager  # ~1 s: only where lm-eval tasks are run

  local_only = set(tasks) <= set(harness_tasks.TASKS)
  manager = TaskManager(include_path=harness_tasks.write(), include_defaults=not local_only)
  unknown = sorted(set(tasks) - set(manager.all_tasks))
  if unknown:
    raise errors.ConfigError(
      f"unknown lm-eval tasks {unknown}: give names `lm_eval ls tasks` lists, or the local ones "
      f"{list(harness_tasks.TASKS)}"
    )
  return manager


def evaluate(lm: LanguageModel, tasks, manager, limit=None, num_fewshot=None, batch_size: int = 16) -> dict:
  """lm-eval's `simple_evaluate` of `lm` on `tasks` (names `manager` knows): its results dict
  ("results": {task: {"metric,filter": value}}, "samples", "config", ...). `limit`: documents per
  task (an int) or a fraction (< 1); `num_fewshot`: None for each task's own."""
  from lm_eval import evaluator  # ~1 s: only where lm-eval tasks are run

  return evaluator.simple_evaluate(
    model=LmjaxLM(lm, batch_size=batch_size),
    tasks=list(tasks),
    num_fewshot=num_fewshot,
    limit=limit,
    task_manager=manager,
  )


def write_results(results: dict, output: str) -> str:
  """Writes lm-eval's results as OUTPUT.json and its markdown table as OUTPUT.md (directories made);
  returns the table."""
  table = lm_eval_utils.make_table(results)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  files.write_atomic(output + ".json", json.dumps(results, indent=2, default=str, ensure_ascii=False))
  files.write_atomic(output + ".md", table)
  return table


def task_metrics(results: dict) -> dict:
  """{"TASK/METRIC": value} of lm-eval's results: the numbers of each task (and group), without their
  standard errors; lm-eval's default filter suffix ",none" is dropped, another becomes "_FILTER"."""
  numbers = {}
  for task, metrics in results["results"].items():
    for key, value in metrics.items():
      metric, _, filter_name = key.partition(",")
      if "_stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
        continue
      suffix = "" if filter_name in ("", "none") else f"_{filter_name}"
      numbers[f"{task}/{metric}{suffix}"] = float(value)
  return numbers
