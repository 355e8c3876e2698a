"""What a run trains: the model config, the batches, and the starting weights.

Pretraining reads a text corpus (data.py) and starts from a fresh init.
Fine-tuning (`finetune.task` or `finetune.train_file` set) reads prompt/response
examples and starts from `init.from_checkpoint` (an lmjax run) or
`init.pretrained` (e.g. smollm2-135m-instruct); the architecture and tokenizer
come from that source. In LoRA mode the trainable tree is the adapters and the
source weights stay frozen.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import numpy as np

from lmjax import config as config_lib, data, finetune, model, tasks, tokenizers

# Model fields a fine-tuning config may change on a loaded architecture.
RUNTIME_MODEL_FIELDS = ("dtype", "matmul_dtype", "dropout", "attn_dropout", "remat")


@dataclasses.dataclass
class RunSetup:
  tokenizer: Any
  model_cfg: model.ModelConfig
  train_batch: Callable  # (step, process_index, process_count) -> numpy batch
  val_batch: Callable  # (index, process_index, process_count) -> numpy batch
  train_tokens: int
  val_tokens: int
  initial: Any = None  # trainable params to start from (None: fresh init)
  frozen: Any = None  # weights that do not train (LoRA base)
  lora_scale: float | None = None
  task: str | None = None
  task_examples: list = dataclasses.field(default_factory=list)

  def model_params(self, trainable, frozen):
    """The weights the model runs with."""
    return finetune.merge(frozen, trainable, self.lora_scale) if self.lora_scale is not None else trainable


def is_finetuning(cfg) -> bool:
  return bool(cfg.finetune.task or cfg.finetune.train_file)


def prepare(cfg, workdir: str) -> RunSetup:
  return _finetuning(cfg, workdir) if is_finetuning(cfg) else _pretraining(cfg, workdir)


def _pretraining(cfg, workdir: str) -> RunSetup:
  saved = tokenizers.load(workdir) if os.path.exists(os.path.join(workdir, "tokenizer.json")) else None
  corpus = data.load_corpus(cfg.data, tokenizer=saved)
  tc = cfg.train
  return RunSetup(
      tokenizer=corpus.tokenizer, model_cfg=config_lib.model_config(cfg, corpus.tokenizer.vocab_size),
      train_batch=lambda step, p, n: data.batch_at(corpus.train_ids, cfg.seed, step, tc.batch_size, tc.seq_len, p, n),
      val_batch=lambda i, p, n: data.batch_at(corpus.val_ids, cfg.seed + 1, i, tc.batch_size, tc.seq_len, p, n),
      train_tokens=len(corpus.train_ids), val_tokens=len(corpus.val_ids))


def load_source(init_cfg, runtime: dict):
  """(ModelConfig, params, tokenizer) of `init.from_checkpoint` or `init.pretrained`."""
  if bool(init_cfg.from_checkpoint) == bool(init_cfg.pretrained):
    raise ValueError("fine-tuning needs exactly one of init.from_checkpoint=RUN_DIR or init.pretrained=NAME")
  if init_cfg.pretrained:
    from lmjax import pretrained
    cfg, params, tokenizer = pretrained.load(init_cfg.pretrained)
  else:
    from lmjax.inference import LanguageModel
    lm = LanguageModel.from_workdir(init_cfg.from_checkpoint)
    cfg, params, tokenizer = lm.cfg, lm.params, lm.tokenizer
  return dataclasses.replace(cfg, **runtime), jax.tree.map(np.asarray, params), tokenizer


def _finetuning(cfg, workdir: str) -> RunSetup:
  fc, tc = cfg.finetune, cfg.train
  runtime = {k: v for k, v in config_lib.model_values(cfg.model).items() if k in RUNTIME_MODEL_FIELDS}
  model_cfg, base, tokenizer = load_source(cfg.init, runtime)
  if tc.seq_len >= model_cfg.max_len + 1:
    raise ValueError(f"train.seq_len={tc.seq_len} exceeds the source model's context ({model_cfg.max_len})")
  if fc.task == "search":
    return _search(cfg, model_cfg, base, tokenizer, workdir)
  if fc.task:
    train_examples = tasks.examples(fc.task, fc.num_train, cfg.seed)
    val_examples = tasks.examples(fc.task, fc.num_val, cfg.seed + 1)
  else:
    train_examples = finetune.read_jsonl(fc.train_file, tokenizer)
    if fc.val_file:
      val_examples = finetune.read_jsonl(fc.val_file, tokenizer)
    else:
      train_examples, val_examples = finetune.hold_out(train_examples, fc.train_file)
  train_sft, val_sft = (finetune.tokenize(e, tokenizer, tc.seq_len) for e in (train_examples, val_examples))
  if train_sft.truncated or val_sft.truncated:
    print(f"WARNING: {train_sft.truncated} training and {val_sft.truncated} validation prompts were longer than "
          f"train.seq_len={tc.seq_len} and were cut from the left", flush=True)
  _write_run_model(workdir, model_cfg, cfg)
  setup = RunSetup(
      tokenizer=tokenizer, model_cfg=model_cfg,
      train_batch=lambda step, p, n: finetune.batch_at(train_sft, cfg.seed, step, tc.batch_size, p, n),
      val_batch=lambda i, p, n: finetune.batch_at(val_sft, cfg.seed + 1, i, tc.batch_size, p, n),
      train_tokens=int(train_sft.loss_mask.sum()), val_tokens=int(val_sft.loss_mask.sum()),
      task=fc.task or None, task_examples=tasks.examples(fc.task, fc.num_eval, tasks.EVAL_SEED) if fc.task else [])
  return _trainable(setup, cfg, base)


def _trainable(setup: RunSetup, cfg, base) -> RunSetup:
  """Full fine-tuning trains the source weights; LoRA trains adapters over the frozen source."""
  fc = cfg.finetune
  if fc.mode == "lora":
    setup.frozen = base
    setup.initial = finetune.lora_init(base, [t.strip() for t in fc.lora_targets.split(",")], fc.lora_rank,
                                       jax.random.key(cfg.seed))
    setup.lora_scale = fc.lora_alpha / fc.lora_rank
  elif fc.mode == "full":
    setup.initial = base
  else:
    raise ValueError(f"finetune.mode={fc.mode!r} is not supported; allowed values: ['full', 'lora']")
  return setup


def _search(cfg, model_cfg, base, tokenizer, workdir: str) -> RunSetup:
  """Retrieval fine-tuning: (query, paraphrased passage) pairs for an in-batch contrastive loss."""
  fc, tc = cfg.finetune, cfg.train

  def pairs(count, seed):
    passages, queries, relevant = tasks.search_set(count, seed)
    q, q_pos = data.encode_padded(tokenizer, queries, tc.seq_len)
    p, p_pos = data.encode_padded(tokenizer, [passages[r] for r in relevant], tc.seq_len)
    return {"query": q, "query_pos": q_pos, "passage": p, "passage_pos": p_pos}

  def batch_at(arrays, seed, step, p, n):
    rows = np.random.default_rng([seed, step]).choice(len(arrays["query"]), tc.batch_size, replace=False)
    per = tc.batch_size // n
    return {k: v[rows[p * per:(p + 1) * per]] for k, v in arrays.items()}

  train_pairs, val_pairs = pairs(fc.num_train, cfg.seed), pairs(fc.num_val, cfg.seed + 1)
  _write_run_model(workdir, model_cfg, cfg)
  setup = RunSetup(
      tokenizer=tokenizer, model_cfg=model_cfg,
      train_batch=lambda step, p, n: batch_at(train_pairs, cfg.seed, step, p, n),
      val_batch=lambda i, p, n: batch_at(val_pairs, cfg.seed + 1, i, p, n),
      train_tokens=int((train_pairs["query_pos"] >= 0).sum() + (train_pairs["passage_pos"] >= 0).sum()),
      val_tokens=int((val_pairs["query_pos"] >= 0).sum() + (val_pairs["passage_pos"] >= 0).sum()),
      task="search", task_examples=tasks.search_set(fc.num_eval, tasks.EVAL_SEED)[1])
  return _trainable(setup, cfg, base)


def _write_run_model(workdir: str, model_cfg: model.ModelConfig, cfg) -> None:
  """model.json: the architecture a fine-tuning run uses (not cfg.model), for loading it later."""
  os.makedirs(workdir, exist_ok=True)
  spec = {"model": dataclasses.asdict(model_cfg), "init": cfg.init.to_dict(),
          "lora_scale": cfg.finetune.lora_alpha / cfg.finetune.lora_rank if cfg.finetune.mode == "lora" else None}
  with open(os.path.join(workdir, "model.json"), "w") as f:
    json.dump(spec, f, indent=2)
