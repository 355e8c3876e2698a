"""Layer `tasks`: what a run trains and how it is scored: the Task the trainer receives (`task.py`),
pretraining (`pretraining.py`), SFT and retrieval fine-tuning (`finetuning.py`), the objectives
(`losses.py`), generated tasks with checkable answers (`generators.py`), metrics (`metrics.py`),
evaluators (`evaluators.py`, declared in cfg.evals: `eval_config.py`) and the lm-eval backend
(`harness.py`).

May import: `core`, `ops`, `model`, `data`, `run`, `pretrained`, `inference`.
"""

from lmjax.tasks import eval_config, finetuning, pretraining
from lmjax.tasks.task import Task, is_finetuning


def prepare(cfg, workdir: str) -> Task:
  """The task `cfg` asks for: fine-tuning when finetune.task or finetune.train_file is set, else
  pretraining on cfg.data; with the evaluators `cfg.evals` declares added to the task's own.
  `workdir` supplies what a resumed run saved (tokenizer, LoRA base)."""
  task = (finetuning if is_finetuning(cfg) else pretraining).prepare(cfg, workdir)
  task.evaluators += eval_config.from_config(cfg.get("evals", {}), task.model_cfg, task.tokenizer, cfg.seed)
  return task


__all__ = ["Task", "is_finetuning", "prepare"]
