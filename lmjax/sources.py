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

from lmjax import checkpoint, config as config_lib, data, errors, finetune, model, rundir, tasks, tokenizers

# Model fields a fine-tuning config may change on a loaded architecture.
RUNTIME_MODEL_FIELDS = ("dtype", "matmul_dtype", "dropout", "attn_dropout", "remat")


class MissingBase(errors.UserError, FileNotFoundError):
  """The exact base checkpoint a LoRA run was trained on is gone."""


class BaseChanged(errors.UserError, ValueError):
  """The base a LoRA run recorded no longer has the weights (fingerprint) it was trained on."""


@dataclasses.dataclass
class RunSetup:
  tokenizer: Any
  model_cfg: model.ModelConfig
  train_batch: Callable  # (step, process_index, process_count) -> numpy batch
  val_batch: Callable  # (index, process_index, process_count) -> numpy batch
  train_tokens: int
  val_tokens: int
  train_rows: int  # distinct examples a batch row can be (windows of a token stream, SFT examples)
  val_rows: int
  initial: Any = None  # trainable params to start from (None: fresh init)
  frozen: Any = None  # weights that do not train (LoRA base)
  lora_scale: float | None = None
  task: str | None = None
  task_examples: list = dataclasses.field(default_factory=list)
  run_spec: dict | None = None  # model.json of a fine-tuning run: its architecture and exact base

  def model_params(self, trainable, frozen):
    """The weights the model runs with."""
    return finetune.merge(frozen, trainable, self.lora_scale) if self.lora_scale is not None else trainable

  def save(self, workdir: str) -> None:
    """What loading the run needs besides checkpoints: the tokenizer and, for fine-tuning,
    model.json. The trainer calls this once the run's checkpoint (if any) has restored."""
    self.tokenizer.save(workdir)
    if self.run_spec is not None:
      rundir.write_json(os.path.join(workdir, "model.json"), self.run_spec)


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
      train_tokens=len(corpus.train_ids), val_tokens=len(corpus.val_ids),
      train_rows=max(0, len(corpus.train_ids) - tc.seq_len), val_rows=max(0, len(corpus.val_ids) - tc.seq_len))


def load_source(init_cfg, runtime: dict, pinned: dict | None = None):
  """(ModelConfig, params, tokenizer, origin) of `init.from_checkpoint` or `init.pretrained`.

  `init.from_checkpoint` is a run directory (its latest step) or one step, `RUN/checkpoints/STEP`.
  `origin` says exactly which weights were loaded: the run and step, or the pretrained name, and
  the params' fingerprint (checkpoint.fingerprint). With `pinned` (an origin recorded earlier) that
  step is loaded and its fingerprint verified, so a run keeps the base it started from even after
  the base run trains on; ValueError when the recorded weights are gone or changed.
  """
  if bool(init_cfg.from_checkpoint) == bool(init_cfg.pretrained):
    raise errors.ConfigError("fine-tuning needs exactly one of init.from_checkpoint=RUN_DIR or init.pretrained=NAME")
  from lmjax.inference import LanguageModel  # sources is imported by inference's loaders (see issue 18)
  if init_cfg.pretrained:
    lm = LanguageModel.from_pretrained(init_cfg.pretrained)
    origin = {"kind": "pretrained", "name": init_cfg.pretrained}
  else:
    run_dir, step = _run_and_step(init_cfg.from_checkpoint, pinned)
    lm = LanguageModel.from_checkpoint(os.path.join(run_dir, "checkpoints", str(step)))
    origin = {"kind": "run", "workdir": run_dir, "step": step}
  params = jax.tree.map(np.asarray, lm.params)
  origin["params_sha256"] = checkpoint.fingerprint(params)
  if pinned and pinned.get("params_sha256") not in (None, origin["params_sha256"]):
    raise BaseChanged(f"the base weights this run was trained on ({pinned}) have changed: {origin} now has "
                     f"fingerprint {origin['params_sha256'][:16]}..., not {pinned['params_sha256'][:16]}...; "
                     "restore the original base (or its file) to load this run")
  return dataclasses.replace(lm.cfg, **runtime), params, lm.tokenizer, origin


def _run_and_step(path: str, pinned: dict | None) -> tuple:
  """(run directory, step) of `init.from_checkpoint`: the pinned step, the step named in the path,
  or the run's latest."""
  if pinned:
    run_dir, step = pinned["workdir"], pinned["step"]
    if step not in checkpoint.step_dirs(run_dir):
      raise MissingBase(
          f"this run was trained on step {step} of {run_dir}, which is no longer there (steps now: "
          f"{checkpoint.step_dirs(run_dir)}; train.max_to_keep may have removed it). Restore that checkpoint to "
          "load this run; merging onto another step would silently give another model")
    return run_dir, step
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  if os.path.basename(path).isdigit() and os.path.basename(parent) == "checkpoints":
    run_dir, step = os.path.dirname(parent), int(os.path.basename(path))
  else:
    steps = checkpoint.step_dirs(path)
    if not steps:
      raise errors.ConfigError(f"init.from_checkpoint={path}: no checkpoints in {path}/checkpoints; train that run "
                               "first, or point at RUN/checkpoints/STEP")
    run_dir, step = path, steps[-1]
  return run_dir, step


def _pinned_base(workdir: str) -> dict | None:
  """The base a LoRA run in `workdir` recorded, when it has checkpoints to resume (else None): its
  adapters only make sense on that base. (A full fine-tune restores all its weights; it needs the
  source only for the architecture and tokenizer.)"""
  path = os.path.join(workdir, "model.json")
  if not os.path.exists(path) or not checkpoint.step_dirs(workdir):
    return None
  with open(path, encoding="utf-8") as f:
    spec = json.load(f)
  return spec.get("base") if spec.get("lora_scale") is not None else None


def _finetuning(cfg, workdir: str) -> RunSetup:
  fc, tc = cfg.finetune, cfg.train
  runtime = {k: v for k, v in config_lib.model_values(cfg.model).items() if k in RUNTIME_MODEL_FIELDS}
  model_cfg, base, tokenizer, origin = load_source(cfg.init, runtime, pinned=_pinned_base(workdir))
  _check_architecture_fields(cfg, model_cfg)
  if tc.seq_len >= model_cfg.max_len + 1:
    raise errors.ConfigError(f"train.seq_len={tc.seq_len} exceeds the source model's context ({model_cfg.max_len})")
  if fc.task == "search":
    return _search(cfg, model_cfg, base, tokenizer, workdir, origin)
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
  for name, sft in (("training", train_sft), ("validation", val_sft)):
    if sft.truncated:
      print(f"WARNING: {sft.truncated} of {len(sft.tokens)} {name} examples do not fit train.seq_len={tc.seq_len}: "
            f"{sft.prompts_cut} prompts cut from the left (each keeps at least {finetune.MIN_PROMPT_SHARE:.0%} of "
            f"the row or all of itself), {sft.responses_cut} responses cut from the right (their EOS kept). Raise "
            "train.seq_len to train on them whole (finetune.py: truncation policy)", flush=True)
  setup = RunSetup(
      tokenizer=tokenizer, model_cfg=model_cfg,
      train_batch=lambda step, p, n: finetune.batch_at(train_sft, cfg.seed, step, tc.batch_size, p, n),
      val_batch=lambda i, p, n: finetune.batch_at(val_sft, cfg.seed + 1, i, tc.batch_size, p, n),
      train_tokens=int(train_sft.loss_mask.sum()), val_tokens=int(val_sft.loss_mask.sum()),
      train_rows=len(train_sft.tokens), val_rows=len(val_sft.tokens),
      task=fc.task or None, task_examples=tasks.examples(fc.task, fc.num_eval, tasks.EVAL_SEED) if fc.task else [],
      run_spec=_run_spec(model_cfg, cfg, origin))
  return _trainable(setup, cfg, base)


def _check_architecture_fields(cfg, source_cfg: model.ModelConfig) -> None:
  """The architecture comes from the source: a model field set away from its default to something
  the source does not have would be ignored, so it is an error. data.* is never read here: noted."""
  defaults = config_lib.model_values(config_lib.base_config().model)
  conflicts = [f"model.{k}={v!r} (the source has {getattr(source_cfg, k)!r})"
               for k, v in config_lib.model_values(cfg.model).items()
               if k not in RUNTIME_MODEL_FIELDS and v != defaults[k] and v != getattr(source_cfg, k)]
  if conflicts:
    raise errors.ConfigError(
        "fine-tuning takes the architecture from its source model (init.*), so these fields would be ignored: "
        f"{', '.join(conflicts)}. Remove them; only {list(RUNTIME_MODEL_FIELDS)} may change.")
  base_data = config_lib.base_config().data
  set_data = {k: v for k, v in cfg.data.items() if v != base_data[k]}
  if set_data:
    print(f"NOTE: fine-tuning reads its examples from finetune.*; the data fields {set_data} are not used",
          flush=True)


def _trainable(setup: RunSetup, cfg, base) -> RunSetup:
  """Full fine-tuning trains the source weights; LoRA trains adapters over the frozen source."""
  fc = cfg.finetune
  if fc.mode == "lora":
    setup.frozen = base
    setup.initial = finetune.lora_init(base, [t.strip() for t in fc.lora_targets.split(",")], fc.lora_rank,
                                       jax.random.key(cfg.seed))
    setup.lora_scale = fc.lora_alpha / fc.lora_rank
  else:  # 'full' (config.validate allows no other mode)
    setup.initial = base
  return setup


def _search(cfg, model_cfg, base, tokenizer, workdir: str, origin: dict) -> RunSetup:
  """Retrieval fine-tuning: (query, paraphrased passage) pairs for an in-batch contrastive loss."""
  fc, tc = cfg.finetune, cfg.train
  for field in ("num_train", "num_val"):
    if fc[field] < tc.batch_size:  # a batch holds distinct pairs (each query's negatives are the others)
      raise errors.ConfigError(f"finetune.{field}={fc[field]} is smaller than train.batch_size={tc.batch_size}; "
                               f"the contrastive batch draws distinct pairs: raise finetune.{field}")

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
  setup = RunSetup(
      tokenizer=tokenizer, model_cfg=model_cfg,
      train_batch=lambda step, p, n: batch_at(train_pairs, cfg.seed, step, p, n),
      val_batch=lambda i, p, n: batch_at(val_pairs, cfg.seed + 1, i, p, n),
      train_tokens=int((train_pairs["query_pos"] >= 0).sum() + (train_pairs["passage_pos"] >= 0).sum()),
      val_tokens=int((val_pairs["query_pos"] >= 0).sum() + (val_pairs["passage_pos"] >= 0).sum()),
      train_rows=fc.num_train, val_rows=fc.num_val,
      task="search", task_examples=tasks.search_set(fc.num_eval, tasks.EVAL_SEED)[1],
      run_spec=_run_spec(model_cfg, cfg, origin))
  return _trainable(setup, cfg, base)


def _run_spec(model_cfg: model.ModelConfig, cfg, origin: dict) -> dict:
  """model.json: the architecture a fine-tuning run uses (not cfg.model) and the exact base weights
  it started from (`origin` of load_source), for loading it later."""
  return {"model": dataclasses.asdict(model_cfg), "init": cfg.init.to_dict(), "base": origin,
          "lora_scale": cfg.finetune.lora_alpha / cfg.finetune.lora_rank if cfg.finetune.mode == "lora" else None}
