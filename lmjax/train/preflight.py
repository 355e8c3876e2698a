"""Checks made before the first step: what a run's saved state, data, mesh and prompt imply.

config.validate checks each field alone; these check a config against what exists: the run already
in the workdir (same experiment? a changed schedule?), the devices (does the mesh fit, does the
batch divide over it) and the data (does each split hold a sequence, does the sample prompt fit).
Each raises errors.ConfigError naming the field and the fix, before anything is trained or written.
"""

from __future__ import annotations

import jax
import numpy as np

from lmjax.core import errors, sharding
from lmjax.model import lora
from lmjax.run import config as config_lib, resume, rundir
from lmjax.tasks import generators, is_finetuning
from lmjax.train import optimizer, schedules


def check_resume(cfg, workdir: str):
  """The run's saved config (None for a new run). Raises ConfigError, writing nothing, when the
  workdir holds checkpoints of a run whose config differs from `cfg` outside
  resume.RESUMABLE_FIELDS (another model, data, optimizer or seed would be mixed into it), or a
  checkpoint beyond `train.steps`."""
  saved, steps = rundir.saved_config(workdir), rundir.steps(workdir)
  if steps and steps[-1] > cfg.train.steps:
    raise errors.ConfigError(
      f"the run in {workdir} is at step {steps[-1]}, beyond train.steps={cfg.train.steps}; "
      f"set train.steps >= {steps[-1]} to continue it, or use a new --workdir"
    )
  if saved is None or not steps:
    return saved
  differences = resume.resume_differences(saved, cfg)
  if differences:
    lines = "\n  ".join(f"{field}: saved {old!r}, now {new!r}" for field, old, new in differences)
    raise errors.ConfigError(
      f"{workdir} holds a run saved with another config ({rundir.CONFIG_FILE}); resuming it with this one "
      f"would mix two experiments:\n  {lines}\nTo continue that run, re-run with its saved values (drop "
      "these "
      "overrides); to train this config, use a new --workdir. Nothing in the workdir was changed."
    )
  return saved


def check_finetune_options(cfg) -> None:
  """finetune.task and finetune.lora_targets name things lmjax has (checked before any loading)."""
  choices = [("finetune.task", cfg.finetune.task, ("", "search", *sorted(generators.GENERATORS)))]
  if cfg.finetune.mode == "lora":
    choices += [
      ("finetune.lora_targets", t.strip(), tuple(lora.LORA_TARGETS))
      for t in cfg.finetune.lora_targets.split(",")
    ]
  for field, value, allowed in choices:
    if value not in allowed:
      raise errors.ConfigError(f"{field}={value!r} is not supported; allowed values: {list(allowed)}")


def check_fields_used(cfg) -> None:
  """A field set (away from its default) where this run never reads it is an error, not silence:
  pretraining ignores init.* and finetune.*, and each data field belongs to some datasets and
  tokenizers only. (Fine-tuning's model and data fields are checked against the source model in
  tasks/finetuning.py.)"""
  base, data = config_lib.base_config(), cfg.data
  if cfg.finetune.task or cfg.finetune.train_file:
    rules = [
      (f"finetune.{k}", "finetune.task is set: its generated examples are used")
      for k in ("train_file", "val_file")
      if cfg.finetune.task
    ]
    if cfg.finetune.task == "search":
      rules.append(("data.packing", "retrieval rows are (query, passage) pairs, not packed"))
    rules += [
      (f"finetune.{k}", "finetune.mode is not 'lora'")
      for k in ("lora_rank", "lora_alpha", "lora_targets")
      if cfg.finetune.mode != "lora"
    ]
  else:
    why = "only fine-tuning reads it (set finetune.task or finetune.train_file)"
    rules = [(f"init.{k}", why) for k in cfg.init] + [(f"finetune.{k}", why) for k in cfg.finetune]
    if data.sources:
      why = "data.sources is set: it names the sources"
      rules += [(f"data.{k}", why) for k in ("dataset", "text_files", "val_file")]
    elif data.dataset != "text_files":
      rules += [
        (f"data.{k}", "data.dataset is not 'text_files'") for k in ("text_files", "val_file", "val_fraction")
      ]
    elif data.val_file:
      rules.append(("data.val_fraction", "data.val_file is set: it is the validation split"))
    if not data.sources and data.dataset in ("shakespeare", "text_files"):
      rules.append(("data.text_key", "only JSONL, Parquet and TFDS sources have a text field to choose"))
    if data.tokenizer not in ("bpe", "bytelevel"):
      why = "only data.tokenizer='bpe' or 'bytelevel' is fitted (on a sample, to a vocabulary size)"
      rules += [("data.vocab_size", why), ("data.tokenizer_sample_mb", why)]
  rules += _optim_rules(cfg.optim, lora=is_finetuning(cfg) and cfg.finetune.mode == "lora")
  if not cfg.logging.wandb:
    rules += [
      (f"logging.{k}", "logging.wandb is False") for k in ("wandb_project", "wandb_entity", "wandb_name")
    ]
  unused = [
    f"{field}={_value(cfg, field)!r} ({why})"
    for field, why in rules
    if _value(cfg, field) != _value(base, field)
  ]
  if unused:
    raise errors.ConfigError(
      "config fields this run would ignore (remove them, or set what makes them "
      "apply):\n  " + "\n  ".join(unused)
    )


def check_logging(cfg) -> None:
  """logging.wandb=True needs the wandb package: refused before any data is read when it is missing."""
  import importlib.util

  if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
    raise errors.ConfigError(
      "logging.wandb=True but the wandb package is not installed: pip install 'lmjax[wandb]' (or wandb), "
      "or set logging.wandb=False"
    )


def _optim_rules(optim, lora: bool) -> list:
  """(field, why) for the optim fields that `optim.name` and `optim.schedule` do not read."""
  rules = [
    (f"optim.{k}", f"optim.name={optim.name!r} does not use it")
    for k in optimizer.HYPERPARAMETERS
    if k not in optimizer.READS[optim.name]
  ]
  if optim.name == "sgd" and optim.momentum == 0:
    rules.append(("optim.nesterov", "optim.momentum=0: plain SGD has no momentum to look ahead with"))
  if optim.schedule != "wsd":
    rules += [(f"optim.{k}", "only optim.schedule='wsd' reads it") for k in ("decay_fraction", "decay_shape")]
  if optim.schedule not in schedules.HORIZON_SCHEDULES:
    why = f"optim.schedule={optim.schedule!r} does not decay to a horizon"
    rules += [("optim.min_lr", why), ("optim.decay_steps", why)]
  if not lora:
    rules.append(("optim.weight_decay_adapters", "only LoRA fine-tuning trains adapters"))
  return rules


def _value(cfg, field: str):
  section, key = field.split(".")
  return config_lib.unset_is_none(field, cfg[section][key])


def schedule_change_note(saved, cfg, step: int) -> str | None:
  """A note when the resumed run's learning-rate schedule differs from the saved run's (train.steps
  or optim.decay_steps changed the decay horizon), with the override that keeps the old one. The
  other optim fields cannot change on resume (check_resume), so the old schedule is this config's
  with the saved horizon."""
  old_optim = cfg.optim.copy_and_resolve_references()
  old_optim.decay_steps = saved.optim.get("decay_steps")
  old_horizon = schedules.decay_horizon(old_optim, saved.train.steps)
  new_horizon = schedules.decay_horizon(cfg.optim, cfg.train.steps)
  old = float(schedules.make_schedule(old_optim, saved.train.steps)(step))
  new = float(schedules.make_schedule(cfg.optim, cfg.train.steps)(step))
  if old_horizon == new_horizon and np.isclose(old, new, rtol=1e-6, atol=0.0):
    return None
  return (
    f"NOTE: the learning-rate schedule changed since this run was saved: it decayed over {old_horizon} steps "
    f"and now decays over {new_horizon} (train.steps {saved.train.steps} -> {cfg.train.steps}), so at step "
    f"{step} the learning rate is {new:.4g} instead of {old:.4g}{f' ({new / old:.2f}x)' if old else ''}. "
    f"To keep the original schedule (then min_lr), add --config.optim.decay_steps={old_horizon}."
  )


def mesh_for(cfg):
  """The device mesh of `mesh.shape`, with the batch checked to divide over its data axes and the
  processes (each process feeds whole rows of the global batch)."""
  try:
    mesh = sharding.make_mesh(cfg.mesh.shape)
  except ValueError as err:
    raise errors.ConfigError(f"{err}; set mesh.shape to this machine's devices (e.g. (-1, 1, 1))") from None
  spec = sharding.batch_sharding(mesh, cfg.mesh.rules).spec[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  shards = int(np.prod([mesh.shape[a] for a in axes]))
  tc = cfg.train
  for parts, what in (
    (shards, f"the {shards} batch shards of mesh {dict(mesh.shape)}"),
    (jax.process_count(), f"the {jax.process_count()} processes"),
  ):
    if tc.batch_size % parts or (tc.batch_size // tc.grad_accum) % parts:
      raise errors.ConfigError(
        f"train.batch_size={tc.batch_size} (micro-batches of {tc.batch_size // tc.grad_accum} with "
        f"train.grad_accum={tc.grad_accum}) does not divide over {what}; make train.batch_size a "
        f"multiple of {parts * tc.grad_accum} ({parts} x train.grad_accum), or lower train.grad_accum"
      )
  return mesh


def check_sizes(cfg, task) -> None:
  """Sizes the data and the model imply: a split must hold one training sequence; the sample
  prompt must encode with the run's tokenizer and leave room for a token in the context."""
  tc = cfg.train
  for name, rows in (("train", task.train_rows), ("validation", task.val_rows)):
    if rows < 1:
      data = cfg.data
      by_fraction = data.sources or (data.dataset == "text_files" and not data.val_file)
      raise errors.ConfigError(
        f"the {name} split holds no complete sequence of train.seq_len={tc.seq_len} (+1 target) tokens: "
        f"{task.train_tokens if name == 'train' else task.val_tokens} tokens"
        + (" in all sources together (each source needs one)" if data.sources else "")
        + ". Lower train.seq_len or use more text"
        + (", or raise data.val_fraction" if name == "validation" and by_fraction else "")
      )
  if tc.num_samples and not task.task:
    try:
      prompt_ids = task.tokenizer.encode(tc.sample_prompt or "\n")
    except ValueError as err:
      raise errors.ConfigError(f"train.sample_prompt={tc.sample_prompt!r} cannot be encoded: {err}") from None
    if len(prompt_ids) >= task.model_cfg.max_len:
      raise errors.ConfigError(
        f"train.sample_prompt is {len(prompt_ids)} tokens, leaving no room in the model's context of "
        f"{task.model_cfg.max_len}: shorten the prompt, raise train.seq_len (pretraining), or set "
        "train.num_samples=0"
      )


def size_warnings(cfg, task, params: int) -> list:
  """What the corpus size says about the tokenizer and the model, as warnings with the numbers:
  a fitted BPE with fewer than 50 train tokens per id (most ids rarely seen, so their embeddings
  barely train: a 4096-id BPE on 57 KB of text saw its validation loss rise from 7.6 to 9.1), and
  fewer train tokens than parameters (memorised within the first epoch; Chinchilla-optimal is ~20
  tokens per parameter). None for fine-tuning or a pretrained start (their tokenizer and model are
  not this corpus's choice)."""
  if is_finetuning(cfg) or cfg.init.pretrained:
    return []
  warnings, tokens, vocab = [], task.train_tokens, task.tokenizer.vocab_size
  if cfg.data.tokenizer in ("bpe", "bytelevel") and tokens < 50 * vocab:
    suggested = 1 << ((tokens // 50).bit_length() - 1) if tokens >= 50 * 512 else 0
    fix = (
      f"Lower data.vocab_size (e.g. {suggested}) or use more text"
      if suggested
      else "Use more text, or data.tokenizer='char' or 'byte' without data.vocab_size and "
      "data.tokenizer_sample_mb (a BPE needs 256 byte ids before any merge)"
    )
    warnings.append(
      f"data.vocab_size gives {vocab} ids for {tokens:,} train tokens ({tokens / vocab:.1f} per id; "
      f"want >= 50): most ids will be seen too rarely to learn. {fix}"
    )
  if tokens < params:
    warnings.append(
      f"the model has {params:,} parameters for {tokens:,} train tokens ({tokens / params:.2f} per "
      "parameter; compute-optimal is ~20): it will memorise the corpus. Shrink the model or use more text"
    )
  return warnings
