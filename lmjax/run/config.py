"""The config schema: every field an experiment may set, with its default.

Experiment files start from `base_config()` and change what they need;
`validate` rejects any key the schema does not know, naming the valid ones, so
a typo never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import ml_collections
from ml_collections import config_dict

from lmjax import model
from lmjax.core import errors, sharding

# Model fields that the run derives: the vocabulary from the tokenizer, max_len from train.seq_len.
DERIVED_MODEL_FIELDS = ("vocab_size", "max_len")


def base_config() -> ml_collections.ConfigDict:
  """Every config field with its default: experiments start from this and change what they need."""
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0  # parameter init, data order and dropout all derive from it
  cfg.data = dict(
    dataset="shakespeare",  # 'shakespeare', 'text_files', or a TFDS catalog name (when sources='')
    text_files="",  # for text_files: a path, a glob, or a comma-separated list
    val_file="",  # optional separate validation file
    val_fraction=0.1,  # tail of each source held out for validation
    # A mixture: 'spec=weight;spec=weight' with specs text:PATHS, jsonl:PATHS, parquet:PATHS,
    # tfds:NAME, shakespeare (data/sources.py); '' = the one source data.dataset names
    sources="",
    text_key="text",  # the text field of JSONL/Parquet records and TFDS features
    errors="strict",  # non-UTF-8 input: 'strict' stops with file and byte offset, 'replace' writes U+FFFD
    filters="",  # document filters, e.g. 'min_chars:200' (data/filters.py)
    packing=False,  # rows of packed documents with segment_ids and per-document positions
    data_dir="",  # TFDS downloads; '' = ~/tensorflow_datasets
    store_dir="",  # token stores; '' = <data_dir>/lmjax_stores, or ~/.cache/lmjax/stores
    tokenizer="char",  # 'char', 'byte', 'bpe' (SentencePiece) or 'bytelevel' (GPT-2-style, tiktoken)
    vocab_size=config_dict.placeholder(int),  # for bpe and bytelevel (None: unset)
    tokenizer_sample_mb=32,  # bpe/bytelevel are fitted on at most this much of the train text
  )
  cfg.model = {
    f.name: f.default for f in dataclasses.fields(model.ModelConfig) if f.name not in DERIVED_MODEL_FIELDS
  }
  # Optional fields are typed placeholders (None until set; the command line parses the type).
  cfg.model.n_kv_heads = config_dict.placeholder(int)  # None = n_heads (MHA); 1 = MQA; else GQA
  cfg.model.head_dim = config_dict.placeholder(int)  # None = d_model // n_heads
  cfg.model.sliding_window = config_dict.placeholder(int)  # None = full causal; W = the last W positions
  # None = model.dtype; 'bfloat16' with dtype 'float32': bf16 matmul operands, fp32 elsewhere
  cfg.model.matmul_dtype = config_dict.placeholder(str)
  cfg.model.mup_base_width = config_dict.placeholder(int)  # μP: the width tuned at (None: d_model)
  cfg.model.mup_base_head_dim = config_dict.placeholder(int)  # μP: the base's head dim (None: this one)
  cfg.optim = dict(
    name="adamw",  # adamw, lion, adafactor, sgd or muon (train/optimizer.py)
    lr=1e-3,  # peak learning rate, reached after warmup_steps
    schedule="cosine",  # cosine, wsd (warmup-stable-decay), constant or inverse_sqrt (train/schedules.py)
    min_lr=1e-4,  # cosine and wsd decay to this
    warmup_steps=100,  # linear warmup from 0
    # steps of warmup + decay (cosine, wsd); None = train.steps (after them min_lr is held)
    decay_steps=config_dict.placeholder(int),
    decay_fraction=0.2,  # wsd: the last fraction of the decay_steps spent decaying
    decay_shape="sqrt",  # wsd: the decay's shape, linear, cosine or sqrt (1 - sqrt)
    b1=0.9,  # adamw/lion/muon's AdamW branch: beta1
    b2=0.99,  # adamw/lion/muon's AdamW branch: beta2
    eps=1e-8,  # adamw and muon: epsilon
    momentum=config_dict.placeholder(float),  # sgd (default 0.9) and muon (default 0.95)
    nesterov=False,  # sgd: Nesterov momentum (muon always uses it)
    # muon: peak lr of its AdamW branch (embeddings, head, norms, biases); None = lr. The schedule's
    # shape applies to it (scaled by muon_adam_lr / lr)
    muon_adam_lr=config_dict.placeholder(float),
    # On weight matrices and embeddings, not norms or biases: decoupled (-lr * wd * p) for adamw, lion,
    # adafactor and muon; L2 (wd * p added to the gradient) for sgd, where ~100x smaller is typical
    weight_decay=0.1,
    weight_decay_adapters=False,  # LoRA: weight decay on the adapters too
    grad_clip=1.0,  # clip the global gradient norm to this (> 0)
  )
  cfg.train = dict(
    steps=2000,  # optimizer steps of the whole run (a resumed run continues to it)
    batch_size=12,  # global batch, in sequences
    seq_len=64,  # tokens per sequence (also the model's max_len)
    grad_accum=1,  # micro-batches per optimizer step (batch_size must divide by it)
    log_every=100,  # steps between log lines (loss, tok/s, MFU)
    eval_every=250,  # steps between validation losses
    eval_steps=20,  # validation batches per evaluation
    ckpt_every=500,  # steps between checkpoints (and one at the end)
    max_to_keep=3,  # checkpoints kept on disk
    num_samples=3,  # text samples written to samples.txt at the end
    sample_len=200,  # tokens per end-of-run sample
    sample_prompt="\n",  # the end-of-run samples' prompt
    peak_tflops=0.0,  # MFU's peak per device; 0 = its datasheet number (model.PEAK_TFLOPS), if listed
    measure_peak=False,  # on a device with no datasheet peak (a CPU), measure one at start for MFU
  )
  # Where metrics go besides metrics.jsonl and TensorBoard (both always written in the workdir)
  cfg.logging = dict(
    # Weights & Biases (pip install 'lmjax[wandb]'): one W&B run per workdir, continued on resume;
    # WANDB_MODE=offline keeps it in <workdir>/wandb for a later `wandb sync`
    wandb=False,
    wandb_project="lmjax",  # the W&B project
    wandb_entity="",  # the W&B team or user; '' = the API key's default
    wandb_name="",  # the run's display name; '' = the workdir's name
  )
  cfg.mesh = dict(
    shape=(1, 1, 1),  # (data, fsdp, tensor) devices; -1 = the rest, e.g. (1, -1, 1) for FSDP
    rules=sharding.DEFAULT_RULES,  # logical axis -> mesh axis (core/sharding.py)
  )
  # A published result the experiment reproduces (val_loss 0 = none): marked on loss.png and
  # compared with the run's final validation loss in its last log line.
  cfg.reference = dict(
    step=0,  # the step the published value was measured at
    val_loss=0.0,  # the published validation loss (0 = none)
    source="",  # where it comes from and on which corpus, printed beside it
    # The data a run must use for the comparison to apply (`reference_applies`): data.dataset (with
    # data.sources empty) and data.tokenizer; required with val_loss
    dataset="",
    tokenizer="",  # see reference.dataset
  )
  # Fine-tuning: set finetune.task (a built-in task, lmjax/tasks/generators.py) or finetune.train_file
  # (JSONL of {"prompt", "response"} or {"messages"}), and start from exactly one init source.
  cfg.init = dict(
    from_checkpoint="",  # an lmjax run directory to start from (its latest step)
    pretrained="",  # a registered name, GGUF file, Hugging Face directory or lmjax run
  )
  # Evaluators run during training and at the end, big_vision's style: {name: dict(kind=..., every=N,
  # options)}, e.g. evals.ppl = dict(kind="perplexity", every=500, text_file="val.txt") or
  # evals.harness = dict(kind="lm_eval", every=1000, tasks="lmjax_qa_mc", limit=100); EVAL_OPTIONS
  # lists the kinds and their options (tasks/eval_config.py builds them). every=0: at the end only.
  cfg.evals = ml_collections.ConfigDict()
  cfg.finetune = dict(
    task="",  # a built-in task: translate, summarize, qa, search (tasks/generators.py)
    train_file="",  # JSONL of {"prompt", "response"} or {"messages"} (instead of task)
    val_file="",  # JSONL for validation; '' = held out from train_file
    num_train=2000,  # generated task examples for training
    num_val=128,  # generated task examples for validation
    num_eval=64,  # sizes of generated task sets
    mode="full",  # 'full' or 'lora'
    lora_rank=8,  # r of the low-rank adapters (Hu et al. 2021)
    lora_alpha=16.0,  # adapter scale alpha / r
    lora_targets="q,k,v,o",  # targets from q, k, v, o, mlp
  )
  return cfg


def load_experiment(spec: str):
  """'path/to/experiment.py[:variant]' -> the experiment's ConfigDict (what --config= loads)."""
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("lmjax_experiment", path)
  if module_spec is None:
    raise FileNotFoundError(f"no experiment file at {path!r}")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


# Optional fields that configs saved before they were placeholders hold as 0 or '' when unset;
# `unset_is_none` reads those as None (newer placeholders never had such a value).
OPTIONAL_FIELDS = (
  "data.vocab_size",
  "model.n_kv_heads",
  "model.head_dim",
  "model.sliding_window",
  "model.matmul_dtype",
  "optim.decay_steps",
)


def unset_is_none(field: str, value):
  """`value` of `field`, with the legacy unset values 0 and '' of OPTIONAL_FIELDS read as None."""
  return None if field in OPTIONAL_FIELDS and value in (0, "") else value


def model_values(model_block) -> dict:
  """A config's model block as ModelConfig values (unset optional fields as None)."""
  return {k: unset_is_none(f"model.{k}", v) for k, v in model_block.to_dict().items()}


def model_config(cfg, vocab_size: int) -> model.ModelConfig:
  """The ModelConfig of experiment config `cfg`, with the tokenizer's `vocab_size` and
  max_len = train.seq_len. Raises ValueError for model values ModelConfig refuses."""
  values = {**model_values(cfg.model), "vocab_size": vocab_size, "max_len": cfg.train.seq_len}
  return model.ModelConfig.from_dict(values)


def reference_applies(cfg) -> bool:
  """Whether the run's data are those the experiment's published reference was measured for
  (reference.dataset and reference.tokenizer), so that comparing with it means something: a run on
  one's own corpus or tokenizer gets no reference line and no reference point on loss.png."""
  ref, data = cfg.reference, cfg.data
  return (
    bool(ref.val_loss) and not data.sources and (data.dataset, data.tokenizer) == (ref.dataset, ref.tokenizer)
  )


def flat_keys(cfg, prefix: str = "") -> list:
  """Every leaf of `cfg` as a dotted name ('optim.lr'), in order."""
  keys = []
  for key, value in cfg.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(flat_keys(value, f"{prefix}{key}."))
    else:
      keys.append(prefix + key)
  return keys


# Numeric ranges, checked before anything is prepared: (low, low included, high, high included).
_RANGES = {
  "seed": (0, True, None, False),
  "data.val_fraction": (0.0, False, 1.0, False),
  "data.vocab_size": (0, True, None, False),
  "data.tokenizer_sample_mb": (0, False, None, False),
  "optim.lr": (0.0, False, None, False),
  "optim.muon_adam_lr": (0.0, False, None, False),
  "optim.min_lr": (0.0, True, None, False),
  "optim.warmup_steps": (0, True, None, False),
  "optim.decay_steps": (0, True, None, False),
  "optim.b1": (0.0, True, 1.0, False),
  "optim.b2": (0.0, True, 1.0, False),
  "optim.eps": (0.0, True, None, False),
  "optim.weight_decay": (0.0, True, None, False),
  "optim.decay_fraction": (0.0, False, 1.0, True),
  "optim.momentum": (0.0, True, 1.0, False),
  "optim.grad_clip": (0.0, False, None, False),
  "train.steps": (1, True, None, False),
  "train.batch_size": (1, True, None, False),
  "train.seq_len": (1, True, None, False),
  "train.grad_accum": (1, True, None, False),
  "train.log_every": (1, True, None, False),
  "train.eval_every": (1, True, None, False),
  "train.eval_steps": (1, True, None, False),
  "train.ckpt_every": (1, True, None, False),
  "train.max_to_keep": (1, True, None, False),
  "train.num_samples": (0, True, None, False),
  "train.sample_len": (0, True, None, False),
  "train.peak_tflops": (0.0, True, None, False),
  "finetune.num_train": (1, True, None, False),
  "finetune.num_val": (1, True, None, False),
  "finetune.num_eval": (1, True, None, False),
  "finetune.lora_rank": (1, True, None, False),
  "finetune.lora_alpha": (0.0, False, None, False),
}


def _range_text(low, low_in, high, high_in) -> str:
  if high is None:
    return f"{'>=' if low_in else '>'} {low}"
  return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def _get(cfg, field: str):
  for key in field.split("."):
    cfg = cfg[key]
  return cfg


# Evaluator kinds of cfg.evals and the options each takes (the first ones listed are required).
EVAL_OPTIONS = {
  "perplexity": (("text_file",), ("every", "seq_len")),
  "samples": ((), ("every", "count", "prompt", "length")),
  "task": (("task",), ("every", "num_examples")),
  "lm_eval": (("tasks",), ("every", "limit", "num_fewshot", "batch_size")),
}


def _check_evals(evals) -> None:
  for name, spec in evals.items():
    if not isinstance(spec, ml_collections.ConfigDict) or spec.get("kind") not in EVAL_OPTIONS:
      raise errors.ConfigError(
        f"evals.{name} must be dict(kind=..., every=..., options) with kind one of {sorted(EVAL_OPTIONS)}"
      )
    required, optional = EVAL_OPTIONS[spec.kind]
    missing = [k for k in required if k not in spec]
    unknown = sorted(set(spec) - {"kind", *required, *optional})
    if missing or unknown:
      raise errors.ConfigError(
        f"evals.{name} (kind {spec.kind!r}): missing {missing}, unknown {unknown}; it takes "
        f"{list(required)} and optionally {list(optional)}"
      )
    for key in ("every", "seq_len", "count", "length", "num_examples", "limit", "num_fewshot", "batch_size"):
      least = 0 if key in ("every", "num_fewshot") else 1
      if key in spec and (not isinstance(spec[key], int) or isinstance(spec[key], bool) or spec[key] < least):
        raise errors.ConfigError(f"evals.{name}.{key}={spec[key]!r} must be an integer >= {least}")
    if spec.kind == "lm_eval" and not (isinstance(spec.tasks, str) and spec.tasks.strip(", ")):
      raise errors.ConfigError(
        f"evals.{name}.tasks={spec.tasks!r} must name lm-eval tasks, comma-separated, "
        "e.g. 'lmjax_qa_mc,hellaswag'"
      )


def validate(cfg) -> None:
  """Checks what is known before any data is read: keys, types of choices, ranges, consistency.

  Raises errors.ConfigError naming the field, its value and the allowed range or values.
  """
  valid = set(flat_keys(base_config()))
  unknown = sorted(k for k in set(flat_keys(cfg)) - valid if not k.startswith("evals."))
  if unknown:
    raise errors.ConfigError(
      f"unknown config keys {unknown}; valid keys are:\n  " + "\n  ".join(sorted(valid))
    )
  for field, (low, low_in, high, high_in) in _RANGES.items():
    value = _get(cfg, field)
    if value is None:  # an unset placeholder (typed fields cannot be set to None)
      continue
    # written as "not inside" so that NaN, which compares False with everything, is outside
    inside = (
      (value >= low if low_in else value > low)
      and (high is None or (value <= high if high_in else value < high))
      and math.isfinite(value)
    )
    if not inside:
      raise errors.ConfigError(
        f"{field}={value} is out of range: it must be {_range_text(low, low_in, high, high_in)}"
      )
  if cfg.reference.val_loss and not (cfg.reference.dataset and cfg.reference.tokenizer):
    raise errors.ConfigError(
      f"reference.val_loss={cfg.reference.val_loss} is set without the data it was measured for: set "
      "reference.dataset and reference.tokenizer (a run compares with it only on those data)"
    )
  if cfg.optim.min_lr > cfg.optim.lr:
    raise errors.ConfigError(
      f"optim.min_lr={cfg.optim.min_lr} exceeds optim.lr={cfg.optim.lr}: the schedule "
      "decays from lr to min_lr; lower min_lr"
    )
  tc = cfg.train
  if tc.batch_size % tc.grad_accum:
    raise errors.ConfigError(
      f"train.batch_size={tc.batch_size} must be divisible by train.grad_accum={tc.grad_accum}"
    )
  if tc.grad_accum > 1 and cfg.finetune.task == "search":
    raise errors.ConfigError(
      "train.grad_accum > 1 cannot be used with finetune.task='search': its contrastive loss takes each "
      "query's negatives from the whole batch, so micro-batches would see fewer negatives than the full "
      "batch. Set train.grad_accum=1 (lower train.batch_size if memory is short)"
    )
  _check_choices(cfg)
  _check_evals(cfg.get("evals", ml_collections.ConfigDict()))
  try:
    model_config(cfg, vocab_size=2)  # validates the model fields now, not after data preparation
  except ValueError as err:
    raise errors.ConfigError(str(err)) from None


# Named options of the optim block (train/optimizer.py and train/schedules.py implement them).
OPTIMIZERS = ("adamw", "lion", "adafactor", "sgd", "muon")
SCHEDULES = ("cosine", "wsd", "constant", "inverse_sqrt")
DECAY_SHAPES = ("linear", "cosine", "sqrt")
MUP_OPTIMIZERS = ("adamw", "lion")  # those μP's learning-rate table (Adam's) holds for


def _check_choices(cfg) -> None:
  """Named options whose allowed values the config layer knows (fine-tuning tasks and LoRA targets
  are checked by preflight.check_finetune_options, above this layer)."""
  choices = [
    ("data.tokenizer", cfg.data.tokenizer, ("char", "byte", "bpe", "bytelevel")),
    ("data.errors", cfg.data.errors, ("strict", "replace")),
    ("finetune.mode", cfg.finetune.mode, ("full", "lora")),
    ("optim.name", cfg.optim.name, OPTIMIZERS),
    ("optim.schedule", cfg.optim.schedule, SCHEDULES),
    ("optim.decay_shape", cfg.optim.decay_shape, DECAY_SHAPES),
  ]
  for field, value, allowed in choices:
    if value not in allowed:
      raise errors.ConfigError(f"{field}={value!r} is not supported; allowed values: {list(allowed)}")
  if cfg.model.parametrization == "mup" and cfg.optim.name not in MUP_OPTIMIZERS:
    raise errors.ConfigError(
      f"model.parametrization='mup' scales learning rates by Adam's rule (model/mup.py), which "
      f"optim.name={cfg.optim.name!r} does not follow; use optim.name in {list(MUP_OPTIMIZERS)}"
    )
  if cfg.data.tokenizer in ("bpe", "bytelevel") and not cfg.data.vocab_size:
    raise errors.ConfigError(f"data.tokenizer={cfg.data.tokenizer!r} needs data.vocab_size (e.g. 2048)")
  shape = tuple(cfg.mesh.shape)
  if len(shape) != len(sharding.MESH_AXES) or any(s < 1 and s != -1 for s in shape) or shape.count(-1) > 1:
    raise errors.ConfigError(
      f"mesh.shape={shape} must give one size per axis {sharding.MESH_AXES}, each >= 1 "
      "(one of them may be -1: the remaining devices)"
    )
