"""`lmjax-train` (python -m lmjax.cli.train): `--config=experiments/NAME.py[:variant] --workdir=DIR`.

Any config field can be overridden on the command line, e.g.
`--config.optim.lr=3e-4 --config.train.steps=500`; an unknown field is an
error that names the closest ones; `--help` lists every field with its doc.
Re-running the same command resumes from the run's latest checkpoint.

Exit status: 0 when the run reached train.steps; 2 for bad input (config value,
a workdir holding another config's run or in use by another process), printed
as `error: ...`; 128 + signal number (143 for SIGTERM, 130 for SIGINT) when a
signal stopped the run after it saved its current step (re-run to resume); 1
for anything else (a traceback).
"""

import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from lmjax import cli, train

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment file (python), optionally `file.py:variant`."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for everything this run writes.")
_DRY_RUN = flags.DEFINE_bool(
  "dry_run",
  False,
  "Compile the train step for the configured mesh and print per-device "
  "memory and FLOPs; no data, no weights, no training.",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
_DEVICES = flags.DEFINE_integer("cpu_devices", None, "CPU only: devices per process (tests, dry runs).")
flags.mark_flags_as_required(["config"])


def initialize_jax() -> None:
  """Multi-process setup before any other JAX call: from flags, or auto-detected (SLURM, TPU pods)."""
  if _DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
    )
  elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()


def main(argv):
  """Trains (or dry-runs) the experiment the flags name; exit statuses as in the module docstring."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logging()
  initialize_jax()
  cfg = _CONFIG.value
  if not _DRY_RUN.value and not _WORKDIR.value:
    raise app.UsageError("--workdir is required (except with --dry_run)")
  try:
    if _DRY_RUN.value:
      train.dry_run(cfg, cfg.data.vocab_size or {"byte": 259}.get(cfg.data.tokenizer, 256))
    else:
      train.train(cfg, _WORKDIR.value)
  except train.Interrupted as stopped:  # saved, not finished: a non-zero status a scheduler can requeue
    print(f"{stopped} (exit status {stopped.exit_code})", flush=True)
    sys.exit(stopped.exit_code)


def run(argv=None):
  """The console script: parses `argv` (default sys.argv) and runs `main`."""
  cli.run(main, argv, flags_parser=cli.parse_config_flags)


if __name__ == "__main__":
  run()
