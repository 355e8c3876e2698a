"""Evaluation: task metrics from greedy answers, and perplexity on a text.

Runnable alone on a checkpoint or a pretrained model:

  python -m lmjax.evaluate --workdir=runs/ft_qa --task=qa
  python -m lmjax.evaluate --pretrained=smollm2-135m-instruct --task=translate --num_examples=64
  python -m lmjax.evaluate --workdir=runs/shakespeare_char --text_file=some.txt

Results are printed and written as JSON and as a markdown table (--output).
"""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import cli, data, metrics, model, rundir, sample, tasks

def answer(cfg, params, tokenizer, prompts, max_new_tokens: int, batch_size: int = 32) -> list:
  """Greedy continuations of `prompts`, decoded."""
  answers, room = [], cfg.max_len - max_new_tokens  # prompts too long keep their end, as in training
  if room < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a {cfg.max_len}-token context")
  for start in range(0, len(prompts), batch_size):
    chunk = [tokenizer.encode(p)[-room:] for p in prompts[start:start + batch_size]]
    result = sample.generate_tokens(cfg, params, chunk, max_new_tokens, sample.SamplingConfig(temperature=0.0),
                                    eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id or 0)
    answers += [tokenizer.decode(t) for t in result.tokens]
  return answers


def evaluate_task(cfg, params, tokenizer, task: str, examples) -> dict:
  """Scores greedy answers to the examples' prompts against their responses."""
  longest = max(len(tokenizer.encode(e.response)) for e in examples)
  predictions = answer(cfg, params, tokenizer, [e.prompt for e in examples], longest + 2)
  return {**tasks.score(task, predictions, [e.response for e in examples]), "examples": len(examples),
          "sample_prediction": predictions[0].strip(), "sample_reference": examples[0].response.strip()}


def mean_pooled(run_model, tokens_BT, positions_BT) -> jax.Array:
  """L2-normalised mean of the last hidden states over real (position >= 0) tokens.

  `run_model(tokens, **kwargs)` is the model with its weights bound; the contrastive training loss
  (losses.contrastive_loss) and `embed` share this definition.
  """
  hidden_BTD = run_model(tokens_BT, positions_BT=positions_BT, return_hidden=True)
  valid_BT1 = (positions_BT >= 0)[..., None]
  pooled_BD = (hidden_BTD * valid_BT1).sum(1) / jnp.maximum(valid_BT1.sum(1), 1)
  return pooled_BD / jnp.linalg.norm(pooled_BD, axis=-1, keepdims=True)


def embed(cfg: model.ModelConfig, params, tokenizer, texts) -> np.ndarray:
  """Embeddings of `texts`: [len(texts), d_model] (see `mean_pooled`)."""
  longest = max(len(tokenizer.encode(t)) for t in texts)
  tokens, positions = data.encode_padded(tokenizer, texts, sample.bucket_length(longest, cfg.max_len))
  forward = jax.jit(lambda p, x, pos: mean_pooled(
      lambda t, **kw: model.Transformer(cfg).apply({"params": p}, t, **kw), x, pos))
  return np.asarray(forward(params, tokens, positions))


def evaluate_search(cfg, params, tokenizer, count: int = 32, seed: int = tasks.EVAL_SEED) -> dict:
  """recall@1/5 and MRR of retrieving each query's paraphrased passage by cosine similarity."""
  passages, queries, relevant = tasks.search_set(count, seed)
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
  forward = jax.jit(lambda p, x: model.Transformer(cfg).apply({"params": p}, x))
  total, scored_until = 0.0, 0  # targets at positions <= scored_until are done
  for start in starts:
    window = ids[start:start + width]
    logits = np.asarray(forward(params, window[None, :-1]), np.float64)[0]
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


def main(argv):
  from absl import app, flags
  from lmjax.inference import LanguageModel
  del argv
  cli.quiet_library_logging()
  f = flags.FLAGS
  if bool(f.workdir) == bool(f.pretrained):
    raise app.UsageError("give exactly one of --workdir or --pretrained")
  lm = LanguageModel.from_workdir(f.workdir) if f.workdir else LanguageModel.from_pretrained(f.pretrained)
  results = {}
  if f.task == "search":
    results["search"] = evaluate_search(lm.cfg, lm.params, lm.tokenizer, f.num_examples)
  elif f.task:
    results[f.task] = evaluate_task(lm.cfg, lm.params, lm.tokenizer, f.task,
                                    tasks.examples(f.task, f.num_examples, tasks.EVAL_SEED))
  if f.text_file:
    with open(f.text_file, encoding="utf-8") as fh:
      results["text"] = perplexity(lm.cfg, lm.params, lm.tokenizer, fh.read(), min(f.seq_len, lm.cfg.max_len - 1))
  if not results:
    raise app.UsageError("nothing to evaluate: give --task and/or --text_file")
  print(json.dumps(results, indent=2, ensure_ascii=False))
  print(markdown_table(results))
  if f.output:
    rundir.write_json(f.output + ".json", results)
    rundir.write_atomic(f.output + ".md", markdown_table(results))


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "A training or fine-tuning run (latest checkpoint).")
  flags.DEFINE_string("pretrained", None, "A pretrained model name or GGUF path.")
  flags.DEFINE_enum("task", None, sorted(tasks.GENERATORS) + ["search"], "A built-in task to score.")
  flags.DEFINE_integer("num_examples", 64, "Task examples to score.")
  flags.DEFINE_string("text_file", None, "A UTF-8 text to compute perplexity on.")
  flags.DEFINE_integer("seq_len", 256, "Window length for perplexity.")
  flags.DEFINE_string("output", None, "Write OUTPUT.json and OUTPUT.md.")
  app.run(main)
