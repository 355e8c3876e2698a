"""Layer `train`: optimizers and learning-rate schedules by name (`optimizer.py`, `schedules.py`),
train state and the one setup path for mesh, abstract state and shardings (`state.py`), compiled
steps (`step.py`), the loop with checkpointing and signal handling (`loop.py`), start-of-run checks
(`preflight.py`), metrics logging (`metrics_log.py`) and the AOT dry run (`dry_run.py`).

May import: every layer but `research` and `cli`.
"""

from lmjax.train.dry_run import dry_run
from lmjax.train.loop import Interrupted, train
from lmjax.train.optimizer import make_optimizer, param_roles
from lmjax.train.schedules import make_schedule
from lmjax.train.state import Setup, TrainState, batch_spec, init_state, setup, state_shardings
from lmjax.train.step import make_eval_step, make_train_step

__all__ = [
  "Interrupted",
  "Setup",
  "TrainState",
  "batch_spec",
  "dry_run",
  "init_state",
  "make_eval_step",
  "make_optimizer",
  "make_schedule",
  "make_train_step",
  "param_roles",
  "setup",
  "state_shardings",
  "train",
]
