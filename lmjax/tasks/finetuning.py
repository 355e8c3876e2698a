"""Fine-tuning tasks: SFT on prompt/response examples and retrieval, from pretrained weights.

Fine-tuning (`finetune.task` or `finetune.train_file` set) reads prompt/response
examples and starts from `init.from_checkpoint` (an lmjax run) or
`init.pretrained` (e.g. smollm2-135m-instruct); the architecture and tokenizer
come from that source. In LoRA mode the trainable tree is the adapters and the
source weights stay frozen.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from lmjax import model, pretrained
from lmjax.core import errors
from lmjax.data import sft, tokenizer_base
from lmjax.model import lora
from lmjax.run import config as config_lib, rundir
from lmjax.tasks import evaluators, generators, losses
from lmjax.tasks.task import Task

# Model fields a fine-tuning config may change on a loaded architecture.
RUNTIME_MODEL_FIELDS = (
  "dtype",
  "matmul_dtype",
  "dropout",
  "attn_dropout",
  "remat",
  "attention_impl",
  "matmul_impl",
)


def _pinned_base(workdir: str) -> dict | None:
  """The base a LoRA run in `workdir` recorded, when it has checkpoints to resume (else None): its
  adapters only make sense on that base. (A full fine-tune restores all its weights; it needs the
  source only for the architecture and tokenizer.)"""
  if not os.path.exists(os.path.join(workdir, rundir.MODEL_FILE)) or not rundir.steps(workdir):
    return None
  spec = rundir.read_model(workdir)[1]
  return spec.get("base") if spec.get("lora_scale") is not None else None


def prepare(cfg, workdir: str) -> Task:
  """SFT (finetune.task or finetune.train_file) or retrieval (finetune.task='search') from `init.*`."""
  fc, tc = cfg.finetune, cfg.train
  runtime = {k: v for k, v in config_lib.model_values(cfg.model).items() if k in RUNTIME_MODEL_FIELDS}
  model_cfg, base, tokenizer, origin = pretrained.load_init(cfg.init, runtime, pinned=_pinned_base(workdir))
  _check_architecture_fields(cfg, model_cfg)
  if tc.seq_len >= model_cfg.max_len + 1:
    raise errors.ConfigError(
      f"train.seq_len={tc.seq_len} exceeds the source model's context ({model_cfg.max_len})"
    )
  if fc.task == "search":
    return _search(cfg, model_cfg, base, tokenizer, workdir, origin)
  if fc.task:
    train_examples = generators.examples(fc.task, fc.num_train, cfg.seed)
    val_examples = generators.examples(fc.task, fc.num_val, cfg.seed + 1)
  else:
    train_examples = sft.read_jsonl(fc.train_file, tokenizer)
    if fc.val_file:
      val_examples = sft.read_jsonl(fc.val_file, tokenizer)
    else:
      train_examples, val_examples = sft.hold_out(train_examples, fc.train_file)
  train_sft, val_sft = (sft.tokenize(e, tokenizer, tc.seq_len) for e in (train_examples, val_examples))
  for name, rows in (("training", train_sft), ("validation", val_sft)):
    if rows.truncated:
      print(
        f"WARNING: {rows.truncated} of {len(rows.tokens)} {name} examples do not fit "
        f"train.seq_len={tc.seq_len}: "
        f"{rows.prompts_cut} prompts cut from the left (each keeps at least {sft.MIN_PROMPT_SHARE:.0%} of "
        f"the row or all of itself), {rows.responses_cut} responses cut from the right (their EOS kept). "
        f"Raise train.seq_len (at most the model's context, {model_cfg.max_len}) to train on them whole "
        "(data/sft.py: truncation policy)",
        flush=True,
      )
  if cfg.data.packing:  # several examples per row (data/sft.py: pack)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    train_sft, val_sft = sft.pack(train_sft, pad), sft.pack(val_sft, pad)
  task = Task(
    tokenizer=tokenizer,
    model_cfg=model_cfg,
    train_batch=lambda step, p, n: sft.batch_at(train_sft, cfg.seed, step, tc.batch_size, p, n),
    val_batch=lambda i, p, n: sft.batch_at(val_sft, cfg.seed + 1, i, tc.batch_size, p, n),
    train_tokens=int(train_sft.loss_mask.sum()),
    val_tokens=int(val_sft.loss_mask.sum()),
    train_rows=len(train_sft.tokens),
    val_rows=len(val_sft.tokens),
    tokens_per_row=sft.tokens_per_row(train_sft),
    task=fc.task or None,
    evaluators=[
      evaluators.TaskScores(
        fc.task, generators.examples(fc.task, fc.num_eval, generators.EVAL_SEED), model_cfg, tokenizer
      )
    ]
    if fc.task
    else [
      evaluators.Samples(
        tc.num_samples,
        tc.sample_prompt,
        tc.sample_len,
        cfg.seed,
        model_cfg,
        tokenizer,
        # The run's own format: held-out prompts as training saw them, not a bare train.sample_prompt.
        prompts=tuple(e.prompt for e in val_examples[: tc.num_samples]),
      )
    ]
    if tc.num_samples
    else [],
    init=cfg.init.to_dict(),
    base=origin,
  )
  return _trainable(task, cfg, base)


def _check_architecture_fields(cfg, source_cfg: model.ModelConfig) -> None:
  """The architecture comes from the source: a model field set away from its default to something
  the source does not have would be ignored, so it is an error. data.* is never read here: noted."""
  defaults = config_lib.model_values(config_lib.base_config().model)
  conflicts = [
    f"model.{k}={v!r} (the source has {getattr(source_cfg, k)!r})"
    for k, v in config_lib.model_values(cfg.model).items()
    if k not in RUNTIME_MODEL_FIELDS and v != defaults[k] and v != getattr(source_cfg, k)
  ]
  if conflicts:
    raise errors.ConfigError(
      "fine-tuning takes the architecture from its source model (init.*), so these fields would be ignored: "
      f"{', '.join(conflicts)}. Remove them; only {list(RUNTIME_MODEL_FIELDS)} may change."
    )
  base_data = config_lib.base_config().data
  set_data = {k: v for k, v in cfg.data.items() if v != base_data[k] and k != "packing"}
  if set_data:
    print(
      f"NOTE: fine-tuning reads its examples from finetune.*; the data fields {set_data} are not used",
      flush=True,
    )


def _trainable(task: Task, cfg, base) -> Task:
  """Full fine-tuning trains the source weights; LoRA trains adapters over the frozen source."""
  fc = cfg.finetune
  if fc.mode == "lora":
    task.frozen = base
    task.initial = lora.lora_init(
      base, [t.strip() for t in fc.lora_targets.split(",")], fc.lora_rank, jax.random.key(cfg.seed)
    )
    task.lora_scale = fc.lora_alpha / fc.lora_rank
  else:  # 'full' (config.validate allows no other mode)
    task.initial = base
  return task


def _search(cfg, model_cfg, base, tokenizer, workdir: str, origin: dict) -> Task:
  """Retrieval fine-tuning: (query, paraphrased passage) pairs for an in-batch contrastive loss."""
  fc, tc = cfg.finetune, cfg.train
  most = generators.SEARCH_PAIRS
  for field in ("num_train", "num_val", "num_eval"):
    if fc[field] > most:
      raise errors.ConfigError(
        f"finetune.{field}={fc[field]}: the search task has {most} distinct pairs; "
        f"set finetune.{field} <= {most}"
      )
  for field in ("num_train", "num_val"):
    if fc[field] < tc.batch_size:  # a batch holds distinct pairs (each query's negatives are the others)
      raise errors.ConfigError(
        f"finetune.{field}={fc[field]} is smaller than train.batch_size={tc.batch_size}; the contrastive "
        "batch draws distinct pairs: "
        + (f"raise finetune.{field}" if tc.batch_size <= most else f"lower train.batch_size to <= {most}")
      )

  def pairs(count, seed):
    passages, queries, relevant = generators.search_set(count, seed)
    q, q_pos = tokenizer_base.encode_padded(tokenizer, queries, tc.seq_len)
    p, p_pos = tokenizer_base.encode_padded(tokenizer, [passages[r] for r in relevant], tc.seq_len)
    return {"query": q, "query_pos": q_pos, "passage": p, "passage_pos": p_pos}

  def batch_at(arrays, seed, step, p, n):
    rows = np.random.default_rng([seed, step]).choice(len(arrays["query"]), tc.batch_size, replace=False)
    per = tc.batch_size // n
    return {k: v[rows[p * per : (p + 1) * per]] for k, v in arrays.items()}

  train_pairs, val_pairs = pairs(fc.num_train, cfg.seed), pairs(fc.num_val, cfg.seed + 1)
  task = Task(
    tokenizer=tokenizer,
    model_cfg=model_cfg,
    train_batch=lambda step, p, n: batch_at(train_pairs, cfg.seed, step, p, n),
    val_batch=lambda i, p, n: batch_at(val_pairs, cfg.seed + 1, i, p, n),
    train_tokens=int((train_pairs["query_pos"] >= 0).sum() + (train_pairs["passage_pos"] >= 0).sum()),
    val_tokens=int((val_pairs["query_pos"] >= 0).sum() + (val_pairs["passage_pos"] >= 0).sum()),
    train_rows=fc.num_train,
    val_rows=fc.num_val,
    # A row is a query and its passage, both run through the model.
    tokens_per_row=float(
      ((train_pairs["query_pos"] >= 0).sum(1) + (train_pairs["passage_pos"] >= 0).sum(1)).mean()
    ),
    loss=losses.contrastive_loss,
    task="search",
    evaluators=[
      evaluators.TaskScores(
        "search", generators.search_set(fc.num_eval, generators.EVAL_SEED)[1], model_cfg, tokenizer
      )
    ],
    init=cfg.init.to_dict(),
    base=origin,
  )
  return _trainable(task, cfg, base)
