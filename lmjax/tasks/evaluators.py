"""Evaluation: task metrics from greedy answers, and perplexity on a text.

Used by the trainer (before/after task scores, end-of-run samples) and by `lmjax-evaluate`
(cli/evaluate.py) on any run or pretrained model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import jax
import numpy as np

from lmjax import model
from lmjax.core import files
from lmjax.data import tokenizer_base
from lmjax.data.tokenizer_base import Tokenizer
from lmjax.inference import sampler
from lmjax.inference.language_model import LanguageModel
from lmjax.tasks import generators, harness, metrics
from lmjax.tasks.losses import mean_pooled


def answer(cfg, params, tokenizer, prompts, max_new_tokens: int, batch_size: int = 32) -> list:
  """Greedy continuations (strings, without the prompt) of `prompts`, `batch_size` at a time.

  A prompt longer than the context leaves for `max_new_tokens` keeps its end (as training cuts from
  the left). Raises ValueError when `max_new_tokens` leaves no room for any prompt (>= cfg.max_len).
  """
  answers, room = [], cfg.max_len - max_new_tokens  # prompts too long keep their end, as in training
  if room < 1:
    raise ValueError(
      f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a {cfg.max_len}-token context"
    )
  for start in range(0, len(prompts), batch_size):
    chunk = [tokenizer.encode(p)[-room:] for p in prompts[start : start + batch_size]]
    result = sampler.generate_tokens(
      cfg,
      params,
      chunk,
      max_new_tokens,
      sampler.SamplingConfig(temperature=0.0),
      eos_id=tokenizer.eos_id,
      pad_id=tokenizer.pad_id or 0,
    )
    answers += [tokenizer.decode(t) for t in result.tokens]
  return answers


def evaluate_task(cfg, params, tokenizer, task: str, examples) -> dict:
  """The task's metrics (generators.score: percentages, 0-100) of greedy answers to the examples'
  prompts against their responses, with the example count and the first prediction and reference."""
  longest = max(len(tokenizer.encode(e.response)) for e in examples)
  predictions = answer(cfg, params, tokenizer, [e.prompt for e in examples], longest + 2)
  return {
    **generators.score(task, predictions, [e.response for e in examples]),
    "examples": len(examples),
    "sample_prediction": predictions[0].strip(),
    "sample_reference": examples[0].response.strip(),
  }


def embed(cfg: model.ModelConfig, params, tokenizer, texts) -> np.ndarray:
  """Embeddings of `texts`: [len(texts), d_model] (see `mean_pooled`)."""
  longest = max(len(tokenizer.encode(t)) for t in texts)
  tokens, positions = tokenizer_base.encode_padded(
    tokenizer, texts, sampler.bucket_length(longest, cfg.max_len)
  )
  return np.asarray(_pooled(cfg, params, tokens, positions))


@functools.partial(jax.jit, static_argnums=0)
def _pooled(cfg: model.ModelConfig, params, tokens_BT, positions_BT):
  """mean_pooled hidden states, compiled once per (config, shapes) and reused by later calls."""
  return mean_pooled(
    lambda t, **kw: model.Transformer(cfg).apply({"params": params}, t, **kw), tokens_BT, positions_BT
  )


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg: model.ModelConfig, params, tokens_BT):
  """Next-token logits [B, T, V], compiled once per (config, shapes) (periodic evaluations reuse it)."""
  return model.Transformer(cfg).apply({"params": params}, tokens_BT)


def evaluate_search(cfg, params, tokenizer, count: int = 32, seed: int = generators.EVAL_SEED) -> dict:
  """recall@1, recall@5 and MRR (percentages, 0-100) of retrieving each of `count` queries' paraphrased
  passage among all passages by cosine similarity of mean-pooled embeddings (metrics.retrieval_scores)."""
  passages, queries, relevant = generators.search_set(count, seed)
  similarity = embed(cfg, params, tokenizer, queries) @ embed(cfg, params, tokenizer, passages).T
  return {k: 100 * v for k, v in metrics.retrieval_scores(similarity, relevant).items()}


def perplexity(cfg: model.ModelConfig, params, tokenizer, text: str, seq_len: int) -> dict:
  """exp(mean next-token NLL) with every token of `text` after the first scored exactly once.

  Windows of seq_len + 1 tokens start every seq_len tokens (disjoint targets, each predicted from up
  to seq_len tokens of context); when they do not reach the end, one more window ends at the last
  token and scores only the targets the others left (lm-eval's rolling loglikelihood with disjoint
  windows; HF's strided perplexity with stride = seq_len). A text shorter than a window is one
  window. Returns loss (nats/token), perplexity and the number of tokens scored (len(ids) - 1).
  """
  ids = np.asarray(tokenizer.encode(text), np.int32)
  if len(ids) < 2:
    raise ValueError(f"the text has {len(ids)} tokens; perplexity needs at least 2")
  width = min(seq_len + 1, len(ids))
  starts = list(range(0, len(ids) - width + 1, width - 1))
  if starts[-1] + width < len(ids):
    starts.append(len(ids) - width)
  total, scored_until = 0.0, 0  # targets at positions <= scored_until are done
  for start in starts:
    window = ids[start : start + width]
    logits = np.asarray(_logits(cfg, params, window[None, :-1]), np.float64)[0]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz - logits[np.arange(width - 1), window[1:]]  # target positions start+1 .. start+width-1
    new = start + 1 + np.arange(width - 1) > scored_until
    total += float(nll[new].sum())
    scored_until = start + width - 1
  count = len(ids) - 1
  return {"loss": total / count, "perplexity": math.exp(total / count), "tokens": count}


def markdown_table(rows: dict) -> str:
  """{row name: {metric: value}} -> a markdown table (numbers to 2 decimals)."""
  columns = sorted({k for r in rows.values() for k, v in r.items() if isinstance(v, float)})
  lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for name, r in rows.items():
    lines.append(f"| {name} | " + " | ".join(f"{r[c]:.2f}" if c in r else "" for c in columns) + " |")
  return "\n".join(lines) + "\n"


# Evaluators: objects with a `name` that the trainer calls as `evaluator(params, workdir, when, step)`
# at the points named in `.when` ("before": step 0 of a fresh run, "after": the end) and, during
# training, every `.every` steps (when = "step"; 0: never), on process 0 only, with host-local weights
# (the trainer gathers them on every process first). Each returns its numbers as {"NAME/metric":
# value}, which the trainer logs with the step (metrics.jsonl, TensorBoard, W&B) and keeps the last of
# in finished.json; a finished run re-started re-runs only the end-of-run evaluators with no numbers
# on record at its last step (samples, for one).
# A task brings its own (task scores, end-of-run samples); the config declares more in `cfg.evals`
# (eval_config.py, big_vision's style).


def named_numbers(name: str, results: dict) -> dict:
  """{f"{name}/{key}": float} of the int and float values of `results` (strings and bools left out)."""
  return {
    f"{name}/{k}": float(v)
    for k, v in results.items()
    if isinstance(v, (int, float)) and not isinstance(v, bool)
  }


@dataclasses.dataclass
class TaskScores:
  """Scores a built-in task on held-out examples; task_eval.json/.md hold the before/after table.
  Its numbers are logged as "NAME/metric" (NAME: `name`, else the task)."""

  task: str
  examples: list
  model_cfg: model.ModelConfig
  tokenizer: Tokenizer
  when: tuple = ("before", "after")
  every: int = 0
  filename: str = "task_eval"  # FILENAME.json / .md, one per evaluator
  row_label: str = "{} fine-tuning"  # the table's row name, given `when`
  name: str = ""  # "" = the task's name

  def __post_init__(self):
    self.name = self.name or self.task

  def __call__(self, params, workdir: str, when: str, step: int) -> dict:
    label = f"step {step}" if when == "step" else when
    path = os.path.join(workdir, f"{self.filename}.json")
    results = {}
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        results = json.load(f)
    if self.task == "search":
      results[label] = evaluate_search(self.model_cfg, params, self.tokenizer, len(self.examples))
    else:
      results[label] = evaluate_task(self.model_cfg, params, self.tokenizer, self.task, self.examples)
    files.write_json(path, results)
    table = markdown_table({self.row_label.format(k): v for k, v in results.items()})
    files.write_atomic(
      os.path.join(workdir, f"{self.filename}.md"),
      f"Task `{self.task}`, {len(self.examples)} held-out examples\n\n{table}",
    )
    print(
      f"task {self.task} {label} fine-tuning: " + json.dumps(results[label], ensure_ascii=False), flush=True
    )
    return named_numbers(self.name, {k: v for k, v in results[label].items() if k != "examples"})


@dataclasses.dataclass
class Samples:
  """`count` continuations of `prompt` (temperature 0.8) into samples.txt, or one continuation of each
  of `prompts` when given (a fine-tuning run's held-out prompts, in its training format: plain text
  or a chat template's tokenizer_base.ChatText, whose special tokens encode as such).
  preflight.check_sizes has checked that `prompt` encodes and leaves room in the context; `prompts`
  that do not are skipped."""

  count: int
  prompt: str
  max_new_tokens: int
  seed: int
  model_cfg: model.ModelConfig
  tokenizer: Tokenizer
  when: tuple = ("after",)
  every: int = 0
  filename: str = "samples.txt"
  prompts: tuple = ()
  name: str = "samples"

  def __call__(self, params, workdir: str, when: str, step: int) -> dict:
    tokenizer, limit = self.tokenizer, self.model_cfg.max_len
    prompts = list(self.prompts) or [self.prompt or "\n"] * self.count
    encoded = [(p, tokenizer.encode(p)) for p in prompts]  # a chat-formatted prompt keeps its specials
    encoded = [(p, ids) for p, ids in encoded if 0 < len(ids) < limit]
    if not encoded:
      return {}
    prompts, ids = zip(*encoded)
    result = sampler.generate_tokens(
      self.model_cfg,
      params,
      list(ids),
      self.max_new_tokens,  # may pass the context (sampler.py: past_context)
      sampler.SamplingConfig(temperature=0.8, top_k=0),
      seed=self.seed,
      eos_id=tokenizer.eos_id,
      pad_id=tokenizer.pad_id or 0,
    )
    texts = [prompt + tokenizer.decode(row) for prompt, row in zip(prompts, result.tokens)]
    name = self.filename if when == "after" else self.filename.replace(".txt", f"_step{step}.txt")
    files.write_atomic(os.path.join(workdir, name), "\n\n==========\n\n".join(texts) + "\n")
    print(f"samples at step {step} (also in {name}):\n" + "\n----------\n".join(texts), flush=True)
    return {}


@dataclasses.dataclass
class Perplexity:
  """Perplexity of a text (`perplexity`): logged as NAME/loss (nats/token) and NAME/perplexity."""

  name: str
  text: str
  seq_len: int
  model_cfg: model.ModelConfig
  tokenizer: Tokenizer
  when: tuple = ("after",)
  every: int = 0

  def __call__(self, params, workdir: str, when: str, step: int) -> dict:
    del workdir, when
    result = perplexity(self.model_cfg, params, self.tokenizer, self.text, self.seq_len)
    print(
      f"eval {self.name} at step {step}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f}",
      flush=True,
    )
    return named_numbers(self.name, {k: result[k] for k in ("loss", "perplexity")})


@dataclasses.dataclass
class LmEval:
  """lm-evaluation-harness tasks (harness.evaluate) on the current weights: lm-eval's results JSON and
  table go to lm_eval_NAME/step_STEP.{json,md}, each task's metrics (stderr left out) are logged as
  NAME/TASK/METRIC (lm-eval's filter suffix ",none" dropped, another filter kept as "_FILTER").
  `manager`: the lm_eval TaskManager that knows `tasks` (harness.task_manager), built once."""

  name: str
  tasks: tuple
  manager: object
  model_cfg: model.ModelConfig
  tokenizer: Tokenizer
  limit: int | None = None
  num_fewshot: int | None = None
  batch_size: int = 16
  when: tuple = ("after",)
  every: int = 0

  def __call__(self, params, workdir: str, when: str, step: int) -> dict:
    del when
    lm = LanguageModel(self.model_cfg, params, self.tokenizer)
    results = harness.evaluate(lm, self.tasks, self.manager, self.limit, self.num_fewshot, self.batch_size)
    output = os.path.join(workdir, f"lm_eval_{self.name}", f"step_{step}")
    table = harness.write_results(results, output)
    print(f"eval {self.name} (lm-eval) at step {step}:\n{table}", flush=True)
    return named_numbers(self.name, harness.task_metrics(results))
