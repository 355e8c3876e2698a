"""What a finished run writes besides checkpoints and metrics: text samples and task scores.

Called on process 0 only, with host-local weights (train._host_params gathers them on every process
first), so nothing here touches arrays sharded across processes.
"""
from __future__ import annotations

import json
import os

from lmjax import evaluate, rundir, sample


def write_task_eval(setup, params, workdir: str, when: str) -> None:
  """Scores the task on held-out examples; task_eval.json/.md hold the before/after table."""
  path = os.path.join(workdir, "task_eval.json")
  results = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      results = json.load(f)
  if setup.task == "search":
    results[when] = evaluate.evaluate_search(setup.model_cfg, params, setup.tokenizer, len(setup.task_examples))
  else:
    results[when] = evaluate.evaluate_task(setup.model_cfg, params, setup.tokenizer, setup.task, setup.task_examples)
  rundir.write_json(path, results)
  table = evaluate.markdown_table({f"{k} fine-tuning": v for k, v in results.items()})
  rundir.write_atomic(os.path.join(workdir, "task_eval.md"),
                      f"Task `{setup.task}`, {len(setup.task_examples)} held-out examples\n\n{table}")
  print(f"task {setup.task} {when} fine-tuning: " + json.dumps(results[when], ensure_ascii=False), flush=True)


def write_samples(cfg, model_cfg, params, tokenizer, workdir: str) -> None:
  """`train.num_samples` continuations of `train.sample_prompt` (temperature 0.8) into samples.txt.
  preflight.check_sizes has checked that the prompt encodes and leaves room in the context."""
  tc = cfg.train
  prompt = tc.sample_prompt or "\n"
  ids = tokenizer.encode(prompt)
  result = sample.generate_tokens(model_cfg, params, [ids] * tc.num_samples,
                                  min(tc.sample_len, model_cfg.max_len - len(ids)),
                                  sample.SamplingConfig(temperature=0.8, top_k=0), seed=cfg.seed,
                                  eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id or 0)
  texts = [prompt + tokenizer.decode(row) for row in result.tokens]
  rundir.write_atomic(os.path.join(workdir, "samples.txt"), "\n\n==========\n\n".join(texts) + "\n")
  print("samples (also in samples.txt):\n" + "\n----------\n".join(texts), flush=True)
