"""A task: what a run trains. The trainer receives one and has no task-specific branch.

A Task holds the model config, the step-indexed train/validation batches (pure functions of the
step, so resume and multi-process runs see the same global batch), the loss, the starting and
frozen weights, and what to score before and after training. `prepare(cfg, workdir)` builds the
one the config asks for: pretraining on a text corpus (pretraining.py) or fine-tuning from a
pretrained model or run (finetuning.py: SFT on prompt/response examples, or retrieval).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from lmjax import model
from lmjax.data.tokenizer_base import Tokenizer
from lmjax.model import lora
from lmjax.run import rundir
from lmjax.tasks import losses


@dataclasses.dataclass
class Task:
  """What the trainer trains: model config, step-indexed batches (pure functions of the step, sliced per
  process), the loss, starting and frozen weights (LoRA), and evaluators (see the module docstring)."""

  tokenizer: Tokenizer
  model_cfg: model.ModelConfig
  train_batch: Callable  # (step, process_index, process_count) -> numpy batch
  val_batch: Callable  # (index, process_index, process_count) -> numpy batch
  train_tokens: int
  val_tokens: int
  train_rows: int  # distinct examples a batch row can be (windows of a token stream, SFT examples)
  val_rows: int
  # Mean tokens the model runs on per training row, padding not counted (throughput and MFU count
  # them); None: train.seq_len, every position a token (pretraining).
  tokens_per_row: float | None = None
  initial: Any = None  # trainable params to start from (None: fresh init)
  frozen: Any = None  # weights that do not train (LoRA base)
  lora_scale: float | None = None
  loss: Callable = losses.lm_loss  # (run_model, batch) -> (loss sum, weight); losses.py
  task: str | None = None  # the built-in task (generators.py), if any
  # Called as evaluator(params, workdir, when, step) at the points in `.when` and every `.every` steps.
  evaluators: list = dataclasses.field(default_factory=list)
  init: dict | None = None  # fine-tuning: the init.* fields and the exact base weights (`origin`)
  base: dict | None = None

  def model_params(self, trainable, frozen):
    """The weights the model runs with."""
    return lora.merge(frozen, trainable, self.lora_scale) if self.lora_scale is not None else trainable

  def save(self, workdir: str) -> None:
    """What loading the run needs besides checkpoints: the tokenizer and model.json (the
    architecture; for fine-tuning also the base). Called once the run's checkpoint (if any) restored."""
    rundir.save_tokenizer(workdir, self.tokenizer)
    rundir.write_model(workdir, self.model_cfg, init=self.init, base=self.base, lora_scale=self.lora_scale)


def is_finetuning(cfg) -> bool:
  """Whether `cfg` fine-tunes (finetune.task or finetune.train_file set) rather than pretrains."""
  return bool(cfg.finetune.task or cfg.finetune.train_file)
